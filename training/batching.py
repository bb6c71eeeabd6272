"""Turning variable-length sequences into left-padded tensors, batch by batch.

Every batch is padded to its own longest sequence, not to max_len: the median
ML-1M user has 96 items of the 200 allowed. Training batches can group sequences
of similar length (`train.length_grouping`) so that less padding is computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from training.model import PAD_ID


def pad_left(sequences: Sequence[np.ndarray], max_length: int | None = None) -> Tensor:
    """(B,) arrays of ids -> (B, L) int64, left-padded with 0, keeping the newest items.

    L is the longest sequence after truncation to `max_length`; an empty sequence
    becomes a row of padding.
    """
    if max_length is not None:
        sequences = [seq[-max_length:] if len(seq) > max_length else seq for seq in sequences]
    length = max((len(seq) for seq in sequences), default=0)
    out = np.full((len(sequences), max(length, 1)), PAD_ID, dtype=np.int64)
    for row, seq in enumerate(sequences):
        if len(seq):
            out[row, out.shape[1] - len(seq) :] = seq
    return torch.from_numpy(out)


@dataclass(frozen=True)
class Batch:
    """A training batch: left-padded item ids and the rows of the training set they are."""

    items: Tensor  # (B, L) int64
    index: Tensor  # (B,) int64, position in the training sequence list

    def to(self, device: torch.device) -> Batch:
        return Batch(self.items.to(device), self.index.to(device))


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket_batches: int = 0
) -> list[np.ndarray]:
    """Shuffled batches of indices, optionally of similar lengths.

    bucket_batches = 0: a plain shuffle cut into batches. N > 0: shuffle, cut into
    chunks of N batches, sort each chunk by length, cut it into batches, then
    shuffle the batch order: less padding, but when N batches cover the data
    (ML-1M: 48 batches) every batch is a length stratum and its mean loss weighs
    short users' tokens far more than a uniform batch does.
    """
    order = rng.permutation(len(lengths))
    if bucket_batches == 0:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def training_windows(
    sequences: Sequence[np.ndarray],
    index: np.ndarray,
    length: int,
    mode: str,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The window of each sequence the model sees: the newest `length` items, or a random one."""
    windows = []
    for i in index:
        seq = sequences[i]
        if len(seq) <= length:
            windows.append(seq)
        elif mode == "random":
            end = int(rng.integers(length, len(seq) + 1))
            windows.append(seq[end - length : end])
        else:
            windows.append(seq[-length:])
    return windows


def iterate_batches(
    sequences: Sequence[np.ndarray],
    batch_size: int,
    length: int,
    window: str,
    rng: np.random.Generator,
    bucket_batches: int = 0,
) -> Iterator[Batch]:
    lengths = np.fromiter((min(len(s), length) for s in sequences), dtype=np.int64)
    for index in length_bucketed_batches(lengths, batch_size, rng, bucket_batches):
        items = pad_left(training_windows(sequences, index, length, window, rng))
        yield Batch(items=items, index=torch.from_numpy(index.astype(np.int64)))
