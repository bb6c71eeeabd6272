"""CL4SRec augmentations on left-padded batches: padding, lengths, content, seeding."""

from __future__ import annotations

import math

import pytest
import torch

from training.augment import (
    AugmentRates,
    augment,
    crop,
    mask,
    pad_to_width,
    reorder,
    stack_views,
    trim_padding,
    two_views,
)
from training.batching import pad_left

MASK_ID = 99


def random_batch(seed: int, rows: int = 40, width: int = 12) -> torch.Tensor:
    """Distinct item ids per row (so positions can be traced), lengths 1..width."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen).tolist()
    lengths[:3] = [1, 2, width]
    sequences = [(torch.randperm(90, generator=gen)[:n] + 1).numpy() for n in lengths]
    return pad_left(sequences)


def rows_of(items: torch.Tensor) -> list[list[int]]:
    return [[int(x) for x in row if x != 0] for row in items]


def assert_left_padded(items: torch.Tensor) -> None:
    for row in items.tolist():
        first_real = next(i for i, x in enumerate(row) if x != 0)  # never empty
        assert all(x != 0 for x in row[first_real:]), row


@pytest.mark.parametrize("seed", range(5))
def test_crop_keeps_a_contiguous_span_of_the_right_length(seed: int) -> None:
    items = random_batch(seed)
    out = crop(items, 0.6, torch.Generator().manual_seed(seed))
    assert out.shape == items.shape
    assert_left_padded(out)
    for before, after in zip(rows_of(items), rows_of(out), strict=True):
        assert len(after) == max(1, math.floor(len(before) * 0.6))
        starts = [i for i in range(len(before)) if before[i : i + len(after)] == after]
        assert starts, (before, after)


@pytest.mark.parametrize("seed", range(5))
def test_mask_replaces_the_right_number_of_items(seed: int) -> None:
    items = random_batch(seed)
    out = mask(items, 0.3, MASK_ID, torch.Generator().manual_seed(seed))
    assert_left_padded(out)
    assert torch.equal(out == 0, items == 0)
    for before, after in zip(rows_of(items), rows_of(out), strict=True):
        assert after.count(MASK_ID) == math.floor(len(before) * 0.3)
        assert all(a in (b, MASK_ID) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("seed", range(5))
def test_reorder_permutes_one_span_only(seed: int) -> None:
    items = random_batch(seed)
    out = reorder(items, 0.6, torch.Generator().manual_seed(seed))
    assert_left_padded(out)
    assert torch.equal(out == 0, items == 0)
    for before, after in zip(rows_of(items), rows_of(out), strict=True):
        assert sorted(before) == sorted(after)
        changed = [i for i in range(len(before)) if before[i] != after[i]]
        if changed:
            assert changed[-1] - changed[0] + 1 <= math.floor(len(before) * 0.6)


def test_a_single_item_survives_every_augmentation() -> None:
    items = torch.tensor([[0, 0, 7]])
    rates = AugmentRates()
    for choice in range(3):
        assert torch.equal(augment(items, torch.tensor([choice]), rates, MASK_ID), items)


@pytest.mark.parametrize("op", ["crop", "mask", "reorder", "views"])
def test_augmentations_are_seeded(op: str) -> None:
    items = random_batch(0, rows=64)

    def run(seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if op == "crop":
            return crop(items, 0.6, gen)
        if op == "mask":
            return mask(items, 0.3, MASK_ID, gen)
        if op == "reorder":
            return reorder(items, 0.6, gen)
        return torch.cat(
            [
                pad_to_width(v, items.shape[1])
                for v in two_views(items, AugmentRates(), MASK_ID, gen)
            ]
        )

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_augment_applies_the_chosen_operation_per_row() -> None:
    items = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] * 3)
    out = augment(items, torch.tensor([0, 1, 2]), AugmentRates(), MASK_ID)
    assert (out[0] == 0).sum() == 4  # crop kept 6 of 10
    assert (out[1] == MASK_ID).sum() == 3  # mask replaced 3 of 10
    assert sorted(out[2].tolist()) == list(range(1, 11))  # reorder kept every item


def test_two_views_use_two_different_augmentations() -> None:
    # With n >= 4 items, crop shortens, mask inserts [MASK] and reorder does neither:
    # two different operations can never give the same view.
    items = random_batch(1, rows=200, width=12)
    long_rows = (items != 0).sum(1) >= 4
    first, second = two_views(items, AugmentRates(), MASK_ID, torch.Generator().manual_seed(0))
    for view in (first, second):
        assert_left_padded(view)
    width = items.shape[1]
    same = (pad_to_width(first, width) == pad_to_width(second, width)).all(1)
    assert not same[long_rows].any()


def test_identity_rates_give_the_input_back() -> None:
    items = random_batch(2)
    rates = AugmentRates(crop_keep=1.0, mask_rate=0.0, reorder_rate=0.0)
    first, second = two_views(items, rates, MASK_ID)
    assert torch.equal(first, items) and torch.equal(second, items)


def test_padding_helpers() -> None:
    items = torch.tensor([[0, 0, 3, 4], [0, 0, 0, 5]])
    assert torch.equal(trim_padding(items), torch.tensor([[3, 4], [0, 5]]))
    assert trim_padding(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 1)
    stacked = stack_views([torch.tensor([[1, 2, 3]]), torch.tensor([[4]])])
    assert torch.equal(stacked, torch.tensor([[1, 2, 3], [0, 0, 4]]))


def test_bad_rates_are_refused() -> None:
    with pytest.raises(ValueError, match="mask_rate"):
        AugmentRates(mask_rate=1.5)
