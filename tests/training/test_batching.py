"""Training batches: uniform shuffling by default, optional length grouping."""

from __future__ import annotations

import numpy as np
import pytest

from training.batching import length_bucketed_batches


def test_uniform_batches_cover_every_sequence_once_in_random_order() -> None:
    lengths = np.arange(1000) % 200 + 1
    batches = length_bucketed_batches(lengths, 128, np.random.default_rng(0))
    joined = np.concatenate(batches)
    assert sorted(joined.tolist()) == list(range(1000))
    assert [len(b) for b in batches] == [128] * 7 + [104]
    # No length strata: every full batch mixes short and long sequences.
    spans = [np.ptp(lengths[b]) for b in batches[:-1]]
    assert min(spans) > 150


def test_grouped_batches_are_length_strata() -> None:
    lengths = np.arange(1000) % 200 + 1
    batches = length_bucketed_batches(lengths, 100, np.random.default_rng(0), bucket_batches=10)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spans = [np.ptp(lengths[b]) for b in batches]
    assert max(spans) < 30


@pytest.mark.parametrize("grouping", [0, 5])
def test_batches_are_seeded(grouping: int) -> None:
    lengths = np.random.default_rng(3).integers(1, 50, size=300)
    first = length_bucketed_batches(lengths, 32, np.random.default_rng(7), grouping)
    second = length_bucketed_batches(lengths, 32, np.random.default_rng(7), grouping)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
