"""`SequenceData`: one chronological item sequence per user, in memory and as the prepared folder.

The prepared folder is what `fishrec data prepare` writes and every later
stage reads:

    sequences.safetensors  items (int32, or int64 for huge catalogues) and offsets
                           (int64 [users + 1]) of all sequences end to end, and the
                           float64 timestamps when the log had them
    vocab.json             the `Vocabulary` (training/vocabulary.py)
    users.json             external user ids, in sequence order
    meta.json              where the data came from (source, format, k-core, raw
                           counts), counts, the split protocol unless the default,
                           the sha256 of the three files above and the fingerprint

The fingerprint (sha256 of the sequences, vocabulary and users in a fixed byte
layout) ties models to their data. `SequenceData.split` applies the data's
evaluation protocol (training/splits.py). Building the sequences from a raw log
is training/prepare.py's job.

This module must not import torch: the data tools run without it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.config import SplitSpec
from training.data_error import DataError
from training.files import replace_directory, sha256_file, staging_dir
from training.json_files import read_json
from training.prepared_files import (
    CONTENT_FILES,
    DATA_SCHEMA,
    META_FILE,
    SEQUENCES_FILE,
    USERS_FILE,
    USERS_SCHEMA,
    VOCAB_FILE,
    FolderContent,
    fingerprint,
    write_folder,
)
from training.splits import SPLITS, Split
from training.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

__all__ = ["DATA_SCHEMA", "META_FILE", "SEQUENCES_FILE", "USERS_FILE", "VOCAB_FILE", "SequenceData"]


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
        return fingerprint(self._content())

    def _content(self) -> FolderContent:
        """The data as the prepared folder's writer sees it (each array one chunk)."""
        items, offsets = self._flat
        stamps = None
        if self.timestamps is not None:
            flat_stamps = (
                np.concatenate(self.timestamps).astype(np.float64)
                if self.timestamps
                else np.zeros(0, np.float64)
            )
            stamps = lambda: [flat_stamps]  # noqa: E731 (a one-chunk stream)
        return FolderContent(self.vocab, self.users, offsets, lambda: [items], stamps)

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
        split = self.split_spec.model_dump() if self.split_spec != SplitSpec() else None
        write_folder(folder, self._content(), self.meta, split)

    @classmethod
    def load(cls, directory: Path) -> SequenceData:
        """Read a canonical folder, verifying the sha256 of every file and the fingerprint."""
        directory = Path(directory)
        meta = read_json(directory / META_FILE)
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


# ---- reading the folder back ----------------------------------------------------


def _verify_files(directory: Path, files: Any) -> None:
    if not isinstance(files, dict) or set(CONTENT_FILES) - set(files):
        raise DataError(f"{directory / META_FILE}: expected the sha256 of {list(CONTENT_FILES)}")
    for name in CONTENT_FILES:
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
    payload = read_json(path)
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
