"""The files of a prepared data folder, written from streams: one writer for every producer.

A prepared folder (its layout: training/sequence_data.py) is written either
from a `SequenceData` in memory or by the streaming build of `fishrec data
prepare` (training/sequence_builder.py), whose interactions never sit in memory
at once. Both describe what they write as a `FolderContent` whose big arrays
(the items and the timestamps, end to end) are re-readable streams of chunks,
and both go through `write_folder`; the content fingerprint is computed here
from the same streams, so a folder built either way has the same bytes and the
same fingerprint.

`sequences.safetensors` is written block by block in the layout the
safetensors library itself writes (tests compare the bytes), so it loads with
`safetensors.numpy.load_file` and needs the library only to be read.

This module must not import torch: the data tools run without it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.files import sha256_file
from training.json_files import write_json
from training.vocabulary import Vocabulary

DATA_SCHEMA = "fishrec.data/1"
USERS_SCHEMA = "fishrec.users/1"
SEQUENCES_SCHEMA = "fishrec.sequences/1"

SEQUENCES_FILE = "sequences.safetensors"
VOCAB_FILE = "vocab.json"
USERS_FILE = "users.json"
META_FILE = "meta.json"
CONTENT_FILES = (SEQUENCES_FILE, VOCAB_FILE, USERS_FILE)

# A re-readable stream: each call yields the array end to end, chunk by chunk.
Chunks = Callable[[], Iterable[np.ndarray]]


@dataclass(frozen=True, eq=False)
class FolderContent:
    """What a prepared folder holds; the per-interaction arrays as streams of chunks."""

    vocab: Vocabulary
    users: Sequence[str]  # external user ids, in sequence order
    offsets: np.ndarray  # int64 [users + 1]: user u's items are items[offsets[u]:offsets[u+1]]
    items: Chunks  # internal item ids, all sequences end to end
    timestamps: Chunks | None  # float64 seconds, same layout; None: the log had no times

    @property
    def num_interactions(self) -> int:
        return int(self.offsets[-1])


def fingerprint(content: FolderContent) -> str:
    """sha256 of the sequences, vocabulary and users in a fixed byte layout (not of meta)."""
    digest = hashlib.sha256(b"fishrec.sequences/1\n")
    for strings in (content.vocab.items, content.users):
        blob = json.dumps(list(strings), ensure_ascii=False).encode("utf-8")
        digest.update(len(blob).to_bytes(8, "little") + blob)
    digest.update(content.offsets.astype("<i8").tobytes())
    for chunk in content.items():
        digest.update(np.asarray(chunk).astype("<i8").tobytes())
    if content.timestamps is not None:  # data without times keeps its fingerprint
        digest.update(b"timestamps\n")
        for chunk in content.timestamps():
            digest.update(np.asarray(chunk).astype("<f8").tobytes())
    return "sha256:" + digest.hexdigest()


def write_folder(
    folder: Path, content: FolderContent, meta: dict[str, Any], split: dict[str, Any] | None
) -> dict[str, Any]:
    """Write the four files of a prepared folder into `folder`; returns the meta written.

    `meta` says where the data came from (its counts, fingerprint and file
    hashes are set here); `split` is the evaluation protocol when not the
    default. The caller makes the folder appear atomically.
    """
    _write_sequences(folder / SEQUENCES_FILE, content)
    content.vocab.save(folder / VOCAB_FILE)
    write_json(folder / USERS_FILE, {"schema": USERS_SCHEMA, "users": list(content.users)})
    written = {
        **{key: value for key, value in meta.items() if key != "split"},
        "schema": DATA_SCHEMA,
        "num_users": len(content.users),
        "num_items": content.vocab.num_items,
        "num_interactions": content.num_interactions,
        "fingerprint": fingerprint(content),
        "files": {name: sha256_file(folder / name) for name in CONTENT_FILES},
    }
    if split is not None:
        written["split"] = split
    write_json(folder / META_FILE, written)
    return written


# ---- sequences.safetensors, block by block --------------------------------------

# safetensors orders tensors by dtype (the library's enum, larger first), then by name.
_DTYPE_RANK = {"I32": 0, "F64": 1, "I64": 2}
_DTYPE_NAME = {np.dtype("<i4"): "I32", np.dtype("<i8"): "I64", np.dtype("<f8"): "F64"}


def item_dtype(num_items: int) -> np.dtype:
    """int32 halves the file; ids beyond 2**31 need int64, which loading also accepts."""
    return np.dtype("<i4") if num_items < np.iinfo(np.int32).max else np.dtype("<i8")


def _write_sequences(path: Path, content: FolderContent) -> None:
    tensors: dict[str, tuple[np.dtype, int, Chunks]] = {
        "items": (item_dtype(content.vocab.num_items), content.num_interactions, content.items),
        "offsets": (np.dtype("<i8"), len(content.offsets), lambda: [content.offsets]),
    }
    if content.timestamps is not None:
        tensors["timestamps"] = (np.dtype("<f8"), content.num_interactions, content.timestamps)
    order = sorted(tensors, key=lambda name: (-_DTYPE_RANK[_DTYPE_NAME[tensors[name][0]]], name))
    header: dict[str, Any] = {"__metadata__": {"schema": SEQUENCES_SCHEMA}}
    start = 0
    for name in order:
        dtype, count, _ = tensors[name]
        end = start + count * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAME[dtype], "shape": [count], "data_offsets": [start, end]}
        start = end
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the library pads it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        for name in order:
            dtype, count, chunks = tensors[name]
            written = sum(_write_chunks(handle, chunks(), dtype))
            if written != count:
                raise ValueError(f"{name}: {written} values streamed, {count} announced")


def _write_chunks(handle: Any, chunks: Iterable[np.ndarray], dtype: np.dtype) -> Iterator[int]:
    for chunk in chunks:
        handle.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
        yield len(chunk)
