"""Readers of tables whose header names the columns: `csv`, `recbole` and `parquet`.

Delimited text (CSV/TSV, RecBole's atomic `.inter`) is read by pyarrow, which
is fast, and read again by the csv module only when pyarrow refuses a file, so
that errors name the line (see `_read_delimited`). Parquet is read by pyarrow
alone. Every reader yields the file in chunks of about `CHUNK_BYTES` of text or
`CHUNK_ROWS` Parquet rows, so `fishrec data prepare` never holds a whole file
(training/sequence_builder.py). pyarrow is imported inside the readers:
importing this module costs nothing to the data tools that never read a table.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data_error import DataError, line_error, shorten
from training.interactions import ColumnNames, Interactions, as_object_array, parse_timestamps
from training.text_readers import Table, first_line, read_text, split_lines

TABLE_SEPARATORS = (",", "\t", ";", "|")
CHUNK_BYTES = 64 << 20  # text per chunk: ~2M rows of a short CSV
CHUNK_ROWS = 1 << 21  # Parquet rows per chunk


@dataclass(frozen=True)
class _Candidates:
    """Accepted names per role, first match wins; an empty timestamp tuple means file order."""

    user: tuple[str, ...]
    item: tuple[str, ...]
    timestamp: tuple[str, ...]


def read_csv(path: Path, columns: ColumnNames, sep: str | None) -> Iterator[Interactions]:
    """CSV/TSV with a header; columns other than user, item and timestamp are ignored."""
    names = _Candidates(
        (columns.user,), (columns.item,), (columns.timestamp,) if columns.timestamp else ()
    )
    return _read_delimited(path, sep or _sniff_separator(path), names, header_types=False)


def read_recbole(path: Path, columns: ColumnNames) -> Iterator[Interactions]:
    """RecBole atomic `.inter`; `name:type` headers, RecBole's user_id/item_id as fallbacks."""
    names = _Candidates(
        (columns.user, "user_id"),
        (columns.item, "item_id"),
        (columns.timestamp, "timestamp") if columns.timestamp else (),
    )
    return _read_delimited(path, "\t", names, header_types=True)


class _ExactReaderNeeded(Exception):
    """pyarrow refused the file or a value: the exact reader reads it again to name the line."""


def _read_delimited(
    path: Path, sep: str, names: _Candidates, header_types: bool
) -> Iterator[Interactions]:
    """A delimited table with a header, read by pyarrow in chunks; errors by the exact reader.

    pyarrow parses quoting, undoes gzip and decodes only the wanted columns,
    several times faster than the csv module, but its errors count rows, not
    lines (blank lines and quoted line breaks shift them). A file it refuses is
    read again by the csv module, which names the line (or, for a file only
    pyarrow refuses, yields the rows pyarrow had not yet given: both skip blank
    lines, so rows match one to one); errors are rare, so valid files never pay
    for the second reader.
    """
    done = 0
    try:
        for chunk in _read_delimited_arrow(path, sep, names, header_types):
            done += len(chunk)
            yield chunk
    except _ExactReaderNeeded:
        header, table = _read_table(path, sep)
        if header_types:
            header = [name.split(":", 1)[0] for name in header]
        rest = _table_columns(path, header, table, names)
        yield Interactions(
            rest.users[done:],
            rest.items[done:],
            None if rest.timestamps is None else rest.timestamps[done:],
        )


# ---- the fast reader: pyarrow ----------------------------------------------------


def _read_delimited_arrow(
    path: Path, sep: str, names: _Candidates, header_types: bool
) -> Iterator[Interactions]:
    import pyarrow as pa
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
    rows = 0
    try:
        with pa.input_stream(str(path), compression="gzip" if _is_gzip(path) else None) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=CHUNK_BYTES),
                parse_options=pacsv.ParseOptions(
                    delimiter=sep, quote_char='"' if _quotes_allowed(sep) else False
                ),
                convert_options=pacsv.ConvertOptions(
                    include_columns=wanted,
                    column_types=dict.fromkeys(wanted, pa.string()),
                    strings_can_be_null=False,
                ),
            )
            for batch in reader:
                if batch.num_rows:
                    rows += batch.num_rows
                    yield _arrow_chunk(path, batch, wanted, bool(names.timestamp))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        raise _ExactReaderNeeded from None
    if rows == 0:
        raise DataError(f"{path}: no interactions below the header")


def _arrow_chunk(path: Path, batch: Any, wanted: list[str], timed: bool) -> Interactions:
    import pyarrow.compute as pc

    users, items = (
        pc.utf8_trim_whitespace(batch.column(name)).to_numpy(zero_copy_only=False).astype(object)
        for name in wanted[:2]
    )
    timestamps = _arrow_timestamps(path, batch.column(wanted[2])) if timed else None
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
        return parse_timestamps(path, values, range(2, len(values) + 2))
    except DataError:
        raise _ExactReaderNeeded from None


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _quotes_allowed(sep: str) -> bool:
    """Tab-separated files (RecBole, TSV exports) never quote: a `"` there is text."""
    return sep != "\t"


