"""Interaction logs in, per-user item sequences out: readers, k-core, id remapping, split.

Readers turn a raw log into `Interactions` (external ids as strings, optional
timestamps). `build_sequences` orders each user's interactions in time, applies
an optional iterative k-core and numbers the items 1..N (0 is padding, N+1 the
[MASK] token of BERT4Rec). `SequenceData.split` is the leave-one-out protocol of
SASRec/BERT4Rec (README "Evaluation"). `SequenceData.save` writes the canonical folder
that every later stage reads; its fingerprint ties models to their data.

Formats (`detect_format` recognises them by content):

| name        | shape                                                       |
|-------------|-------------------------------------------------------------|
| `ratings`   | MovieLens `user::item::rating::timestamp`                   |
| `sequences` | one user per line, `user item item ...`, oldest first       |
| `csv`       | delimited text with a header (`,` `\\t` `;` `|`), user/item/timestamp |
| `parquet`   | the same columns in a Parquet file                          |
| `recbole`   | RecBole atomic `.inter`: tab separated, `name:type` header  |

This module must not import torch: the data tools run without it.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import functools
import gc
import gzip
import hashlib
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import methodcaller
from pathlib import Path
from typing import Any

import numpy as np

from training.files import replace_directory, sha256_file, staging_dir

logger = logging.getLogger(__name__)

PAD_ID = 0
VOCAB_SCHEMA = "fishrec.vocab/1"
DATA_SCHEMA = "fishrec.data/1"
USERS_SCHEMA = "fishrec.users/1"
FORMATS = ("ratings", "sequences", "csv", "parquet", "recbole")

SEQUENCES_FILE = "sequences.safetensors"
VOCAB_FILE = "vocab.json"
USERS_FILE = "users.json"
META_FILE = "meta.json"
_CONTENT_FILES = (SEQUENCES_FILE, VOCAB_FILE, USERS_FILE)


class DataError(ValueError):
    """A data file that cannot be read as asked: names the file, the line and the expectation."""


def _line_error(path: Path | str, line: int, expected: str, got: str | None = None) -> DataError:
    found = "" if got is None else f", got {_shorten(got)!r}"
    return DataError(f"{path}: line {line}: expected {expected}{found}")


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Vocabulary:
    """External item id <-> internal id. Internal ids are 1..num_items; 0 pads, num_items+1 masks."""

    items: tuple[str, ...]  # items[i] is the external id of internal id i + 1
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        items = tuple(str(item) for item in self.items)
        index = {external: internal for internal, external in enumerate(items, start=1)}
        if len(index) != len(items):
            repeated = [item for item, count in Counter(items).items() if count > 1]
            raise DataError(f"vocabulary lists items more than once: {repeated[:5]}")
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "_index", index)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def mask_id(self) -> int:
        return self.num_items + 1

    def __len__(self) -> int:
        return self.num_items

    def __contains__(self, external: object) -> bool:
        return external in self._index

    def index(self, external: str) -> int:
        try:
            return self._index[external]
        except KeyError:
            raise KeyError(
                f"unknown item id {external!r} (the vocabulary has {self.num_items} items)"
            ) from None

    def external(self, internal: int) -> str:
        if not 1 <= internal <= self.num_items:
            raise KeyError(
                f"internal id {internal} is not an item: items are 1..{self.num_items}, "
                f"{PAD_ID} is padding and {self.mask_id} is [MASK]"
            )
        return self.items[internal - 1]

    def encode(self, externals: Iterable[str]) -> tuple[list[int], list[str]]:
        """(internal ids of the known items in order, the unknown external ids in order)."""
        known: list[int] = []
        unknown: list[str] = []
        for external in externals:
            internal = self._index.get(external)
            if internal is None:
                unknown.append(external)
            else:
                known.append(internal)
        return known, unknown

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": VOCAB_SCHEMA,
            "pad_id": PAD_ID,
            "mask_id": self.mask_id,
            "num_items": self.num_items,
            "items": list(self.items),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Vocabulary:
        if not isinstance(d, dict) or d.get("schema") != VOCAB_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise DataError(f"expected a vocabulary with schema {VOCAB_SCHEMA!r}, got {got!r}")
        items = d.get("items")
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise DataError("vocabulary 'items' must be a list of strings")
        vocab = cls(tuple(items))
        declared = (d.get("pad_id"), d.get("num_items"), d.get("mask_id"))
        if declared != (PAD_ID, vocab.num_items, vocab.mask_id):
            raise DataError(
                f"vocabulary declares pad_id, num_items, mask_id = {declared}; its {vocab.num_items} "
                f"items imply {(PAD_ID, vocab.num_items, vocab.mask_id)}"
            )
        return vocab

    def save(self, path: Path) -> None:
        _write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        data = _read_json(Path(path))
        try:
            return cls.from_json(data)
        except DataError as error:
            raise DataError(f"{path}: {error}") from None


# --------------------------------------------------------------------------- raw interactions


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
    if fmt == "ratings":
        return _read_ratings(path)
    if fmt == "sequences":
        return _read_sequences(path)
    if fmt == "csv":
        return _read_csv(path, columns, sep)
    if fmt == "recbole":
        return _read_recbole(path, columns)
    if fmt == "parquet":
        return _read_parquet(path, columns)
    raise DataError(f"{path}: unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")


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
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise _line_error(path, number, "a timestamp (number or ISO 8601)", value) from None
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
    """(header, rows by column) of a delimited text file whose first line is a header."""
    text = _read_text(path)
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: line 1: expected a header line, got an empty line")
    quoted = sep != "\t" and '"' in text
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
    header, table = _read_table(path, sep or _sniff_separator(path))
    names = _Candidates(
        (columns.user,), (columns.item,), (columns.timestamp,) if columns.timestamp else ()
    )
    return _table_columns(path, header, table, names)


def _read_recbole(path: Path, columns: ColumnNames) -> Interactions:
    """RecBole atomic `.inter`; `name:type` headers, RecBole's user_id/item_id as fallbacks."""
    header, table = _read_table(path, "\t")
    header = [name.split(":", 1)[0] for name in header]
    names = _Candidates(
        (columns.user, "user_id"),
        (columns.item, "item_id"),
        (columns.timestamp, "timestamp") if columns.timestamp else (),
    )
    return _table_columns(path, header, table, names)


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


