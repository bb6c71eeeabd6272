"""Large synthetic logs: the model of training/synthetic.py streamed chunk by chunk to Parquet.

Versions with 10^6-10^7 users and 10^6 items do not fit in memory the way
`generate` builds them: `generate_chunks` draws the users in chunks, each from
its own seed, and `write_parquet` writes one Parquet file per chunk, an
interaction log with timestamps for `fishrec data prepare`. Memory stays at
one chunk plus the O(items) catalogue.
"""

from __future__ import annotations

import json
import logging
import numbers
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.synthetic import SyntheticConfig, draw_catalogue, generate_users

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_USERS = 10_000
LOG_START = 1_704_067_200  # 2024-01-01T00:00:00Z, the earliest possible first interaction
LOG_SPAN = 365 * 86_400  # first interactions are spread uniformly over a year
MEAN_GAP = 3_600.0  # mean seconds between two interactions of a user (at least 1)


@dataclass(frozen=True, eq=False)
class SyntheticChunk:
    """Consecutive users of a streamed data set, with their interactions user after user."""

    index: int  # chunk number, from 0
    first_user: int  # 0-based generator id of the first user ("u1" is 0)
    lengths: np.ndarray  # (B,) interactions of every user
    items: np.ndarray  # (N,) 0-based generator item ids ("i1" is 0), oldest first per user
    timestamps: np.ndarray  # (N,) int64 epoch seconds, strictly increasing within a user

    @property
    def num_users(self) -> int:
        return len(self.lengths)


def chunk_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The seed of chunk `index`: child `index` of SeedSequence(seed), as .spawn() would give.

    A spawn key, not the entropy [seed, index]: SeedSequence pads entropy with
    zeros, so [seed, 0] would be the very stream that drew the catalogue.
    """
    return np.random.SeedSequence(seed, spawn_key=(index,))


def _timestamps(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Epoch seconds: a uniform start per user, then 1 + exponential gaps (so strictly increasing)."""
    starts = LOG_START + rng.integers(0, LOG_SPAN, size=len(lengths))
    gaps = 1 + np.floor(rng.exponential(MEAN_GAP - 1.0, size=int(lengths.sum()))).astype(np.int64)
    firsts = np.cumsum(lengths) - lengths  # offset of every user's first interaction
    gaps[firsts] = 0
    elapsed = np.cumsum(gaps)
    return np.repeat(starts - elapsed[firsts], lengths) + elapsed


def generate_chunks(
    config: SyntheticConfig, chunk_users: int = DEFAULT_CHUNK_USERS
) -> Iterator[SyntheticChunk]:
    """The users of `config` in chunks of `chunk_users`; memory O(items + chunk), not O(users).

    The catalogue (topics, popularity, successors) is the one `generate(config)`
    draws. Chunk i's users come from a generator seeded with `chunk_seed(seed, i)`
    and `generate_users`, the code of the in-memory data set; that one is a
    single batch of every user continuing the catalogue's stream, so it cannot
    be cut into chunks without changing it. The same (config, chunk_users) gives
    the same chunks on any machine (same numpy); another chunk size gives other
    users, drawn from the same model.
    """
    if isinstance(chunk_users, bool) or not isinstance(chunk_users, numbers.Integral):
        raise ValueError(f"chunk_users must be a positive number of users, got {chunk_users!r}")
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be a positive number of users, got {chunk_users!r}")
    chunk_users = int(chunk_users)
    return _chunks(config, chunk_users)  # not a generator itself, so the check runs now


def _chunks(config: SyntheticConfig, chunk_users: int) -> Iterator[SyntheticChunk]:
    catalogue = draw_catalogue(config, np.random.default_rng(config.seed))
    for index, first in enumerate(range(0, config.num_users, chunk_users)):
        rng = np.random.default_rng(chunk_seed(config.seed, index))
        size = min(chunk_users, config.num_users - first)
        lengths, items = generate_users(config, catalogue, size, rng, pad_to_longest=False)
        yield SyntheticChunk(index, first, lengths, items, _timestamps(lengths, rng))


def _arrow_names(prefix: str, start: int, stop: int) -> Any:
    """External ids ("u1", ...) of generator ids start..stop-1 as an Arrow string array.

    Built in C: a million Python strings take a second.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    numbers = pa.array(np.arange(start + 1, stop + 1)).cast(pa.string())
    return pc.binary_join_element_wise(prefix, numbers, "")


@dataclass(frozen=True)
class SyntheticLog:
    """What `write_parquet` wrote."""

    path: Path
    files: int
    rows: int  # interactions
    users: int
    items: int  # distinct items that occur (rarely drawn ones may not)
    bytes: int  # total size of the files
    seconds: float


def write_parquet(
    config: SyntheticConfig,
    output: Path,
    chunk_users: int = DEFAULT_CHUNK_USERS,
    progress: Callable[[int], object] | None = None,
    compression: str = "zstd",
) -> SyntheticLog:
    """Write the users of `config` as an interaction log: one Parquet file per chunk.

    `output` becomes a folder of part-00000.parquet, part-00001.parquet, ...
    with columns user ("u1"...), item ("i1"...) and timestamp (UTC, seconds),
    rows user after user and oldest first: `fishrec data prepare --input
    output` reads it. The folder is built beside `output` and renamed into
    place (an old `output` is replaced), so a crash leaves no partial log.
    Memory is bounded by one chunk plus the O(items) catalogue. The same
    (config, chunk_users) writes the same files (byte for byte with the same
    pyarrow); `progress`, if given, is called with each chunk's user count.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.files import atomic_directory

    started = time.perf_counter()
    chunks = generate_chunks(config, chunk_users)  # raises on a bad chunk_users, writes nothing
    num_chunks = -(-config.num_users // chunk_users)
    width = max(5, len(str(num_chunks - 1)))
    item_names = _arrow_names("i", 0, config.num_items)
    stamp_type = pa.timestamp("s", tz="UTC")
    about = {"config": config.model_dump(), "chunk_users": chunk_users, "chunks": num_chunks}
    schema = pa.schema(
        [("user", pa.string()), ("item", pa.string()), ("timestamp", stamp_type)],
        metadata={"fishrec.synthetic": json.dumps(about, sort_keys=True)},
    )
    present = np.zeros(config.num_items, dtype=bool)
    rows = size = 0
    output = Path(output)
    with atomic_directory(output) as staging:
        for chunk in chunks:
            users = _arrow_names("u", chunk.first_user, chunk.first_user + chunk.num_users)
            table = pa.Table.from_arrays(
                [
                    users.take(np.repeat(np.arange(chunk.num_users), chunk.lengths)),
                    item_names.take(chunk.items),
                    pa.array(chunk.timestamps, type=stamp_type),
                ],
                schema=schema,
            )
            path = staging / f"part-{chunk.index:0{width}d}.parquet"
            pq.write_table(table, path, compression=compression)
            del table, users  # the chunk's Arrow buffers go before the next chunk's
            rows += len(chunk.items)
            size += path.stat().st_size
            present[chunk.items] = True
            if progress is not None:
                progress(chunk.num_users)
    log = SyntheticLog(
        output,
        num_chunks,
        rows,
        config.num_users,
        int(present.sum()),
        size,
        time.perf_counter() - started,
    )
    logger.info(
        "wrote a synthetic log of %d interactions (%d users, %d items) to %s in %.1f s",
        log.rows,
        log.users,
        log.items,
        output,
        log.seconds,
    )
    return log
