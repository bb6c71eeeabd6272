"""The streaming build of `fishrec data prepare`: blocks, chunks and the files it writes.

The builder (training/sequence_builder.py) must give the same folder however
the log is cut into chunks and however many users share a spill block; a plain
Python statement of the rules is the reference.
"""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save

import training.prepared_files as prepared_files
import training.sequence_builder as sequence_builder
import training.table_readers as table_readers
from training.data_error import DataError
from training.interactions import Interactions
from training.prepare import build_sequences, prepare
from training.readers import read_interactions
from training.sequence_data import SequenceData
from training.vocabulary import Vocabulary


def reference(
    users: list[str], items: list[str], stamps: list[float] | None, k: int | None
) -> tuple[list[str], list[list[str]]]:
    """The rules, plainly: k-core, users by first appearance, items by time (ties: file order)."""
    rows = list(range(len(users)))
    while k:
        user_count = Counter(users[r] for r in rows)
        item_count = Counter(items[r] for r in rows)
        kept = [r for r in rows if user_count[users[r]] >= k and item_count[items[r]] >= k]
        if len(kept) == len(rows):
            break
        rows = kept
    order = list(dict.fromkeys(users))  # first appearance in the raw log
    by_user: dict[str, list[int]] = {}
    for r in rows:
        by_user.setdefault(users[r], []).append(r)
    present = [u for u in order if u in by_user]
    time = (lambda r: stamps[r]) if stamps is not None else (lambda r: 0.0)
    return present, [[items[r] for r in sorted(by_user[u], key=time)] for u in present]


def random_log(seed: int, rows: int, timed: bool) -> Interactions:
    rng = np.random.default_rng(seed)
    users = np.array([f"u{u}" for u in rng.zipf(1.3, rows) % 40], dtype=object)
    items = np.array([f"i{i}" for i in rng.zipf(1.2, rows) % 60], dtype=object)
    stamps = rng.integers(0, 20, rows).astype(np.float64) if timed else None  # many ties
    return Interactions(users, items, stamps)


def named(data: SequenceData) -> tuple[list[str], list[list[str]]]:
    return list(data.users), [[data.vocab.external(int(i)) for i in s] for s in data.sequences]


@pytest.mark.parametrize("timed", [True, False])
@pytest.mark.parametrize("k_core", [None, 2, 4])
def test_many_blocks_and_chunks_give_the_reference_and_the_same_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timed: bool, k_core: int | None
) -> None:
    log = random_log(seed=3, rows=900, timed=timed)
    whole = build_sequences(log, k_core=k_core)
    expected = reference(
        list(log.users),
        list(log.items),
        None if log.timestamps is None else list(log.timestamps),
        k_core,
    )
    assert named(whole) == expected
    # Items are numbered by first appearance in the sequences, end to end.
    flat = np.concatenate(whole.sequences)
    assert list(dict.fromkeys(flat.tolist())) == list(range(1, whole.num_items + 1))

    monkeypatch.setattr(sequence_builder, "BLOCK_USERS", 3)  # ~14 blocks
    monkeypatch.setattr(sequence_builder, "READ_ROWS", 7)
    with sequence_builder.SequenceBuilder(tmp_path / "scratch") as builder:
        for start in range(0, len(log), 50):
            part = slice(start, start + 50)
            stamps = None if log.timestamps is None else log.timestamps[part]
            builder.add(Interactions(log.users[part], log.items[part], stamps))
        (tmp_path / "out").mkdir()
        meta = builder.finish(tmp_path / "out", k_core)
    chunked = SequenceData.load(tmp_path / "out")
    assert meta["fingerprint"] == whole.fingerprint == chunked.fingerprint
    assert named(chunked) == expected
    assert meta["raw"] == {"users": 40, "items": len(set(log.items)), "interactions": 900}


def test_the_scratch_files_go_and_errors_come_before_any_output(tmp_path: Path) -> None:
    log = random_log(seed=1, rows=50, timed=True)
    with sequence_builder.SequenceBuilder(tmp_path / "scratch") as builder:
        builder.add(log)
        (tmp_path / "out").mkdir()
        with pytest.raises(DataError, match="nothing is left after the 1000-core"):
            builder.finish(tmp_path / "out", 1000)
        assert list((tmp_path / "out").iterdir()) == []
    with sequence_builder.SequenceBuilder() as builder:
        scratch = builder.scratch
        builder.add(log)
        with pytest.raises(DataError, match="some rows have timestamps and others do not"):
            builder.add(Interactions(log.users, log.items, None))
    assert not scratch.exists()
    with (
        sequence_builder.SequenceBuilder() as builder,
        pytest.raises(DataError, match="no interactions"),
    ):
        builder.finish(tmp_path / "out", None)
    bad = Interactions(log.users[:2], log.items[:2], np.array([1.0, np.inf]))
    with sequence_builder.SequenceBuilder() as builder, pytest.raises(DataError, match="finite"):
        builder.add(bad)


