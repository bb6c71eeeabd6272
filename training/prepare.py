"""From a raw log to a prepared folder or `SequenceData`: `prepare`, `build_sequences`, `load_data`.

The rules: each user's interactions in time order, an optional iterative
k-core, items numbered 1..N (0 is padding, N+1 the [MASK] token of BERT4Rec),
each interaction's timestamp kept when the log has them. One implementation
applies them, the streaming `SequenceBuilder` (training/sequence_builder.py):
`prepare` (the body of `fishrec data prepare`) feeds it a log chunk by chunk
(training/readers.py), so memory stays bounded by a chunk plus the
vocabulary; `build_sequences` feeds it a log already in memory and reads the
result back. `load_data` opens either a prepared folder or a raw log, so every
command accepts both.

This module must not import torch: the data tools run without it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from training.data_error import DataError
from training.files import replace_directory, staging_dir
from training.interactions import ColumnNames, Interactions
from training.readers import iter_log
from training.sequence_builder import SequenceBuilder
from training.sequence_data import META_FILE, SEQUENCES_FILE, SequenceData

logger = logging.getLogger(__name__)


def build_sequences(
    interactions: Interactions, k_core: int | None = None, source: str = "", fmt: str = ""
) -> SequenceData:
    """Chronological per-user sequences with items numbered 1..N, built in memory.

    Users keep the order of their first appearance in the log; each user's
    interactions are sorted by timestamp, ties (and logs without timestamps)
    keeping the file order. Items are numbered by first appearance in the
    concatenation of these sequences, so the result does not depend on hashing
    or on the machine. Repeated (user, item, timestamp) rows are kept as
    repeated interactions: a log may legitimately record a repeat, and dropping
    rows silently would change the data behind the user's back.
    """
    return _build_in_memory([interactions], k_core, source, fmt)


def _build_in_memory(
    chunks: Iterable[Interactions], k_core: int | None, source: str, fmt: str
) -> SequenceData:
    with tempfile.TemporaryDirectory(prefix="fishrec-data-") as folder:
        _build(chunks, Path(folder) / "data", k_core, source, fmt)
        return SequenceData.load(Path(folder) / "data")


def _build(
    chunks: Iterable[Interactions], output: Path, k_core: int | None, source: str, fmt: str
) -> dict[str, Any]:
    """Stream `chunks` into a prepared folder at `output`, which appears only once complete."""
    with (
        staging_dir(output) as scratch,
        staging_dir(output) as staging,
        SequenceBuilder(scratch, source, fmt) as builder,
    ):
        for chunk in chunks:
            builder.add(chunk)
        meta = builder.finish(staging, k_core)
        replace_directory(staging, output)
    return meta


def prepare(
    input_path: Path,
    output: Path,
    fmt: str = "auto",
    k_core: int | None = None,
    columns: ColumnNames = ColumnNames(),  # noqa: B008 (frozen, so safe as a default)
    sep: str | None = None,
) -> dict[str, Any]:
    """Read a raw log chunk by chunk, build the sequences and save the canonical folder.

    Returns the folder's meta (counts, fingerprint): the data itself is not
    read back, so memory stays bounded (`SequenceData.load` opens it). Every error is raised before
    the folder is written, and the folder appears only once complete, so a
    failure leaves no partial output behind; scratch files live beside the
    output until the build ends.
    """
    formats, chunks = iter_log(input_path, fmt, columns, sep)
    fmt_names = ",".join(sorted(set(formats)))
    meta = _build(chunks, Path(output), k_core, _source_name(input_path), fmt_names)
    logger.info("saved the prepared folder %s (%s)", output, meta["fingerprint"])
    return meta


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
    formats, chunks = iter_log(path)
    return _build_in_memory(chunks, None, _source_name(path), ",".join(sorted(set(formats))))