# --------------------------------------------------------------------------- sequences


@dataclass(frozen=True, eq=False)
class EvalSplit:
    """Leave-one-out evaluation cases: one history and one target per evaluated user."""

    users: np.ndarray  # int64 row indices into SequenceData.users
    histories: list[np.ndarray]  # int64 internal ids, oldest first
    targets: np.ndarray  # int64 internal ids
    seen: list[np.ndarray]  # the distinct items of the user's whole sequence, sorted

    def __len__(self) -> int:
        return len(self.targets)


@dataclass(frozen=True, eq=False)
class Split:
    """Leave-one-out (README "Evaluation"): last item test, second-to-last validation, the rest train."""

    train: list[np.ndarray]  # seq[:-2] for users with >= 3 items; whole sequence otherwise
    valid: EvalSplit  # history seq[:-2], target seq[-2]
    test: EvalSplit  # history seq[:-1], target seq[-1]
    popularity: np.ndarray  # int64 [num_items + 1]: occurrences in `train` (index 0 is 0)
    num_items: int


@dataclass(frozen=True, eq=False)
class SequenceData:
    """One chronological sequence of internal item ids per user, with the vocabulary.

    Equality is identity (the fields hold arrays); compare `fingerprint`s instead.
    """

    sequences: list[np.ndarray]  # one int64 array per user, oldest first
    users: tuple[str, ...]  # external user ids, same order
    vocab: Vocabulary
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.users):
            raise DataError(f"{len(self.sequences)} sequences but {len(self.users)} users")

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return self.vocab.num_items

    @property
    def num_interactions(self) -> int:
        return int(sum(len(seq) for seq in self.sequences))

    @functools.cached_property
    def _flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(all items int64, offsets int64 [num_users + 1]): the canonical layout."""
        lengths = np.fromiter(map(len, self.sequences), dtype=np.int64, count=len(self.sequences))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = (
            np.concatenate(self.sequences).astype(np.int64)
            if self.sequences
            else np.zeros(0, np.int64)
        )
        return items, offsets

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of sequences, vocabulary and users in a fixed byte layout (not of meta)."""
        items, offsets = self._flat
        digest = hashlib.sha256(b"fishrec.sequences/1\n")
        for strings in (self.vocab.items, self.users):
            blob = json.dumps(list(strings), ensure_ascii=False).encode("utf-8")
            digest.update(len(blob).to_bytes(8, "little") + blob)
        digest.update(offsets.astype("<i8").tobytes())
        digest.update(items.astype("<i8").tobytes())
        return "sha256:" + digest.hexdigest()

    @functools.cached_property
    def _split(self) -> Split:
        return _leave_one_out(self.sequences, self.num_items)

    def split(self) -> Split:
        """The leave-one-out split (computed once, then cached)."""
        return self._split

    def save(self, directory: Path) -> None:
        """Write the canonical folder atomically: a temporary folder renamed into place."""
        directory = Path(directory)
        with staging_dir(directory) as staging:
            self._write(staging)
            replace_directory(staging, directory)
        logger.info(
            "saved %d users, %d items, %d interactions to %s",
            self.num_users,
            self.num_items,
            self.num_interactions,
            directory,
        )

    def _write(self, folder: Path) -> None:
        from safetensors.numpy import save

        items, offsets = self._flat
        # int32 halves the file; ids beyond 2**31 would need int64, which load also accepts.
        small = self.num_items < np.iinfo(np.int32).max
        tensors = {"items": items.astype(np.int32 if small else np.int64), "offsets": offsets}
        # Bytes written by us, not save_file: its file is private (mode 600) whatever the umask.
        blob = save(tensors, metadata={"schema": "fishrec.sequences/1"})
        (folder / SEQUENCES_FILE).write_bytes(blob)
        self.vocab.save(folder / VOCAB_FILE)
        _write_json(folder / USERS_FILE, {"schema": USERS_SCHEMA, "users": list(self.users)})
        files = {name: sha256_file(folder / name) for name in _CONTENT_FILES}
        meta = {
            **self.meta,
            "schema": DATA_SCHEMA,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_interactions": self.num_interactions,
            "fingerprint": self.fingerprint,
            "files": files,
        }
        _write_json(folder / META_FILE, meta)

    @classmethod
    def load(cls, directory: Path) -> SequenceData:
        """Read a canonical folder, verifying the sha256 of every file and the fingerprint."""
        directory = Path(directory)
        meta = _read_json(directory / META_FILE)
        if not isinstance(meta, dict) or meta.get("schema") != DATA_SCHEMA:
            raise DataError(f"{directory / META_FILE}: expected schema {DATA_SCHEMA!r}")
        _verify_files(directory, meta.get("files"))
        items, offsets = _load_flat(directory / SEQUENCES_FILE)
        vocab = Vocabulary.load(directory / VOCAB_FILE)
        users = _load_users(directory / USERS_FILE)
        _check_layout(directory, items, offsets, vocab.num_items, len(users))
        sequences = np.split(items, offsets[1:-1]) if len(users) else []
        data = cls(sequences, users, vocab, meta)
        if meta.get("fingerprint") != data.fingerprint:
            raise DataError(
                f"{directory}: content fingerprint {data.fingerprint} differs from meta.json's "
                f"{meta.get('fingerprint')}"
            )
        return data