@pytest.mark.parametrize("timed", [True, False])
@pytest.mark.parametrize("wide", [False, True])
def test_sequences_file_has_the_bytes_the_safetensors_library_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timed: bool, wide: bool
) -> None:
    """The streamed file is what `safetensors.numpy.save` writes for the same arrays."""
    assert prepared_files.item_dtype(5) == np.int32
    assert prepared_files.item_dtype(2**31) == np.int64
    if wide:  # a catalogue past 2**31 items stores int64 ids (and orders the tensors otherwise)
        monkeypatch.setattr(prepared_files, "item_dtype", lambda num_items: np.dtype("<i8"))
    items = np.array([1, 2, 3, 4, 5, 1, 2], np.int64)
    offsets = np.array([0, 3, 7], np.int64)
    stamps = np.arange(7, dtype=np.float64)
    content = prepared_files.FolderContent(
        Vocabulary(tuple(f"i{i}" for i in range(5))),
        ["a", "b"],
        offsets,
        lambda: [items[:4], items[4:]],
        (lambda: [stamps[:2], stamps[2:]]) if timed else None,
    )
    prepared_files._write_sequences(tmp_path / "s.safetensors", content)
    tensors = {"items": items.astype(np.int64 if wide else np.int32), "offsets": offsets}
    if timed:
        tensors["timestamps"] = stamps
    expected = save(tensors, metadata={"schema": "fishrec.sequences/1"})
    assert (tmp_path / "s.safetensors").read_bytes() == expected


def test_a_csv_read_in_chunks_is_the_csv_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [f"u{i % 97},i{i % 13},{1000 + i}" for i in range(3000)]
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress(("user,item,timestamp\n" + "\n".join(rows) + "\n").encode()))
    whole = read_interactions(path)
    monkeypatch.setattr(table_readers, "CHUNK_BYTES", 4096)
    chunks = list(table_readers.read_csv(path, table_readers.ColumnNames(), None))
    assert len(chunks) > 5
    assert np.concatenate([c.users for c in chunks]).tolist() == whole.users.tolist()
    assert np.concatenate([c.timestamps for c in chunks]).tolist() == whole.timestamps.tolist()


def test_a_late_error_names_its_line_and_a_late_refusal_loses_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(table_readers, "CHUNK_BYTES", 4096)
    rows = [f"u{i},i{i % 7},{i}" for i in range(2000)]
    path = tmp_path / "log.csv"
    path.write_text("user,item,timestamp\n" + "\n".join([*rows, "u9,i1,soon"]) + "\n")
    with pytest.raises(DataError, match=r"log\.csv: line 2002: expected a timestamp"):
        prepare(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    # pyarrow gives two chunks, then refuses (as it may, say, a value it cannot convert):
    # the exact reader reads the file again and yields only the rows not yet given.
    path.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    convert = table_readers._arrow_timestamps
    calls = iter(range(1000))

    def refuse_third(path: Path, column: object) -> np.ndarray:
        if next(calls) == 2:
            raise table_readers._ExactReaderNeeded
        return convert(path, column)

    monkeypatch.setattr(table_readers, "_arrow_timestamps", refuse_third)
    chunks = list(table_readers.read_csv(path, table_readers.ColumnNames(), None))
    assert len(chunks) == 3
    log = np.concatenate([c.users for c in chunks])
    assert log.tolist() == [f"u{i}" for i in range(2000)]
    assert np.concatenate([c.timestamps for c in chunks]).tolist() == list(range(2000))


def test_parquet_is_read_in_chunks_and_a_null_names_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(table_readers, "CHUNK_ROWS", 100)
    users = [f"u{i % 31}" for i in range(1000)]
    items = [f"i{i % 17}" for i in range(1000)]
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user": users, "item": items, "timestamp": list(range(1000))}), path)
    meta = prepare(path, tmp_path / "out")
    assert (meta["num_users"], meta["num_items"], meta["num_interactions"]) == (31, 17, 1000)
    assert meta["fingerprint"] == build_sequences(read_interactions(path)).fingerprint
    items[750] = None
    pq.write_table(pa.table({"user": users, "item": items, "timestamp": list(range(1000))}), path)
    with pytest.raises(DataError, match="row 751: expected a value in column 'item'"):
        prepare(path, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_ids_that_are_not_strings_are_numbered_row_by_row_the_same_way() -> None:
    as_text = build_sequences(
        Interactions(
            np.array(["7", "5", "7"], dtype=object), np.array(["a", "b", "c"], dtype=object), None
        )
    )
    as_numbers = build_sequences(
        Interactions(
            np.array([7, 5, 7], dtype=object), np.array(["a", "b", "c"], dtype=object), None
        )
    )
    assert as_numbers.fingerprint == as_text.fingerprint
    assert named(as_numbers) == (["7", "5"], [["a", "c"], ["b"]])
