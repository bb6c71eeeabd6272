"""Readers of raw interaction logs: one per format, in the registry `READERS`.

A reader turns a file into `Interactions` (external ids as strings, optional
timestamps); `read_interactions` picks one by name or by the file's content
(`detect_format`). Every error names the file and the line, and nothing is
written by a reader (training/data.py builds and saves the sequences).

| name        | shape                                                       |
|-------------|-------------------------------------------------------------|
| `ratings`   | MovieLens `user::item::rating::timestamp`                   |
| `sequences` | one user per line, `user item item ...`, oldest first       |
| `csv`       | delimited text with a header (`,` `\\t` `;` `|`), user/item/timestamp |
| `parquet`   | the same columns in a Parquet file                          |
| `recbole`   | RecBole atomic `.inter`: tab separated, `name:type` header  |

Gzip-compressed text is read as is. This module must not import torch.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import gc
import gzip
import io
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path
from typing import Any

import numpy as np


class DataError(ValueError):
    """A data file that cannot be read as asked: names the file, the line and the expectation."""


def _line_error(path: Path | str, line: int, expected: str, got: str | None = None) -> DataError:
    found = "" if got is None else f", got {_shorten(got)!r}"
    return DataError(f"{path}: line {line}: expected {expected}{found}")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _read_text(path: Path) -> str:
    """The whole file as text (gzip is undone); undecodable bytes name their line."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise _line_error(
            path, line, "UTF-8 text", repr(raw[error.start : error.start + 8])
        ) from None


def _first_line(path: Path) -> str:
    """The first non-blank line, read from at most the first 64 KiB."""
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    with (gzip.open if compressed else open)(path, "rb") as handle:
        head = handle.read(65536)
    text = head.decode("utf-8-sig", errors="replace")
    return next((line for line in text.splitlines() if line.strip()), "")


_RECBOLE_FIELD = re.compile(r"^[^:\s]+:(token|token_seq|float|float_seq)$")
_TABLE_SEPARATORS = (",", "\t", ";", "|")


def detect_format(path: Path) -> str:
    """The format of a raw file, by its content (Parquet by its magic bytes or suffix)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic == b"PAR1" or path.suffix in (".parquet", ".pq"):
        return "parquet"
    line = _first_line(path)
    if not line:
        raise DataError(f"{path}: the file is empty")
    if "::" in line:
        return "ratings"
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) > 1 and all(_RECBOLE_FIELD.match(name.strip()) for name in fields):
        return "recbole"
    if any(sep in line for sep in _TABLE_SEPARATORS):
        return "csv"
    if len(line.split()) >= 2:
        return "sequences"
    raise DataError(
        f"{path}: line 1: cannot recognise the format of {_shorten(line)!r}; "
        f"pass one of {', '.join(FORMATS)}"
    )


def read_interactions(
    path: Path,
    fmt: str = "auto",
    columns: ColumnNames = ColumnNames(),  # frozen, so safe as a default
    sep: str | None = None,
) -> Interactions:
    """Read a raw log of any supported format (`fmt="auto"` detects it)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise DataError(
            f"{path}: unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}"
        )
    return READERS[fmt](path, columns, sep)


