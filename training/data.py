"""Interaction logs in, per-user item sequences out: k-core, id remapping, split, files.

Readers (training/readers.py, one per format) turn a raw log into
`Interactions`. `build_sequences` orders each user's interactions in time,
applies an optional iterative k-core and numbers the items 1..N (0 is padding,
N+1 the [MASK] token of BERT4Rec), keeping each interaction's timestamp when the
log has them. `SequenceData.split` applies the data's evaluation protocol
(training/splits.py: leave-one-out by default, or a temporal cut-off).
`SequenceData.save` writes
the canonical folder that every later stage reads; its fingerprint ties models
to their data.

This module must not import torch: the data tools run without it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.config import SplitSpec
from training.files import replace_directory, sha256_file, staging_dir
from training.readers import (  # noqa: F401  (re-exported: the data API in one import)
    FORMATS,
    ColumnNames,
    DataError,
    Interactions,
    _line_error,
    _shorten,
    detect_format,
    read_interactions,
    read_log,
)
from training.splits import SPLITS, EvalSplit, Split  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

PAD_ID = 0
VOCAB_SCHEMA = "fishrec.vocab/1"
DATA_SCHEMA = "fishrec.data/1"
USERS_SCHEMA = "fishrec.users/1"

SEQUENCES_FILE = "sequences.safetensors"
VOCAB_FILE = "vocab.json"
USERS_FILE = "users.json"
META_FILE = "meta.json"
_CONTENT_FILES = (SEQUENCES_FILE, VOCAB_FILE, USERS_FILE)


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


# --------------------------------------------------------------------------- sequences


@dataclass(frozen=True, eq=False)
class SequenceData:
    """One chronological sequence of internal item ids per user, with the vocabulary.

    Equality is identity (the fields hold arrays); compare `fingerprint`s instead.
    """

    sequences: list[np.ndarray]  # one int64 array per user, oldest first
    users: tuple[str, ...]  # external user ids, same order
    vocab: Vocabulary
    meta: dict[str, Any] = field(default_factory=dict)
    # float64 epoch seconds per interaction, same layout; None: the log had no times
    timestamps: list[np.ndarray] | None = None
    split_spec: SplitSpec = field(default_factory=SplitSpec)

    def __post_init__(self) -> None:
        if len(self.sequences) != len(self.users):
            raise DataError(f"{len(self.sequences)} sequences but {len(self.users)} users")
        if self.timestamps is not None and list(map(len, self.timestamps)) != list(
            map(len, self.sequences)
        ):
            raise DataError("timestamps must have one entry per interaction")

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
        if self.timestamps is not None:  # data without times keeps its fingerprint
            digest.update(b"timestamps\n" + self._flat_timestamps.astype("<f8").tobytes())
        return "sha256:" + digest.hexdigest()

    @functools.cached_property
    def _flat_timestamps(self) -> np.ndarray:
        assert self.timestamps is not None
        if not self.timestamps:
            return np.zeros(0, np.float64)
        return np.concatenate(self.timestamps).astype(np.float64)

    @functools.cached_property
    def _split(self) -> Split:
        protocol = SPLITS[self.split_spec.protocol]
        return protocol(self.sequences, self.timestamps, self.num_items, self.split_spec)

    def split(self) -> Split:
        """The split of the data's protocol (`split_spec`; computed once, then cached)."""
        return self._split

    def with_split(self, spec: SplitSpec) -> SequenceData:
        """The same data under another evaluation protocol."""
        if spec == self.split_spec:
            return self
        return dataclasses.replace(self, split_spec=spec)

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
        if self.timestamps is not None:
            tensors["timestamps"] = self._flat_timestamps
        # Bytes written by us, not save_file: its file is private (mode 600) whatever the umask.
        blob = save(tensors, metadata={"schema": "fishrec.sequences/1"})
        (folder / SEQUENCES_FILE).write_bytes(blob)
        self.vocab.save(folder / VOCAB_FILE)
        _write_json(folder / USERS_FILE, {"schema": USERS_SCHEMA, "users": list(self.users)})
        files = {name: sha256_file(folder / name) for name in _CONTENT_FILES}
        meta = {
            **{key: value for key, value in self.meta.items() if key != "split"},
            "schema": DATA_SCHEMA,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_interactions": self.num_interactions,
            "fingerprint": self.fingerprint,
            "files": files,
        }
        if self.split_spec != SplitSpec():
            meta["split"] = self.split_spec.model_dump()
        _write_json(folder / META_FILE, meta)

    @classmethod
    def load(cls, directory: Path) -> SequenceData:
        """Read a canonical folder, verifying the sha256 of every file and the fingerprint."""
        directory = Path(directory)
        meta = _read_json(directory / META_FILE)
        if not isinstance(meta, dict) or meta.get("schema") != DATA_SCHEMA:
            raise DataError(f"{directory / META_FILE}: expected schema {DATA_SCHEMA!r}")
        _verify_files(directory, meta.get("files"))
        items, offsets, stamps = _load_flat(directory / SEQUENCES_FILE)
        vocab = Vocabulary.load(directory / VOCAB_FILE)
        users = _load_users(directory / USERS_FILE)
        _check_layout(directory, items, offsets, vocab.num_items, len(users))
        if stamps is not None and len(stamps) != len(items):
            raise DataError(f"{directory / SEQUENCES_FILE}: one timestamp per item expected")
        sequences = np.split(items, offsets[1:-1]) if len(users) else []
        timestamps = None
        if stamps is not None:
            timestamps = np.split(stamps, offsets[1:-1]) if len(users) else []
        spec = SplitSpec.model_validate(meta.get("split", {}))
        data = cls(sequences, users, vocab, meta, timestamps, spec)
        if meta.get("fingerprint") != data.fingerprint:
            raise DataError(
                f"{directory}: content fingerprint {data.fingerprint} differs from meta.json's "
                f"{meta.get('fingerprint')}"
            )
        return data


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


def _load_flat(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: expected a safetensors file: {error}") from None
    if set(tensors) - {"timestamps"} != {"items", "offsets"}:
        raise DataError(
            f"{path}: expected tensors ['items', 'offsets'] (and 'timestamps'), "
            f"got {sorted(tensors)}"
        )
    stamps = tensors.get("timestamps")
    return (
        tensors["items"].astype(np.int64),
        tensors["offsets"].astype(np.int64),
        None if stamps is None else stamps.astype(np.float64),
    )


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