def _leave_one_out(sequences: list[np.ndarray], num_items: int) -> Split:
    train: list[np.ndarray] = []
    evaluated: list[int] = []
    for row, seq in enumerate(sequences):
        # Fewer than 3 items leave no training item once validation and test are held out.
        if len(seq) >= 3:
            train.append(seq[:-2])
            evaluated.append(row)
        else:
            train.append(seq)
    rows = np.asarray(evaluated, dtype=np.int64)
    seqs = [sequences[row] for row in evaluated]
    seen = [np.unique(seq) for seq in seqs]
    valid = EvalSplit(
        rows, [s[:-2] for s in seqs], np.array([s[-2] for s in seqs], dtype=np.int64), seen
    )
    test = EvalSplit(
        rows, [s[:-1] for s in seqs], np.array([s[-1] for s in seqs], dtype=np.int64), seen
    )
    flat = np.concatenate(train) if train else np.zeros(0, np.int64)
    popularity = np.bincount(flat, minlength=num_items + 1).astype(np.int64)
    popularity[PAD_ID] = 0
    return Split(train, valid, test, popularity, num_items)


# --------------------------------------------------------------------------- building


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
    present_users, lengths = np.unique(user_codes, return_counts=True)
    distinct, first_seen = np.unique(item_codes, return_index=True)
    by_appearance = distinct[np.argsort(first_seen)]
    internal_of = np.zeros(len(item_names), dtype=np.int64)
    internal_of[by_appearance] = np.arange(1, len(by_appearance) + 1)
    flat = internal_of[item_codes]
    sequences = np.split(flat, np.cumsum(lengths)[:-1])
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
    data = SequenceData(sequences, users, vocab, meta)
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
    columns: ColumnNames = ColumnNames(),  # frozen, so safe as a default
    sep: str | None = None,
) -> SequenceData:
    """Read a raw log, build the sequences and save the canonical folder; returns the data.

    Every error is raised before anything is written, and the folder appears
    only once complete, so a failure leaves no partial output behind.
    """
    input_path = Path(input_path)
    fmt = detect_format(input_path) if fmt == "auto" else fmt
    interactions = read_interactions(input_path, fmt, columns, sep)
    data = build_sequences(interactions, k_core=k_core, source=input_path.name, fmt=fmt)
    data.save(Path(output))
    return data