def _as_object_array(values: Sequence[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _read_ratings(path: Path) -> Interactions:
    """MovieLens `user::item::rating::timestamp` (ratings.dat); the rating is not used."""
    lines = _read_text(path).splitlines()
    table = _split_lines(path, lines, 1, "::", 4, "4 fields 'user::item::rating::timestamp'")
    users, items, _, stamps = table.columns
    timestamps = _parse_timestamps(path, stamps, table.numbers)
    return Interactions(_as_object_array(users), _as_object_array(items), timestamps)


@dataclass(frozen=True)
class _Table:
    """Delimited rows stored by column, with the line number of each row for error messages."""

    columns: list[list[str]]
    numbers: Sequence[int]


def _split_lines(
    path: Path, lines: list[str], first_number: int, sep: str, width: int, expected: str
) -> _Table:
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
    return _Table([flat[field::width] for field in range(width)], numbers)


def _checked_numbers(
    path: Path, lines: list[str], counts: list[int], first: int, seps: int, expected: str
) -> list[int]:
    """Line numbers of the non-blank lines; the first line of another width is an error."""
    numbers: list[int] = []
    for number, (line, count) in enumerate(zip(lines, counts, strict=True), start=first):
        if not line.strip():
            continue  # blank lines (a trailing one, say) carry no interaction
        if count != seps:
            raise _line_error(path, number, expected, line)
        numbers.append(number)
    return numbers


def _parse_timestamps(path: Path, values: list[str], numbers: Sequence[int]) -> np.ndarray:
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
        raise _line_error(path, numbers[bad[0]], "a finite timestamp", values[bad[0]])
    return stamps


def _parse_one_timestamp(path: Path, value: str, number: int) -> float:
    try:
        return parse_time(value)
    except ValueError:
        raise _line_error(path, number, "a timestamp (number or ISO 8601)", value) from None


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


def _read_sequences(path: Path) -> Interactions:
    """`user item item ...` per line, oldest first; the file order is the time order.

    A user on several lines gets the lines concatenated in file order.
    """
    users: list[str] = []
    lengths: list[int] = []
    items: list[str] = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise _line_error(path, number, "'user item [item ...]' (a user and 1+ items)", line)
        users.append(tokens[0])
        lengths.append(len(tokens) - 1)
        items.extend(tokens[1:])
    if not users:
        raise DataError(f"{path}: no interactions")
    user_column = np.repeat(_as_object_array(users), lengths)
    return Interactions(user_column, _as_object_array(items), None)


def _read_table(path: Path, sep: str) -> tuple[list[str], _Table]:
    """(header, rows by column) of a delimited file, by the exact reader (errors name lines)."""
    text = _read_text(path)
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: line 1: expected a header line, got an empty line")
    quoted = _quotes_allowed(sep) and '"' in text
    header = next(_csv_rows(lines[0], sep)) if quoted else lines[0].split(sep)
    header = [name.strip() for name in header]
    expected = f"{len(header)} fields like the header {header}"
    if quoted:
        return header, _read_quoted(path, text, sep, len(header), expected)
    return header, _split_lines(path, lines[1:], 2, sep, len(header), expected)


def _csv_rows(text: str, sep: str) -> Iterator[list[str]]:
    return csv.reader(io.StringIO(text, newline=""), delimiter=sep)


def _read_quoted(path: Path, text: str, sep: str, width: int, expected: str) -> _Table:
    """The csv module's reader, for files with quoted fields (which may hold separators)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    next(reader)
    rows: list[list[str]] = []
    numbers: list[int] = []
    with _gc_paused():
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != width:
                raise _line_error(path, reader.line_num, expected, sep.join(row))
            rows.append(row)
            numbers.append(reader.line_num)
        if not rows:
            raise DataError(f"{path}: no interactions below the header")
        columns = [list(column) for column in zip(*rows, strict=True)]
    return _Table(columns, numbers)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small lists (none form cycles)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _find_column(path: Path, header: list[str], candidates: Sequence[str], role: str) -> int:
    for name in candidates:
        if name in header:
            return header.index(name)
    hint = ""
    if all(_looks_numeric(name) for name in header):
        hint = " (the first line looks like data: the file needs a header line)"
    raise DataError(
        f"{path}: line 1: expected a {role} column named {' or '.join(map(repr, candidates))}; "
        f"columns found: {header}{hint}"
    )


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _table_columns(
    path: Path, header: list[str], table: _Table, names: _Candidates
) -> Interactions:
    """Pick the user, item and timestamp columns; ids lose surrounding blanks."""
    user_col = _find_column(path, header, names.user, "user")
    item_col = _find_column(path, header, names.item, "item")
    users = list(map(str.strip, table.columns[user_col]))
    items = list(map(str.strip, table.columns[item_col]))
    timestamps = None
    if names.timestamp:
        time_col = _find_column(path, header, names.timestamp, "timestamp")
        timestamps = _parse_timestamps(path, table.columns[time_col], table.numbers)
    return Interactions(_as_object_array(users), _as_object_array(items), timestamps)


@dataclass(frozen=True)
class _Candidates:
    """Accepted names per role, first match wins; an empty timestamp tuple means file order."""

    user: tuple[str, ...]
    item: tuple[str, ...]
    timestamp: tuple[str, ...]


def _sniff_separator(path: Path) -> str:
    """The separator of a delimited file: from the suffix, else the most frequent in the header."""
    if path.suffix in (".tsv", ".tab"):
        return "\t"
    header = _first_line(path)
    counts = {sep: header.count(sep) for sep in _TABLE_SEPARATORS}
    best = max(counts, key=lambda sep: counts[sep])
    if counts[best] == 0:
        raise DataError(
            f"{path}: line 1: expected a header separated by one of {_TABLE_SEPARATORS}, "
            f"got {_shorten(header)!r}; pass sep="
        )
    return best


def _read_csv(path: Path, columns: ColumnNames, sep: str | None) -> Interactions:
    """CSV/TSV with a header; columns other than user, item and timestamp are ignored."""
    names = _Candidates(
        (columns.user,), (columns.item,), (columns.timestamp,) if columns.timestamp else ()
    )
    return _read_delimited(path, sep or _sniff_separator(path), names, header_types=False)


def _read_recbole(path: Path, columns: ColumnNames) -> Interactions:
    """RecBole atomic `.inter`; `name:type` headers, RecBole's user_id/item_id as fallbacks."""
    names = _Candidates(
        (columns.user, "user_id"),
        (columns.item, "item_id"),
        (columns.timestamp, "timestamp") if columns.timestamp else (),
    )
    return _read_delimited(path, "\t", names, header_types=True)


class _ExactReaderNeeded(Exception):
    """pyarrow refused the file or a value: the exact reader reads it again to name the line."""


def _read_delimited(path: Path, sep: str, names: _Candidates, header_types: bool) -> Interactions:
    """A delimited table with a header, read by pyarrow; errors by the exact reader.

    pyarrow parses quoting, undoes gzip and decodes only the wanted columns,
    several times faster than the csv module, but its errors count rows, not
    lines (blank lines and quoted line breaks shift them). A file it refuses is
    read again by the csv module, which names the line; errors are rare, so
    valid files never pay for the second reader.
    """
    try:
        return _read_delimited_arrow(path, sep, names, header_types)
    except _ExactReaderNeeded:
        header, table = _read_table(path, sep)
        if header_types:
            header = [name.split(":", 1)[0] for name in header]
        return _table_columns(path, header, table, names)


def _read_delimited_arrow(
    path: Path, sep: str, names: _Candidates, header_types: bool
) -> Interactions:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    raw_header = _header_fields(path, sep)
    header = [name.strip() for name in raw_header]
    if header_types:
        header = [name.split(":", 1)[0] for name in header]
    roles = [names.user, names.item] + ([names.timestamp] if names.timestamp else [])
    found = [next((header.index(n) for n in role if n in header), None) for role in roles]
    if None in found or len(set(raw_header)) != len(raw_header):
        # A missing column (named after the rows' widths are checked, as the exact
        # reader does) or duplicate names (pyarrow selects by name): the exact reader.
        raise _ExactReaderNeeded
    wanted = [raw_header[index] for index in found if index is not None]
    try:
        with pa.input_stream(str(path), compression="gzip" if _is_gzip(path) else None) as f:
            table = pacsv.read_csv(
                f,
                parse_options=pacsv.ParseOptions(
                    delimiter=sep, quote_char='"' if _quotes_allowed(sep) else False
                ),
                convert_options=pacsv.ConvertOptions(
                    include_columns=wanted,
                    column_types=dict.fromkeys(wanted, pa.string()),
                    strings_can_be_null=False,
                ),
            )
    except (pa.ArrowInvalid, UnicodeDecodeError):
        raise _ExactReaderNeeded from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no interactions below the header")
    users, items = (
        pc.utf8_trim_whitespace(table.column(name)).to_numpy(zero_copy_only=False).astype(object)
        for name in wanted[:2]
    )
    timestamps = None
    if names.timestamp:
        timestamps = _arrow_timestamps(path, table.column(wanted[2]))
    return Interactions(users, items, timestamps)


def _arrow_timestamps(path: Path, column: Any) -> np.ndarray:
    """Numbers in one cast; ISO date-times by the shared parser; a bad one by the exact reader."""
    import pyarrow as pa

    try:
        stamps = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        if np.isfinite(stamps).all():
            return stamps
    except pa.ArrowInvalid:
        pass  # not all numbers: ISO 8601 date-times, or an error to locate
    values = column.to_pylist()
    try:  # the line numbers are right only without blank lines: the exact reader decides
        return _parse_timestamps(path, values, range(2, len(values) + 2))
    except DataError:
        raise _ExactReaderNeeded from None


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _quotes_allowed(sep: str) -> bool:
    """Tab-separated files (RecBole, TSV exports) never quote: a `"` there is text."""
    return sep != "\t"


def _header_fields(path: Path, sep: str) -> list[str]:
    line = _first_line(path)
    if not line.strip():
        raise DataError(f"{path}: line 1: expected a header line, got an empty line")
    return next(_csv_rows(line, sep)) if _quotes_allowed(sep) else line.split(sep)


def _read_parquet(path: Path, columns: ColumnNames) -> Interactions:
    """A Parquet table with user, item (and timestamp) columns; pyarrow is imported here only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = [columns.user, columns.item] + ([columns.timestamp] if columns.timestamp else [])
    try:
        found = pq.read_schema(path).names
        missing = [name for name in wanted if name not in found]
        if missing:
            raise DataError(
                f"{path}: expected columns {wanted}, missing {missing}; columns found: {found}"
            )
        table = pq.read_table(path, columns=wanted)  # other columns are never decoded
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: expected a Parquet file: {error}") from None
    for name in wanted:
        if table.column(name).null_count:
            row = int(
                np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0]
            )
            raise DataError(f"{path}: row {row + 1}: expected a value in column {name!r}, got null")
    users = table.column(columns.user).cast(pa.string()).to_numpy(zero_copy_only=False)
    items = table.column(columns.item).cast(pa.string()).to_numpy(zero_copy_only=False)
    timestamps = None
    if columns.timestamp:
        timestamps = _arrow_seconds(path, table.column(columns.timestamp))
    return Interactions(users.astype(object), items.astype(object), timestamps)


def _arrow_seconds(path: Path, column: Any) -> np.ndarray:
    """An Arrow timestamp, date, number or string column as float64 seconds."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_date(kind):
        column, kind = column.cast(pa.timestamp("s")), pa.timestamp("s")
    if pa.types.is_timestamp(kind):
        per_second = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}[kind.unit]
        ticks = column.cast(pa.int64()).to_numpy(zero_copy_only=False)
        return ticks.astype(np.float64) / per_second
    values = column.to_numpy(zero_copy_only=False)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = values.astype(np.float64)
        if np.isfinite(values).all():
            return values
        values = values.astype(str)
    return _parse_timestamps(path, list(map(str, values)), range(1, len(values) + 1))


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


def read_log(
    source: str | Path,
    fmt: str = "auto",
    columns: ColumnNames = ColumnNames(),  # frozen, so safe as a default
    sep: str | None = None,
) -> tuple[Interactions, list[str]]:
    """Every file of `source` read as one log, in name order; also the format of each.

    Each file is read (and its format detected) on its own, so errors name the
    file and the line. Either every file has timestamps or none has: a mix has
    no time order.
    """
    files = input_files(source)
    formats = [detect_format(f) if fmt == "auto" else fmt for f in files]
    parts = [
        read_interactions(f, kind, columns, sep) for f, kind in zip(files, formats, strict=True)
    ]
    if len(parts) == 1:
        return parts[0], formats
    timed = [p.timestamps is not None for p in parts]
    if any(timed) and not all(timed):
        untimed = [str(f) for f, t in zip(files, timed, strict=True) if not t]
        raise DataError(
            f"{source}: some files have timestamps and {untimed[:3]} do not; a log needs "
            "timestamps in every file or in none (then the file order is the time order)"
        )
    stamps = [p.timestamps for p in parts if p.timestamps is not None]
    joined = Interactions(
        np.concatenate([p.users for p in parts]),
        np.concatenate([p.items for p in parts]),
        np.concatenate(stamps) if all(timed) else None,
    )
    return joined, formats


# A reader: (path, column names, separator) -> Interactions; formats that fix their
# own layout ignore the columns and the separator.
Reader = Callable[[Path, ColumnNames, "str | None"], Interactions]

READERS: dict[str, Reader] = {
    "ratings": lambda path, columns, sep: _read_ratings(path),
    "sequences": lambda path, columns, sep: _read_sequences(path),
    "csv": _read_csv,
    "recbole": lambda path, columns, sep: _read_recbole(path, columns),
    "parquet": lambda path, columns, sep: _read_parquet(path, columns),
}
FORMATS = tuple(READERS)
