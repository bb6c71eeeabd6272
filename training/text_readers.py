"""Readers of the line formats (`ratings`, `sequences`) and the raw text every text reader shares.

The shared part: a file's text with gzip undone (undecodable bytes name their
line), its first line (what format detection looks at), and `split_lines`,
which cuts unquoted delimited lines into columns while keeping each row's line
number for error messages. The delimited table readers
(training/table_readers.py) use it for files without quotes.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path

import numpy as np

from training.data_error import DataError, line_error
from training.interactions import Interactions, as_object_array, parse_timestamps


def read_text(path: Path) -> str:
    """The whole file as text (gzip is undone); undecodable bytes name their line."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise line_error(
            path, line, "UTF-8 text", repr(raw[error.start : error.start + 8])
        ) from None


def first_line(path: Path) -> str:
    """The first non-blank line, read from at most the first 64 KiB."""
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    with (gzip.open if compressed else open)(path, "rb") as handle:
        head = handle.read(65536)
    text = head.decode("utf-8-sig", errors="replace")
    return next((line for line in text.splitlines() if line.strip()), "")


@dataclass(frozen=True)
class Table:
    """Delimited rows stored by column, with the line number of each row for error messages."""

    columns: list[list[str]]
    numbers: Sequence[int]


def split_lines(
    path: Path, lines: list[str], first_number: int, sep: str, width: int, expected: str
) -> Table:
    """Split unquoted lines of exactly `width` fields; blank lines are skipped.

    One split of the joined text instead of a list per line: a million small
    lists cost seconds of allocation and garbage collection, strings do not.
    """
    counts = list(map(methodcaller("count", sep), lines))
    numbers: Sequence[int] = range(first_number, first_number + len(lines))
    if counts.count(width - 1) != len(lines):
        numbers = _checked_numbers(path, lines, counts, first_number, width - 1, expected)
        lines = [lines[number - first_number] for number in numbers]
    if not lines:
        raise DataError(f"{path}: no interactions")
    flat = sep.join(lines).split(sep)
    return Table([flat[field::width] for field in range(width)], numbers)


def _checked_numbers(
    path: Path, lines: list[str], counts: list[int], first: int, seps: int, expected: str
) -> list[int]:
    """Line numbers of the non-blank lines; the first line of another width is an error."""
    numbers: list[int] = []
    for number, (line, count) in enumerate(zip(lines, counts, strict=True), start=first):
        if not line.strip():
            continue  # blank lines (a trailing one, say) carry no interaction
        if count != seps:
            raise line_error(path, number, expected, line)
        numbers.append(number)
    return numbers


def read_ratings(path: Path) -> Interactions:
    """MovieLens `user::item::rating::timestamp` (ratings.dat); the rating is not used."""
    lines = read_text(path).splitlines()
    table = split_lines(path, lines, 1, "::", 4, "4 fields 'user::item::rating::timestamp'")
    users, items, _, stamps = table.columns
    timestamps = parse_timestamps(path, stamps, table.numbers)
    return Interactions(as_object_array(users), as_object_array(items), timestamps)


def read_sequences(path: Path) -> Interactions:
    """`user item item ...` per line, oldest first; the file order is the time order.

    A user on several lines gets the lines concatenated in file order.
    """
    users: list[str] = []
    lengths: list[int] = []
    items: list[str] = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise line_error(path, number, "'user item [item ...]' (a user and 1+ items)", line)
        users.append(tokens[0])
        lengths.append(len(tokens) - 1)
        items.extend(tokens[1:])
    if not users:
        raise DataError(f"{path}: no interactions")
    user_column = np.repeat(as_object_array(users), lengths)
    return Interactions(user_column, as_object_array(items), None)
