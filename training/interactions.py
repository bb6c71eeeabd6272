"""`Interactions`, the raw log every reader returns, and the time parsing readers share.

A reader (training/readers.py picks one by format) turns a file into
`Interactions`: external user and item ids as strings and optional
timestamps, before any id numbering (training/prepare.py does that).
`ColumnNames` says which columns of a table hold them. Timestamps are numbers
(seconds) or ISO 8601 date-times; they are parsed here so that every reader,
the temporal split and the configuration agree on what a time means.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data_error import DataError, line_error


@dataclass(frozen=True)
class ColumnNames:
    """Column names of a table (CSV, Parquet, RecBole); timestamp None keeps the file order."""

    user: str = "user"
    item: str = "item"
    timestamp: str | None = "timestamp"


@dataclass(frozen=True, eq=False)
class Interactions:
    """A raw log after reading, before id remapping: one entry per interaction."""

    users: np.ndarray  # external user ids (str, object array)
    items: np.ndarray  # external item ids (str, object array)
    timestamps: np.ndarray | None  # float64; None: the file order is the time order

    def __post_init__(self) -> None:
        n = len(self.users)
        if len(self.items) != n or (self.timestamps is not None and len(self.timestamps) != n):
            lengths = (
                n,
                len(self.items),
                None if self.timestamps is None else len(self.timestamps),
            )
            raise DataError(f"users, items and timestamps differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.users)


def as_object_array(values: Sequence[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def parse_timestamps(path: Path, values: list[str], numbers: Sequence[int]) -> np.ndarray:
    """Numbers (seconds) or ISO 8601 date-times as float64 seconds; naive times are UTC."""
    try:
        stamps = np.array(values, dtype=np.float64)
    except ValueError:
        stamps = np.array(
            [_parse_one_timestamp(path, v, n) for v, n in zip(values, numbers, strict=True)],
            dtype=np.float64,
        )
    bad = np.flatnonzero(~np.isfinite(stamps))
    if len(bad):
        raise line_error(path, numbers[bad[0]], "a finite timestamp", values[bad[0]])
    return stamps


def _parse_one_timestamp(path: Path, value: str, number: int) -> float:
    try:
        return parse_time(value)
    except ValueError:
        raise line_error(path, number, "a timestamp (number or ISO 8601)", value) from None


def parse_time(value: float | str) -> float:
    """Epoch seconds from a number or an ISO 8601 date-time (naive times are UTC)."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        moment = dt.datetime.fromisoformat(text)  # a ValueError names neither: callers do
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()
