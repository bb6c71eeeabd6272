"""`SequenceBuilder`: a raw log, chunk by chunk, into a prepared folder in bounded memory.

The rules (training/prepare.py says them for users): users in the order of
their first appearance in the log, each user's interactions in time order
(ties and logs without times keep the file order), an optional iterative
k-core, items numbered 1..N by first appearance in the concatenation of the
sequences. The builder applies them without holding the log:

1. `add(chunk)`: external ids become integer codes in order of first
   appearance (one dict per id kind: the vocabulary is what stays in memory),
   and each row is appended, as fixed-width columns, to the spill file of its
   user's block (codes 0..B-1 in block 0, B..2B-1 in block 1, ...). Blocks are
   consecutive users, so writing them one after another gives the final order.
2. `finish()`: the k-core, one pass over the blocks per iteration (a block
   holds all of its users' rows; the item counts are summed over blocks); then
   each block is sorted on its own, its items numbered as they first appear,
   and written to the prepared folder's streams (training/prepared_files.py).

Memory: the two id dicts, O(users) int64 arrays (offsets, codes) and one chunk
or block, whatever the number of interactions; the scratch files take 20-40
bytes per interaction of disk beside the output. The output is the same, byte for byte,
as building the sequences in memory would give (tests compare fingerprints).

This module must not import torch: the data tools run without it.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data_error import DataError
from training.interactions import Interactions
from training.prepared_files import FolderContent, write_folder
from training.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

BLOCK_USERS = 1 << 17  # users per spill block: ~2.6M rows (60 MB) at 20 interactions each
READ_ROWS = 1 << 22  # rows per read of a spill file when streaming the output


@dataclass(frozen=True)
class _Block:
    """One block's spill files: user codes, item codes, timestamps and the k-core's mask."""

    folder: Path
    index: int

    def path(self, column: str) -> Path:
        return self.folder / f"block-{self.index:06d}.{column}"

    def read(self, column: str, dtype: Any) -> np.ndarray:
        path = self.path(column)
        return np.fromfile(path, dtype=dtype) if path.exists() else np.zeros(0, dtype)

    def remove(self, *columns: str) -> None:
        for column in columns:
            self.path(column).unlink(missing_ok=True)


class SequenceBuilder:
    """Collects a log chunk by chunk in `scratch`, then writes the prepared folder.

    `source` and `fmt` go to the data's meta. Use as a context manager (or call
    `close`) so the scratch files go away whatever happens.
    """

    def __init__(self, scratch: Path | None = None, source: str = "", fmt: str = "") -> None:
        self.source, self.fmt = source, fmt
        self._own_scratch = scratch is None
        self.scratch = (
            Path(tempfile.mkdtemp(prefix="fishrec-build-")) if scratch is None else scratch
        )
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._user_codes: dict[Any, int] = {}
        self._item_codes: dict[Any, int] = {}
        self._rows = 0
        self._timed: bool | None = None

    def __enter__(self) -> SequenceBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # ---- 1. spill -----------------------------------------------------------------

    def add(self, chunk: Interactions) -> None:
        """Append a chunk of the log (rows in file order, after every earlier chunk)."""
        if not len(chunk):
            return
        timed = chunk.timestamps is not None
        if self._timed is None:
            self._timed = timed
        elif timed != self._timed:
            raise DataError(
                f"{self._name()}: some rows have timestamps and others do not; a log needs "
                "timestamps everywhere or nowhere (then the file order is the time order)"
            )
        if timed and not np.isfinite(chunk.timestamps).all():
            raise DataError(f"{self._name()}: timestamps must be finite numbers")
        users = _encode(self._user_codes, chunk.users)
        items = _encode(self._item_codes, chunk.items)
        blocks = users // BLOCK_USERS
        order = np.argsort(blocks, kind="stable")  # each block's rows keep the file order
        bounds = np.flatnonzero(np.diff(blocks[order])) + 1
        for rows in np.split(order, bounds):
            block = int(blocks[rows[0]])
            self._append(block, "user", (users[rows] - block * BLOCK_USERS).astype(np.int32))
            self._append(block, "item", items[rows])
            if timed:
                self._append(block, "time", chunk.timestamps[rows].astype(np.float64))
        self._rows += len(chunk)

    def _append(self, block: int, column: str, values: np.ndarray) -> None:
        # Opened per append, not kept open: 10^8 users are ~760 blocks x 3 files,
        # past a process's usual limit of open files; an open costs microseconds.
        with open(_Block(self.scratch, block).path(column), "ab") as handle:
            values.tofile(handle)

    def _name(self) -> str:
        return self.source or "interactions"

    # ---- 2. build -----------------------------------------------------------------

    def finish(self, output: Path, k_core: int | None = None) -> dict[str, Any]:
        """Write the prepared folder's files into `output` (an existing, empty folder).

        Returns the meta written. Errors (an empty log, nothing left after the
        k-core) are raised before anything is written.
        """
        if self._rows == 0:
            raise DataError(f"{self._name()}: no interactions")
        blocks = [_Block(self.scratch, b) for b in range(self._num_blocks())]
        if k_core is not None and k_core > 1:
            self._k_core(blocks, k_core)
        sorted_blocks = [self._sort_block(block) for block in blocks]
        lengths = np.concatenate([s.lengths for s in sorted_blocks])
        if not len(lengths):
            raise DataError(f"{self._name()}: nothing is left after the {k_core}-core")
        vocab = self._number_items(blocks)
        content = FolderContent(
            vocab=vocab,
            users=self._present_users(sorted_blocks),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            items=lambda: self._stream(blocks, "final", np.int64),
            timestamps=(lambda: self._stream(blocks, "ftime", np.float64)) if self._timed else None,
        )
        meta = write_folder(output, content, self._meta(k_core), split=None)
        logger.info(
            "built %d users, %d items, %d interactions from %s (k-core %s; raw %d/%d/%d)",
            len(content.users),
            vocab.num_items,
            content.num_interactions,
            self._name(),
            k_core,
            len(self._user_codes),
            len(self._item_codes),
            self._rows,
        )
        return meta

    def _num_blocks(self) -> int:
        return (len(self._user_codes) + BLOCK_USERS - 1) // BLOCK_USERS

    def _k_core(self, blocks: list[_Block], k: int) -> None:
        """The iterative k-core as block masks (`keep` files); one pass per iteration.

        Each iteration drops the rows of users and of items with fewer than k
        rows under the previous iteration's mask, until nothing changes: the
        same fixed point as iterating on the whole log at once.
        """
        num_items = len(self._item_codes)
        item_counts = sum(
            np.bincount(b.read("item", np.int64), minlength=num_items) for b in blocks
        )
        while True:
            changed = False
            next_counts = np.zeros(num_items, np.int64)
            for block in blocks:
                users, items = block.read("user", np.int32), block.read("item", np.int64)
                keep = self._kept(block, len(users))
                user_counts = np.bincount(users[keep], minlength=BLOCK_USERS)
                new_keep = keep & (user_counts[users] >= k) & (item_counts[items] >= k)
                changed |= bool(new_keep.sum() != keep.sum())
                new_keep.tofile(block.path("keep"))
                next_counts += np.bincount(items[new_keep], minlength=num_items)
            item_counts = next_counts
            if not changed:
                return

    @staticmethod
    def _kept(block: _Block, rows: int) -> np.ndarray:
        """The block's k-core mask (every row without a k-core)."""
        return block.read("keep", bool) if block.path("keep").exists() else np.ones(rows, bool)

    def _sort_block(self, block: _Block) -> _SortedBlock:
        """Sort a block's kept rows by (user, time, file order); writes its `order` file."""
        users = block.read("user", np.int32)
        rows = np.flatnonzero(self._kept(block, len(users)))
        users = users[rows]
        if self._timed:
            stamps = block.read("time", np.float64)[rows]
            order = np.lexsort((stamps, users))  # stable: ties keep the file order
        else:
            order = np.argsort(users, kind="stable")
        rows[order].astype(np.int64).tofile(block.path("order"))
        present, lengths = np.unique(users, return_counts=True)
        return _SortedBlock(present.astype(np.int64) + block.index * BLOCK_USERS, lengths)

    def _number_items(self, blocks: list[_Block]) -> Vocabulary:
        """Number items 1..N by first appearance in the final order; writes `final` and `ftime`."""
        internal_of = np.zeros(len(self._item_codes), np.int64)
        next_id = 1
        for block in blocks:
            order = block.read("order", np.int64)
            items = block.read("item", np.int64)[order]
            distinct, first_seen = np.unique(items, return_index=True)
            new = distinct[internal_of[distinct] == 0]
            new = new[np.argsort(first_seen[internal_of[distinct] == 0])]
            internal_of[new] = np.arange(next_id, next_id + len(new))
            next_id += len(new)
            internal_of[items].tofile(block.path("final"))
            if self._timed:
                block.read("time", np.float64)[order].tofile(block.path("ftime"))
            block.remove("user", "item", "time", "keep", "order")  # scratch disk stays bounded
        names = list(self._item_codes)
        by_appearance = np.zeros(next_id - 1, np.int64)
        seen = np.flatnonzero(internal_of)
        by_appearance[internal_of[seen] - 1] = seen
        return Vocabulary(tuple(str(names[code]) for code in by_appearance))

    def _present_users(self, sorted_blocks: list[_SortedBlock]) -> list[str]:
        names = list(self._user_codes)
        codes = np.concatenate([s.users for s in sorted_blocks])
        return [str(names[code]) for code in codes]

    def _stream(self, blocks: list[_Block], column: str, dtype: Any) -> Iterator[np.ndarray]:
        """A column of the output, block after block, read in bounded pieces."""
        for block in blocks:
            path = block.path(column)
            if not path.exists():
                continue  # a block whose users the k-core removed
            with open(path, "rb") as handle:
                while len(piece := np.fromfile(handle, dtype=dtype, count=READ_ROWS)):
                    yield piece

    def _meta(self, k_core: int | None) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.fmt,
            "k_core": k_core,
            "raw": {
                "users": len(self._user_codes),
                "items": len(self._item_codes),
                "interactions": self._rows,
            },
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }


