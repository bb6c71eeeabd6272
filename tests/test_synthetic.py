"""training.synthetic: determinism, size, and enough sequential signal to be worth modelling."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pydantic
import pytest

from training.data import SequenceData, Split
from training.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def default_data() -> tuple[SequenceData, float]:
    """The default data set and the seconds its generation took, shared by the tests."""
    started = time.perf_counter()
    data = generate()
    return data, time.perf_counter() - started


def ndcg_at_10(split: Split, scores_of: Callable[[np.ndarray], np.ndarray]) -> float:
    """Mean NDCG@10 on the test split: full ranking over all items, history items excluded."""
    total = 0.0
    for history, target in zip(split.test.histories, split.test.targets, strict=True):
        scores = np.array(scores_of(history), dtype=np.float64)  # (num_items + 1,)
        scores[0] = -np.inf
        scores[history] = -np.inf
        if np.isfinite(scores[target]):  # a repeated target cannot be recommended
            rank = int((scores > scores[target]).sum())
            total += 1.0 / np.log2(rank + 2) if rank < 10 else 0.0
    return total / len(split.test.targets)


def transition_counts(split: Split) -> np.ndarray:
    """(V, V) counts of item a followed by item b in the training sequences."""
    counts = np.zeros((split.num_items + 1, split.num_items + 1))
    for seq in split.train:
        np.add.at(counts, (seq[:-1], seq[1:]), 1.0)
    return counts


def test_default_size_and_speed(default_data: tuple[SequenceData, float]) -> None:
    data, seconds = default_data
    lengths = np.array([len(seq) for seq in data.sequences])
    assert data.num_users == 3000
    assert 1000 <= data.num_items <= 1500
    assert 35 <= lengths.mean() <= 45 and lengths.min() >= 5 and lengths.max() <= 100
    assert seconds < 3.0
    assert data.users[0] == "u1" and all(item.startswith("i") for item in data.vocab.items)
    assert data.meta["synthetic"]["seed"] == 0


def test_few_repeats(default_data: tuple[SequenceData, float]) -> None:
    data, _ = default_data
    repeats = sum(len(seq) - len(np.unique(seq)) for seq in data.sequences)
    assert repeats / data.num_interactions < 0.03


def test_deterministic_in_the_seed() -> None:
    small = SyntheticConfig(num_users=200, num_items=300, num_topics=10)
    first, again = generate(small), generate(small)
    assert first.fingerprint == again.fingerprint
    other = generate(small.model_copy(update={"seed": 1}))
    assert other.fingerprint != first.fingerprint


def test_markov_beats_most_popular_by_far(default_data: tuple[SequenceData, float]) -> None:
    data, _ = default_data
    split = data.split()
    popularity = split.popularity.astype(np.float64)
    counts = transition_counts(split)
    most_pop = ndcg_at_10(split, lambda history: popularity)
    # Transitions from the last item; popularity only breaks ties among unseen pairs.
    markov = ndcg_at_10(split, lambda history: counts[history[-1]] + 1e-6 * popularity)
    assert most_pop > 0.02  # popularity carries signal too (Zipf)
    assert markov >= 2.0 * most_pop, (markov, most_pop)


def test_config_is_validated_and_frozen() -> None:
    with pytest.raises(pydantic.ValidationError, match="must not exceed 1"):
        SyntheticConfig(p_successor=0.6, p_recent_topic=0.5)
    with pytest.raises(pydantic.ValidationError, match="mean_length"):
        SyntheticConfig(mean_length=200)
    with pytest.raises(pydantic.ValidationError):
        SyntheticConfig(num_user=5)  # a typo is an error, not ignored
    with pytest.raises(pydantic.ValidationError):
        SyntheticConfig().seed = 3  # type: ignore[misc]
    assert all(field.description for field in SyntheticConfig.model_fields.values())