def _header_fields(path: Path, sep: str) -> list[str]:
    line = first_line(path)
    if not line.strip():
        raise DataError(f"{path}: line 1: expected a header line, got an empty line")
    return next(_csv_rows(line, sep)) if _quotes_allowed(sep) else line.split(sep)


# ---- the exact reader: the csv module, which names the line ---------------------


def _read_table(path: Path, sep: str) -> tuple[list[str], Table]:
    """(header, rows by column) of a delimited file, by the exact reader (errors name lines)."""
    text = read_text(path)
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: line 1: expected a header line, got an empty line")
    quoted = _quotes_allowed(sep) and '"' in text
    header = next(_csv_rows(lines[0], sep)) if quoted else lines[0].split(sep)
    header = [name.strip() for name in header]
    expected = f"{len(header)} fields like the header {header}"
    if quoted:
        return header, _read_quoted(path, text, sep, len(header), expected)
    return header, split_lines(path, lines[1:], 2, sep, len(header), expected)


def _csv_rows(text: str, sep: str) -> Iterator[list[str]]:
    return csv.reader(io.StringIO(text, newline=""), delimiter=sep)


def _read_quoted(path: Path, text: str, sep: str, width: int, expected: str) -> Table:
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
                raise line_error(path, reader.line_num, expected, sep.join(row))
            rows.append(row)
            numbers.append(reader.line_num)
        if not rows:
            raise DataError(f"{path}: no interactions below the header")
        columns = [list(column) for column in zip(*rows, strict=True)]
    return Table(columns, numbers)


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


def _table_columns(path: Path, header: list[str], table: Table, names: _Candidates) -> Interactions:
    """Pick the user, item and timestamp columns; ids lose surrounding blanks."""
    user_col = _find_column(path, header, names.user, "user")
    item_col = _find_column(path, header, names.item, "item")
    users = list(map(str.strip, table.columns[user_col]))
    items = list(map(str.strip, table.columns[item_col]))
    timestamps = None
    if names.timestamp:
        time_col = _find_column(path, header, names.timestamp, "timestamp")
        timestamps = parse_timestamps(path, table.columns[time_col], table.numbers)
    return Interactions(as_object_array(users), as_object_array(items), timestamps)


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


def _sniff_separator(path: Path) -> str:
    """The separator of a delimited file: from the suffix, else the most frequent in the header."""
    if path.suffix in (".tsv", ".tab"):
        return "\t"
    header = first_line(path)
    counts = {sep: header.count(sep) for sep in TABLE_SEPARATORS}
    best = max(counts, key=lambda sep: counts[sep])
    if counts[best] == 0:
        raise DataError(
            f"{path}: line 1: expected a header separated by one of {TABLE_SEPARATORS}, "
            f"got {shorten(header)!r}; pass sep="
        )
    return best


# ---- Parquet ---------------------------------------------------------------------


def read_parquet(path: Path, columns: ColumnNames) -> Iterator[Interactions]:
    """A Parquet table with user, item (and timestamp) columns, in chunks of `CHUNK_ROWS` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = [columns.user, columns.item] + ([columns.timestamp] if columns.timestamp else [])
    try:
        parquet = pq.ParquetFile(path)
        found = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: expected a Parquet file: {error}") from None
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(
            f"{path}: expected columns {wanted}, missing {missing}; columns found: {found}"
        )
    first_row = 0
    batches = parquet.iter_batches(batch_size=CHUNK_ROWS, columns=wanted)  # others never decoded
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{path}: expected a Parquet file: {error}") from None
        if batch is None:
            return
        yield _parquet_chunk(path, batch, columns, first_row)
        first_row += batch.num_rows


def _parquet_chunk(path: Path, batch: Any, columns: ColumnNames, first_row: int) -> Interactions:
    import pyarrow as pa

    for name in batch.schema.names:
        if batch.column(name).null_count:
            row = int(
                np.flatnonzero(batch.column(name).is_null().to_numpy(zero_copy_only=False))[0]
            )
            raise DataError(
                f"{path}: row {first_row + row + 1}: expected a value in column {name!r}, got null"
            )
    users = batch.column(columns.user).cast(pa.string()).to_numpy(zero_copy_only=False)
    items = batch.column(columns.item).cast(pa.string()).to_numpy(zero_copy_only=False)
    timestamps = None
    if columns.timestamp:
        timestamps = _arrow_seconds(path, batch.column(columns.timestamp), first_row)
    return Interactions(users.astype(object), items.astype(object), timestamps)


def _arrow_seconds(path: Path, column: Any, first_row: int) -> np.ndarray:
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
    rows = range(first_row + 1, first_row + len(values) + 1)
    return parse_timestamps(path, list(map(str, values)), rows)
