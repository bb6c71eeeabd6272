"""From a raw log to `SequenceData`: time order, k-core, item numbering, and `prepare` itself.

`build_sequences` orders each user's interactions in time, applies an optional
iterative k-core and numbers the items 1..N (0 is padding, N+1 the [MASK]
token of BERT4Rec), keeping each interaction's timestamp when the log has
them. `prepare` is the body of `fishrec data prepare`: read a log
(training/readers.py), build, save the prepared folder
(training/sequence_data.py). `load_data` opens either a prepared folder or a
raw log, so every command accepts both.

This module must not import torch: the data tools run without it.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import numpy as np

from training.data_error import DataError
from training.interactions import ColumnNames, Interactions
from training.readers import read_log
from training.sequence_data import META_FILE, SEQUENCES_FILE, SequenceData
from training.vocabulary import Vocabulary

logger = logging.getLogger(__name__)


def _factorize(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(codes 0..K-1 in order of first appearance, the K distinct values as str)."""
    table: dict[Any, int] = {}
    codes = np.fromiter(
        (table.setdefault(value, len(table)) for value in values), dtype=np.int64, count=len(values)
    )
    return codes, [str(value) for value in table]


def _k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of the interactions kept by the iterative k-core on users and items."""
    keep = np.ones(len(users), dtype=bool)
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    while True:
        user_counts = np.bincount(users[keep], minlength=num_users)
        item_counts = np.bincount(items[keep], minlength=num_items)
        new_keep = keep & (user_counts[users] >= k) & (item_counts[items] >= k)
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def build_sequences(
    interactions: Interactions, k_core: int | None = None, source: str = "", fmt: str = ""
) -> SequenceData:
    """Chronological per-user sequences with items numbered 1..N.

    Users keep the order of their first appearance in the log; each user's
    interactions are sorted by timestamp, ties (and logs without timestamps)
    keeping the file order. Items are numbered by first appearance in the
    concatenation of these sequences, so the result does not depend on hashing
    or on the machine. Repeated (user, item, timestamp) rows are kept as
    repeated interactions: a log may legitimately record a repeat, and dropping
    rows silently would change the data behind the user's back.
    """
    if len(interactions) == 0:
        raise DataError(f"{source or 'interactions'}: no interactions")
    user_codes, user_names = _factorize(interactions.users)
    item_codes, item_names = _factorize(interactions.items)
    stamps = interactions.timestamps
    if stamps is not None and not np.isfinite(stamps).all():
        raise DataError(f"{source or 'interactions'}: timestamps must be finite numbers")
    if k_core is not None and k_core > 1:
        keep = _k_core(user_codes, item_codes, k_core)
        user_codes, item_codes = user_codes[keep], item_codes[keep]
        stamps = None if stamps is None else stamps[keep]
        if not len(user_codes):
            raise DataError(f"{source or 'interactions'}: nothing is left after the {k_core}-core")
    # lexsort is stable: equal (user, timestamp) keys keep their file order.
    order = (
        np.argsort(user_codes, kind="stable")
        if stamps is None
        else np.lexsort((stamps, user_codes))
    )
    user_codes, item_codes = user_codes[order], item_codes[order]
    stamps = None if stamps is None else stamps[order].astype(np.float64)
    present_users, lengths = np.unique(user_codes, return_counts=True)
    distinct, first_seen = np.unique(item_codes, return_index=True)
    by_appearance = distinct[np.argsort(first_seen)]
    internal_of = np.zeros(len(item_names), dtype=np.int64)
    internal_of[by_appearance] = np.arange(1, len(by_appearance) + 1)
    flat = internal_of[item_codes]
    sequences = np.split(flat, np.cumsum(lengths)[:-1])
    timestamps = None if stamps is None else np.split(stamps, np.cumsum(lengths)[:-1])
    vocab = Vocabulary(tuple(item_names[code] for code in by_appearance))
    users = tuple(user_names[code] for code in present_users)
    meta = {
        "source": source,
        "format": fmt,
        "k_core": k_core,
        "raw": {
            "users": len(user_names),
            "items": len(item_names),
            "interactions": len(interactions),
        },
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    data = SequenceData(sequences, users, vocab, meta, timestamps)
    logger.info(
        "built %d users, %d items, %d interactions from %s (k-core %s; raw %d/%d/%d)",
        data.num_users,
        data.num_items,
        data.num_interactions,
        source or "interactions",
        k_core,
        len(user_names),
        len(item_names),
        len(interactions),
    )
    return data


def prepare(
    input_path: Path,
    output: Path,
    fmt: str = "auto",
    k_core: int | None = None,
    columns: ColumnNames = ColumnNames(),  # noqa: B008 (frozen, so safe as a default)
    sep: str | None = None,
) -> SequenceData:
    """Read a raw log, build the sequences and save the canonical folder; returns the data.

    Every error is raised before anything is written, and the folder appears
    only once complete, so a failure leaves no partial output behind.
    """
    interactions, formats = read_log(input_path, fmt, columns, sep)
    data = build_sequences(
        interactions,
        k_core=k_core,
        source=_source_name(input_path),
        fmt=",".join(sorted(set(formats))),
    )
    data.save(Path(output))
    return data


def _source_name(source: str | Path) -> str:
    """How the data's meta names its input: the file or folder name, or the glob pattern."""
    text = str(source)
    return text if any(char in text for char in "*?[") else Path(text).name


def load_data(path: str | Path) -> SequenceData:
    """A canonical folder, or a raw log (a file, a folder of partitions or a glob pattern)
    of any supported format, built in memory without k-core."""
    if Path(path).is_dir() and (Path(path) / META_FILE).is_file():
        return SequenceData.load(Path(path))
    if Path(path).is_dir() and (Path(path) / SEQUENCES_FILE).is_file():
        raise DataError(f"{path}: not a complete prepared data folder (no {META_FILE})")
    if Path(path).is_dir() and not any(Path(path).iterdir()):
        raise DataError(f"{path}: not a prepared data folder (no {META_FILE}) and no log files")
    interactions, formats = read_log(path)
    return build_sequences(
        interactions, source=_source_name(path), fmt=",".join(sorted(set(formats)))
    )
