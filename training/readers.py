"""Readers of raw interaction logs: the registry `READERS`, one reader per format.

A reader turns a file into `Interactions` (training/interactions.py: external
ids as strings, optional timestamps), yielded in chunks so that a log larger
than memory streams through `fishrec data prepare`; `iter_interactions` picks a
reader by name or by the file's content (`detect_format`), `iter_log` reads a
log split over several files, and `read_interactions` and `read_log` gather
the chunks into one `Interactions` for the callers that want the whole log. Every error names the file and the line, and nothing is written
by a reader (training/prepare.py builds the sequences, training/sequence_data.py
saves them).

| name        | shape                                                       | reader in |
|-------------|-------------------------------------------------------------|-----------|
| `ratings`   | MovieLens `user::item::rating::timestamp`                   | text_readers.py |
| `sequences` | one user per line, `user item item ...`, oldest first       | text_readers.py |
| `csv`       | delimited text with a header (`,` `\\t` `;` `|`), user/item/timestamp | table_readers.py |
| `parquet`   | the same columns in a Parquet file                          | table_readers.py |
| `recbole`   | RecBole atomic `.inter`: tab separated, `name:type` header  | table_readers.py |

Gzip-compressed text is read as is. This module must not import torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from training.data_error import DataError, shorten
from training.interactions import ColumnNames, Interactions
from training.table_readers import TABLE_SEPARATORS, read_csv, read_parquet, read_recbole
from training.text_readers import first_line, read_ratings, read_sequences

_RECBOLE_FIELD = re.compile(r"^[^:\s]+:(token|token_seq|float|float_seq)$")


def detect_format(path: Path) -> str:
    """The format of a raw file, by its content (Parquet by its magic bytes or suffix)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"PAR1" or path.suffix in (".parquet", ".pq"):
        return "parquet"
    line = first_line(path)
    if not line:
        raise DataError(f"{path}: the file is empty")
    if "::" in line:
        return "ratings"
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) > 1 and all(_RECBOLE_FIELD.match(name.strip()) for name in fields):
        return "recbole"
    if any(sep in line for sep in TABLE_SEPARATORS):
        return "csv"
    if len(line.split()) >= 2:
        return "sequences"
    raise DataError(
        f"{path}: line 1: cannot recognise the format of {shorten(line)!r}; "
        f"pass one of {', '.join(FORMATS)}"
    )


def iter_interactions(
    path: Path,
    fmt: str = "auto",
    columns: ColumnNames = ColumnNames(),  # noqa: B008 (frozen, so safe as a default)
    sep: str | None = None,
) -> Iterator[Interactions]:
    """A raw log file of any supported format (`fmt="auto"` detects it), chunk by chunk."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise DataError(
            f"{path}: unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}"
        )
    return READERS[fmt](path, columns, sep)


def read_interactions(
    path: Path,
    fmt: str = "auto",
    columns: ColumnNames = ColumnNames(),  # noqa: B008 (frozen, so safe as a default)
    sep: str | None = None,
) -> Interactions:
    """A raw log file of any supported format, whole."""
    return concatenate(list(iter_interactions(path, fmt, columns, sep)))


def concatenate(chunks: list[Interactions]) -> Interactions:
    """One `Interactions` of consecutive chunks (all timed, or none)."""
    if len(chunks) == 1:
        return chunks[0]
    timed = [chunk.timestamps is not None for chunk in chunks]
    return Interactions(
        np.concatenate([chunk.users for chunk in chunks]),
        np.concatenate([chunk.items for chunk in chunks]),
        np.concatenate([chunk.timestamps for chunk in chunks]) if all(timed) else None,
    )


# ---- logs in several files ---------------------------------------------------------


def input_files(source: str | Path) -> list[Path]:
    """The files of a log: one file, every file of a folder, or a glob pattern, in name order.

    Daily partitions named by date (`2026-12-01.csv.gz`, ...) come out in time
    order; hidden files (`.`-prefixed) are skipped.
    """
    text = str(source)
    if any(char in text for char in "*?["):
        root = Path(text).anchor or "."
        pattern = text[len(root) :] if Path(text).is_absolute() else text
        files = sorted(p for p in Path(root).glob(pattern) if p.is_file())
        if not files:
            raise DataError(f"{text}: the pattern matches no file")
        return files
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: the folder holds no file")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return [path]


def iter_log(
    source: str | Path,
    fmt: str = "auto",
    columns: ColumnNames = ColumnNames(),  # noqa: B008 (frozen, so safe as a default)
    sep: str | None = None,
) -> tuple[list[str], Iterator[Interactions]]:
    """(the format of each file, every file of `source` read as one log in name order, chunked).

    Each file is read (and its format detected) on its own, so errors name the
    file and the line. Either every file has timestamps or none has: a mix has
    no time order.
    """
    files = input_files(source)
    formats = [detect_format(f) if fmt == "auto" else fmt for f in files]
    return formats, _chunks_of(source, files, formats, columns, sep)


def _chunks_of(
    source: str | Path, files: list[Path], formats: list[str], columns: ColumnNames, sep: str | None
) -> Iterator[Interactions]:
    timed: list[tuple[Path, bool]] = []
    for path, kind in zip(files, formats, strict=True):
        for chunk in iter_interactions(path, kind, columns, sep):
            if not timed or timed[-1][0] != path:
                timed.append((path, chunk.timestamps is not None))
            if len({has for _, has in timed}) > 1:
                untimed = [str(f) for f, has in timed if not has]
                raise DataError(
                    f"{source}: some files have timestamps and {untimed[:3]} do not; a log needs "
                    "timestamps in every file or in none (then the file order is the time order)"
                )
            yield chunk


def read_log(
    source: str | Path,
    fmt: str = "auto",
    columns: ColumnNames = ColumnNames(),  # noqa: B008 (frozen, so safe as a default)
    sep: str | None = None,
) -> tuple[Interactions, list[str]]:
    """Every file of `source` read as one log, whole (see `iter_log`); also the format of each."""
    formats, chunks = iter_log(source, fmt, columns, sep)
    return concatenate(list(chunks)), formats


# A reader: (path, column names, separator) -> the file's Interactions in chunks, in
# file order; formats that fix their own layout ignore the columns and the separator.
Reader = Callable[[Path, ColumnNames, "str | None"], Iterator[Interactions]]

READERS: dict[str, Reader] = {
    "ratings": lambda path, columns, sep: iter([read_ratings(path)]),
    "sequences": lambda path, columns, sep: iter([read_sequences(path)]),
    "csv": read_csv,
    "recbole": lambda path, columns, sep: read_recbole(path, columns),
    "parquet": lambda path, columns, sep: read_parquet(path, columns),
}
FORMATS = tuple(READERS)