def load_data(path: Path) -> SequenceData:
    """A canonical folder, or a raw file of any supported format (built in memory, no k-core)."""
    path = Path(path)
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise DataError(f"{path}: not a prepared data folder (no {META_FILE})")
        return SequenceData.load(path)
    fmt = detect_format(path)
    return build_sequences(read_interactions(path, fmt), source=path.name, fmt=fmt)


# --------------------------------------------------------------------------- files


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: expected JSON: {error}") from None


def _verify_files(directory: Path, files: Any) -> None:
    if not isinstance(files, dict) or set(_CONTENT_FILES) - set(files):
        raise DataError(f"{directory / META_FILE}: expected the sha256 of {list(_CONTENT_FILES)}")
    for name in _CONTENT_FILES:
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path}: missing")
        if sha256_file(path) != files[name]:
            raise DataError(
                f"{path}: sha256 differs from meta.json: the file is corrupt or changed"
            )


def _load_flat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: expected a safetensors file: {error}") from None
    if set(tensors) != {"items", "offsets"}:
        raise DataError(f"{path}: expected tensors ['items', 'offsets'], got {sorted(tensors)}")
    return tensors["items"].astype(np.int64), tensors["offsets"].astype(np.int64)


def _load_users(path: Path) -> tuple[str, ...]:
    payload = _read_json(path)
    if not isinstance(payload, dict) or payload.get("schema") != USERS_SCHEMA:
        raise DataError(f"{path}: expected schema {USERS_SCHEMA!r}")
    return tuple(str(user) for user in payload["users"])


def _check_layout(
    directory: Path, items: np.ndarray, offsets: np.ndarray, num_items: int, num_users: int
) -> None:
    problems = []
    if len(offsets) != num_users + 1 or offsets[0] != 0 or offsets[-1] != len(items):
        problems.append(f"offsets must run from 0 to {len(items)} over {num_users} users")
    elif np.any(np.diff(offsets) < 0):
        problems.append("offsets must not decrease")
    if len(items) and (items.min() < 1 or items.max() > num_items):
        problems.append(f"item ids must lie in 1..{num_items}")
    if problems:
        raise DataError(f"{directory / SEQUENCES_FILE}: {'; '.join(problems)}")