@dataclass(frozen=True)
class _SortedBlock:
    users: np.ndarray  # global codes of the block's users left after the k-core, ascending
    lengths: np.ndarray  # their sequence lengths


def _encode(codes: dict[Any, int], values: np.ndarray) -> np.ndarray:
    """Integer codes of `values`, new values numbered in order of first appearance.

    Strings are hashed by pyarrow first (`dictionary_encode`, in C): the Python
    dict then sees each distinct value of the chunk once, not every row.
    """
    try:
        import pyarrow as pa
    except ImportError:  # the data tools' base install: row by row
        return _encode_rows(codes, values)
    try:
        encoded = pa.array(values, type=pa.string()).dictionary_encode()
    except (TypeError, ValueError, pa.ArrowException):
        return _encode_rows(codes, values)  # not all strings: row by row
    if encoded.null_count:
        return _encode_rows(codes, values)
    # The chunk's dictionary is in order of first appearance, as the rows would be.
    distinct = _encode_rows(codes, encoded.dictionary.to_numpy(zero_copy_only=False))
    return distinct[encoded.indices.to_numpy()]


def _encode_rows(codes: dict[Any, int], values: np.ndarray) -> np.ndarray:
    return np.fromiter(
        (codes.setdefault(value, len(codes)) for value in values), dtype=np.int64, count=len(values)
    )
