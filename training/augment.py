"""Sequence augmentations of CL4SRec (Xie et al., ICDE 2022) on left-padded batches.

Every function takes a (B, L) int64 batch of item ids, oldest first and
left-padded with 0, and returns a left-padded batch of the same width (columns
that became padding everywhere are dropped by `trim_padding`). The work is
vectorised over the batch; randomness comes from an optional torch.Generator,
so the same seed gives the same views. Rates follow the CL4SRec/DuoRec code:

- crop keeps a contiguous span of floor(eta * n) items (at least one),
- mask replaces floor(gamma * n) items by the [MASK] token,
- reorder shuffles a contiguous span of floor(beta * n) items.

A sequence of n >= 1 items never becomes empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from training.model import PAD_ID

AUGMENTATIONS = ("crop", "mask", "reorder")


@dataclass(frozen=True)
class AugmentRates:
    crop_keep: float = 0.6  # eta: share of items a crop keeps
    mask_rate: float = 0.3  # gamma: share of items replaced by [MASK]
    reorder_rate: float = 0.6  # beta: share of items in the shuffled span

    def __post_init__(self) -> None:
        for name in ("crop_keep", "mask_rate", "reorder_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Drawn on the generator's device (CPU by default), then moved: seeded views
    # are the same on every device.
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def _randint(high: int, count: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randint(high, (count,), generator=generator, device=device).to(like.device)


def _share(lengths: Tensor, rate: float) -> Tensor:
    """floor(rate * n) per row, in double precision like Python's math.floor(n * rate)."""
    return torch.floor(lengths.double() * rate).long()


def _uniform_start(lengths: Tensor, span: Tensor, generator: torch.Generator | None) -> Tensor:
    """A start offset drawn uniformly from 0..n-span for each row."""
    draw = _rand(tuple(lengths.shape), lengths, generator)
    return torch.floor(draw.double() * (lengths - span + 1)).long().clamp(min=0)


def sequence_lengths(items: Tensor) -> Tensor:
    return (items != PAD_ID).sum(dim=1)


def crop(items: Tensor, keep: float = 0.6, generator: torch.Generator | None = None) -> Tensor:
    """Keep a random contiguous span of floor(keep * n) items (at least one) of each row."""
    length = items.shape[1]
    n = sequence_lengths(items)
    span = torch.minimum(_share(n, keep).clamp(min=1), n)  # (B,)
    start = _uniform_start(n, span, generator)  # offset from the oldest real item
    columns = torch.arange(length, device=items.device)
    # Output column j holds the item at offset start + span - (length - j), which
    # sits in column offset + (length - n) of the input.
    source = start[:, None] + span[:, None] - length + columns + (length - n)[:, None]
    kept = columns >= (length - span)[:, None]  # (B, L)
    cropped = items.gather(1, source.clamp(0, length - 1))
    return torch.where(kept, cropped, torch.full_like(items, PAD_ID))


def mask(
    items: Tensor, rate: float, mask_id: int, generator: torch.Generator | None = None
) -> Tensor:
    """Replace floor(rate * n) randomly chosen items of each row by [MASK]."""
    real = items != PAD_ID
    count = _share(real.sum(dim=1), rate)
    # Random keys, padding sorted last: the `count` smallest keys are the masked items.
    keys = _rand(tuple(items.shape), items, generator).masked_fill(~real, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)
    chosen = rank < count[:, None]
    return torch.where(chosen, torch.full_like(items, mask_id), items)


def reorder(items: Tensor, rate: float = 0.6, generator: torch.Generator | None = None) -> Tensor:
    """Shuffle a random contiguous span of floor(rate * n) items of each row."""
    length = items.shape[1]
    n = sequence_lengths(items)
    span = _share(n, rate)
    first = (length - n) + _uniform_start(n, span, generator)  # first column of the span
    columns = torch.arange(length, device=items.device)
    inside = (columns >= first[:, None]) & (columns < (first + span)[:, None])
    # Sort keys: a column outside the span keeps its index; inside, a random key in
    # [first, first + span) so the span is permuted in place and nothing else moves.
    noise = _rand(tuple(items.shape), items, generator).double()
    keys = torch.where(
        inside, first[:, None] + noise * span[:, None], columns.double().expand_as(noise)
    )
    return items.gather(1, keys.argsort(dim=1))


def augment(
    items: Tensor,
    choice: Tensor,
    rates: AugmentRates,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Row b gets augmentation AUGMENTATIONS[choice[b]]: (B, L), (B,) -> (B, L)."""
    variants = torch.stack(
        [
            crop(items, rates.crop_keep, generator),
            mask(items, rates.mask_rate, mask_id, generator),
            reorder(items, rates.reorder_rate, generator),
        ]
    )  # (3, B, L)
    rows = torch.arange(items.shape[0], device=items.device)
    return variants[choice.to(items.device), rows]


def two_views(
    items: Tensor, rates: AugmentRates, mask_id: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """CL4SRec's views: two different augmentations, drawn per row, of each sequence."""
    batch = items.shape[0]
    first = _randint(3, batch, items, generator)
    second = (first + 1 + _randint(2, batch, items, generator)) % 3  # never equal to first
    return (
        trim_padding(augment(items, first, rates, mask_id, generator)),
        trim_padding(augment(items, second, rates, mask_id, generator)),
    )


def trim_padding(items: Tensor) -> Tensor:
    """Drop the leading columns that are padding in every row (keep at least one column)."""
    used = (items != PAD_ID).any(dim=0)
    first = int(used.int().argmax()) if bool(used.any()) else items.shape[1] - 1
    return items[:, first:]


def pad_to_width(items: Tensor, width: int) -> Tensor:
    """Left-pad (B, L) to (B, width) with padding."""
    if items.shape[1] >= width:
        return items
    padding = torch.full(
        (items.shape[0], width - items.shape[1]), PAD_ID, dtype=items.dtype, device=items.device
    )
    return torch.cat([padding, items], dim=1)


def stack_views(views: list[Tensor]) -> Tensor:
    """Several (B_i, L_i) batches as one left-padded (sum B_i, max L_i) batch."""
    width = max(view.shape[1] for view in views)
    return torch.cat([pad_to_width(view, width) for view in views])
