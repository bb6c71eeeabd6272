"""training.readers, .prepare, .sequence_data: reading, k-core, numbering, split, folder."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training.data_error import DataError
from training.interactions import ColumnNames, Interactions
from training.prepare import build_sequences, load_data, prepare
from training.readers import detect_format, read_interactions
from training.sequence_data import SequenceData
from training.vocabulary import PAD_ID, Vocabulary

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def externals(data: SequenceData) -> dict[str, list[str]]:
    """user -> external item ids, oldest first: what the reader and builder produced."""
    return {
        user: [data.vocab.external(int(i)) for i in seq]
        for user, seq in zip(data.users, data.sequences, strict=True)
    }


def interactions(rows: list[tuple[str, str]]) -> Interactions:
    users, items = zip(*rows, strict=True)
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object), None)


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --------------------------------------------------------------------------- readers

RATINGS = """\
1::10::5::300
1::11::3::100
2::10::4::50
1::12::4::100
2::13::1::40
1::11::3::100
"""


def test_ratings_sorted_by_time_with_ties_and_duplicates_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.dat", RATINGS)
    assert detect_format(path) == "ratings"
    data = load_data(path)
    # user 1: t=100 rows in file order (11, 12, 11: the duplicate is kept), then t=300.
    assert externals(data) == {"1": ["11", "12", "11", "10"], "2": ["13", "10"]}
    assert data.num_interactions == 6
    # Items numbered by first appearance, users in order of first appearance.
    assert data.vocab.items == ("11", "12", "10", "13")
    assert data.users == ("1", "2")


def test_ratings_gzip_and_blank_lines(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "ratings.dat.gz"
    path.write_bytes(gzip.compress(("\n" + RATINGS + "\n\n").encode()))
    assert detect_format(path) == "ratings"
    assert read_interactions(path).timestamps.tolist() == [300, 100, 50, 100, 40, 100]


def test_sequences_keep_file_order_and_concatenate_repeated_users(tmp_path: Path) -> None:
    path = write(tmp_path, "seq.txt", "7 3 1 2\n5  9\t3\n\n7 4\n")
    assert detect_format(path) == "sequences"
    interactions = read_interactions(path)
    assert interactions.timestamps is None
    assert externals(build_sequences(interactions)) == {"7": ["3", "1", "2", "4"], "5": ["9", "3"]}


def test_csv_extra_columns_sniffed_separator_and_iso_times(tmp_path: Path) -> None:
    text = (
        "rating,user,note,item,timestamp\n"
        '5,u1,"a, quoted note",b,2024-01-02T00:00:00Z\n'
        "3,u1,x,a,2024-01-01\n"
        "4,u2,y,a,2024-01-03T00:00:00+00:00\n"
    )
    path = write(tmp_path, "log.csv", text)
    assert detect_format(path) == "csv"
    log = read_interactions(path)
    assert log.timestamps[1] == 1704067200.0  # naive dates are UTC
    assert externals(load_data(path)) == {"u1": ["a", "b"], "u2": ["a"]}


@pytest.mark.parametrize("sep", ["\t", ";", "|"])
def test_csv_other_separators(tmp_path: Path, sep: str) -> None:
    rows = ["user item timestamp", "1 x 2", "1 y 1"]
    path = write(tmp_path, "log.txt", "\n".join(row.replace(" ", sep) for row in rows))
    assert detect_format(path) == "csv"
    assert externals(load_data(path)) == {"1": ["y", "x"]}


def test_csv_configured_columns_given_separator_and_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "uid;iid;when\n1;x;2\n1;y;1\n")
    columns = ColumnNames(user="uid", item="iid", timestamp=None)
    log = read_interactions(path, "csv", columns, sep=";")
    assert log.timestamps is None and log.items.tolist() == ["x", "y"]


def test_csv_quoted_line_breaks_gzip_by_content_and_blank_ids_trimmed(tmp_path: Path) -> None:
    text = 'user,item,note,timestamp\n" u1 ",a,"two\nlines, and a comma",2\nu1,b,x,1\n'
    path = tmp_path / "log.data"  # gzip recognised by its bytes, not the name
    path.write_bytes(gzip.compress(text.encode()))
    log = read_interactions(path, "csv")
    assert log.users.tolist() == ["u1", "u1"] and log.items.tolist() == ["a", "b"]
    assert log.timestamps.tolist() == [2.0, 1.0]


def test_tab_separated_files_keep_quotes_as_text(tmp_path: Path) -> None:
    path = write(tmp_path, "log.tsv", 'user\titem\ttimestamp\nu1\t"odd\t1\n')
    assert read_interactions(path, "csv").items.tolist() == ['"odd']


def test_errors_after_blank_lines_and_quoted_breaks_name_the_file_line(tmp_path: Path) -> None:
    # pyarrow counts rows; the exact reader behind it counts lines.
    text = 'user,item,note,timestamp\n\n1,a,"x\ny",2\n\n1,b,z,soon\n'
    path = write(tmp_path, "log.csv", text)
    with pytest.raises(DataError, match="line 6: expected a timestamp"):
        read_interactions(path)
    path = write(tmp_path, "log.csv", 'user,item,note,timestamp\n\n1,a,"x\ny",2\n\n1,b\n')
    with pytest.raises(DataError, match="line 6: expected 4 fields"):
        read_interactions(path)


def test_duplicate_header_names_still_read(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "user,item,x,x,timestamp\n1,a,0,0,2\n1,b,0,0,1\n")
    assert externals(load_data(path)) == {"1": ["b", "a"]}


def test_csv_missing_column_names_the_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "user,product,timestamp\n1,x,2\n")
    with pytest.raises(DataError, match=r"log\.csv.*item.*columns found: \['user', 'product'"):
        read_interactions(path)


def test_csv_without_header_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "log.csv", "1,2,3\n1,3,4\n")
    with pytest.raises(DataError, match="looks like data"):
        read_interactions(path)


def test_recbole_inter(tmp_path: Path) -> None:
    text = (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "196\t242\t3\t881250949\n196\t302\t3\t881250000\n186\t302\t3\t891717742\n"
    )
    path = write(tmp_path, "x.inter", text)
    assert detect_format(path) == "recbole"
    assert externals(load_data(path)) == {"196": ["302", "242"], "186": ["302"]}


def test_parquet_with_timestamp_type_and_extra_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "user": pa.array([1, 1, 2], pa.int64()),
            "item": ["b", "a", "a"],
            "timestamp": pa.array([2_000, 1_000, 5_000], pa.timestamp("ms")),
            "extra": [0.5, 0.1, 0.2],
        }
    )
    path = tmp_path / "log.bin"  # no suffix: detected by its magic bytes
    pq.write_table(table, path)
    assert detect_format(path) == "parquet"
    log = read_interactions(path)
    assert log.timestamps.tolist() == [2.0, 1.0, 5.0]
    assert externals(load_data(path)) == {"1": ["a", "b"], "2": ["a"]}
    with pytest.raises(DataError, match=r"missing \['when'\]; columns found"):
        read_interactions(path, columns=ColumnNames(timestamp="when"))


# --------------------------------------------------------------------------- malformed input

MALFORMED = [
    ("ratings.dat", "1::2::3::4\n1::2::3\n", "ratings", "line 2: expected 4 fields"),
    ("ratings.dat", "1::2::3::4\n1::2::3::soon\n", "ratings", "line 2: expected a timestamp"),
    ("seq.txt", "1 2 3\n\n4\n", "sequences", "line 3: expected 'user item"),
    ("log.csv", "user,item,timestamp\n1,2,3\n1,2\n", "csv", "line 3: expected 3 fields"),
    ("log.csv", 'user,item,timestamp\n1,2,3\n"1",2,3,4\n', "csv", "line 3: expected 3 fields"),
    ("log.csv", "user,item,timestamp\n1,2,nan\n", "csv", "line 2: expected a finite timestamp"),
    ("x.inter", "user_id:token\titem_id:token\n1\t2\t3\n", "recbole", "line 2: expected 2 fields"),
]


@pytest.mark.parametrize(("name", "text", "fmt", "message"), MALFORMED)
def test_malformed_line_names_file_line_and_expectation(
    tmp_path: Path, name: str, text: str, fmt: str, message: str
) -> None:
    path = write(tmp_path, name, text)
    output = tmp_path / "out" / "prepared"
    with pytest.raises(DataError, match=message) as error:
        prepare(path, output, fmt=fmt)
    assert str(path) in str(error.value)
    assert not output.exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "seq.txt"
    path.write_bytes(b"1 2 3\n2 \xff\xfe 4\n")
    with pytest.raises(DataError, match="line 2: expected UTF-8"):
        read_interactions(path)


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_interactions(tmp_path / "absent.csv")
    path = write(tmp_path, "one.txt", "lonely\n")
    with pytest.raises(DataError, match="line 1: cannot recognise"):
        detect_format(path)
    with pytest.raises(DataError, match="unknown format 'xml'"):
        read_interactions(path, "xml")


# --------------------------------------------------------------------------- building


def test_numbering_follows_users_then_chronology() -> None:
    data = build_sequences(interactions([("b", "x"), ("a", "y"), ("b", "z"), ("a", "x")]))
    assert data.users == ("b", "a")
    assert data.vocab.items == ("x", "z", "y")
    assert [seq.tolist() for seq in data.sequences] == [[1, 2], [3, 1]]
    assert all(seq.dtype == np.int64 for seq in data.sequences)


def test_k_core_is_iterative() -> None:
    # 2-core: item "c" (1 interaction) goes; then user "v" has 1 item left and goes;
    # then item "b" drops to 1 interaction and goes too, leaving u and w on "a".
    rows = [("u", "a"), ("u", "x"), ("v", "b"), ("v", "c"), ("w", "a"), ("w", "b")]
    rows += [("u", "x"), ("w", "a")]
    data = build_sequences(interactions(rows), k_core=2)
    assert externals(data) == {"u": ["a", "x", "x"], "w": ["a", "a"]}
    assert data.meta["k_core"] == 2 and data.meta["raw"]["interactions"] == 8
    with pytest.raises(DataError, match="nothing is left after the 5-core"):
        build_sequences(interactions(rows), k_core=5)


def test_split_on_a_hand_example() -> None:
    rows = [("u", "a"), ("u", "b"), ("u", "c"), ("u", "d"), ("s", "b"), ("s", "e")]
    rows += [("t", "a"), ("t", "e"), ("t", "a")]
    data = build_sequences(interactions(rows))  # a=1 b=2 c=3 d=4 e=5; users u, s, t
    split = data.split()
    # s has 2 items: all of them train, and it is not evaluated.
    assert [seq.tolist() for seq in split.train] == [[1, 2], [2, 5], [1]]
    assert split.valid.users.tolist() == [0, 2] and split.test.users.tolist() == [0, 2]
    assert [h.tolist() for h in split.valid.histories] == [[1, 2], [1]]
    assert split.valid.targets.tolist() == [3, 5]
    assert [h.tolist() for h in split.test.histories] == [[1, 2, 3], [1, 5]]
    assert split.test.targets.tolist() == [4, 1]
    assert [s.tolist() for s in split.test.seen] == [[1, 2, 3, 4], [1, 5]]
    assert split.popularity.tolist() == [0, 2, 2, 0, 0, 1]
    assert split.popularity.dtype == np.int64
    assert split.num_items == 5 and data.split() is split


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_ids_round_trip_and_errors(tmp_path: Path) -> None:
    vocab = Vocabulary(("x", "y", "z"))
    assert (vocab.pad_id, vocab.num_items, vocab.mask_id) == (PAD_ID, 3, 4)
    assert vocab.index("y") == 2 and vocab.external(2) == "y"
    assert vocab.encode(["z", "nope", "x", "y", "?"]) == ([3, 1, 2], ["nope", "?"])
    with pytest.raises(KeyError, match="unknown item id 'nope'"):
        vocab.index("nope")
    for internal in (0, 4):
        with pytest.raises(KeyError, match="is not an item"):
            vocab.external(internal)
    assert vocab.to_json() == {
        "schema": "fishrec.vocab/1",
        "pad_id": 0,
        "mask_id": 4,
        "num_items": 3,
        "items": ["x", "y", "z"],
    }
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    assert Vocabulary.from_json(json.loads((tmp_path / "vocab.json").read_text())) == vocab


def test_vocabulary_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="more than once"):
        Vocabulary(("x", "y", "x"))
    good = Vocabulary(("x",)).to_json()
    with pytest.raises(DataError, match="mask_id"):
        Vocabulary.from_json({**good, "mask_id": 7})
    with pytest.raises(DataError, match="schema"):
        Vocabulary.from_json({**good, "schema": "other"})
    path = write(tmp_path, "vocab.json", "{not json")
    with pytest.raises(DataError, match=r"vocab\.json: expected JSON"):
        Vocabulary.load(path)


# --------------------------------------------------------------------------- canonical folder


@pytest.fixture
def small() -> SequenceData:
    rows = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "c"), ("u2", "ü"), ("u2", "a")]
    return build_sequences(interactions(rows), source="hand", fmt="test")


def test_save_load_round_trip(tmp_path: Path, small: SequenceData) -> None:
    folder = tmp_path / "prepared"
    small.save(folder)
    assert leftovers(folder) == ["meta.json", "sequences.safetensors", "users.json", "vocab.json"]
    assert leftovers(tmp_path) == ["prepared"]
    loaded = load_data(folder)
    assert loaded.fingerprint == small.fingerprint
    assert loaded.users == small.users and loaded.vocab == small.vocab
    assert [s.tolist() for s in loaded.sequences] == [s.tolist() for s in small.sequences]
    assert all(s.dtype == np.int64 for s in loaded.sequences)
    assert loaded.meta["source"] == "hand" and loaded.meta["num_interactions"] == 6
    # The bundle's vocab.json is the Vocabulary's own format.
    assert Vocabulary.load(folder / "vocab.json") == small.vocab


def test_save_replaces_an_existing_folder(tmp_path: Path, small: SequenceData) -> None:
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    small.save(folder)
    assert "stale.txt" not in leftovers(folder)
    assert leftovers(tmp_path) == ["prepared"]


@pytest.mark.parametrize("name", ["sequences.safetensors", "vocab.json", "users.json"])
def test_corrupt_file_is_detected_by_name(tmp_path: Path, small: SequenceData, name: str) -> None:
    small.save(tmp_path / "prepared")
    path = tmp_path / "prepared" / name
    blob = bytearray(path.read_bytes())
    blob[-2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=f"{name}: sha256 differs"):
        SequenceData.load(tmp_path / "prepared")


def test_missing_files_are_errors(tmp_path: Path, small: SequenceData) -> None:
    small.save(tmp_path / "prepared")
    (tmp_path / "prepared" / "users.json").unlink()
    with pytest.raises(DataError, match=r"users\.json: missing"):
        load_data(tmp_path / "prepared")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a prepared data folder"):
        load_data(tmp_path / "empty")


def test_fingerprint_is_pinned_and_content_sensitive(small: SequenceData) -> None:
    # Pinned: the fingerprint must not change across runs, machines or versions.
    expected = "sha256:1c4654164a932f7f2a2e15d0fff173ac37fd2e1bc4f8773693ade1e69e3c4494"
    assert small.fingerprint == expected
    same = build_sequences(
        interactions([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "c"), ("u2", "ü"), ("u2", "a")])
    )
    assert same.fingerprint == small.fingerprint
    other_item = build_sequences(
        interactions([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "c"), ("u2", "ü"), ("u2", "b")])
    )
    other_user = build_sequences(
        interactions([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u3", "c"), ("u3", "ü"), ("u3", "a")])
    )
    # Same ids, different split of the items between users.
    other_cut = build_sequences(
        interactions([("u1", "a"), ("u1", "b"), ("u2", "c"), ("u2", "c"), ("u2", "ü"), ("u2", "a")])
    )
    prints = {small.fingerprint, other_item.fingerprint, other_user.fingerprint}
    assert len(prints | {other_cut.fingerprint}) == 4


def test_prepare_writes_the_folder_and_returns_its_meta(tmp_path: Path) -> None:
    path = write(tmp_path, "ratings.dat", RATINGS)
    written = prepare(path, tmp_path / "prepared", k_core=2)
    data = SequenceData.load(tmp_path / "prepared")
    # 12 and 13 go; then user 2 (one item left); then item 10 (one interaction left).
    assert externals(data) == {"1": ["11", "11"]}
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["format"] == "ratings" and meta["k_core"] == 2
    assert meta["fingerprint"] == data.fingerprint == written["fingerprint"]
    assert (written["num_users"], written["num_items"], written["num_interactions"]) == (1, 1, 2)
    assert set(meta["files"]) == {"sequences.safetensors", "vocab.json", "users.json"}


def test_reading_a_million_rows_is_fast(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    users, items = rng.integers(1, 6000, 1_000_000), rng.integers(1, 3700, 1_000_000)
    stamps = rng.integers(0, 10**9, 1_000_000)
    lines = [f"{u}::{i}::5::{t}" for u, i, t in zip(users, items, stamps, strict=True)]
    path = write(tmp_path, "ratings.dat", "\n".join(lines))
    started = time.perf_counter()
    data = load_data(path)
    assert data.num_interactions == 1_000_000
    assert time.perf_counter() - started < 10  # about 2 s on 2 cores


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared benchmark data is not here")
def test_ml1m_5core_sequence_file_keeps_its_ids() -> None:
    data = load_data(SHARED / "ml-1m" / "ml-1m_5core_iclrec_format.txt")
    assert (data.num_users, data.num_items, data.num_interactions) == (6040, 3416, 999_611)
    # The file numbers items by first appearance with users ascending, as we do.
    assert data.vocab.items == tuple(str(i) for i in range(1, 3417))
    assert len(data.split().test) == 6040


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared benchmark data is not here")
def test_ml100k_recbole_file() -> None:
    data = load_data(SHARED / "ml-100k" / "ml-100k.inter")
    assert (data.num_users, data.num_items, data.num_interactions) == (943, 1682, 100_000)


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "log.parquet"
    path.write_bytes(b"PAR1 this is not really parquet PAR1")
    with pytest.raises(DataError, match=r"log\.parquet: expected a Parquet file"):
        read_interactions(path)


def test_importing_data_pulls_in_neither_torch_nor_pyarrow() -> None:
    code = "import sys, training.prepare; print('torch' in sys.modules, 'pyarrow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "False"]


# ---- logs in several files ------------------------------------------------------------


def _partition(path: Path, rows: list[str], compress: bool = False) -> None:
    text = "user,item,timestamp\n" + "".join(f"{row}\n" for row in rows)
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def test_a_folder_of_daily_partitions_is_one_log_in_time_order(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    _partition(logs / "2026-12-01.csv", ["u1,a,100", "u2,b,101"])
    _partition(logs / "2026-12-02.csv.gz", ["u1,b,200", "u2,c,201"], compress=True)
    _partition(logs / "2026-12-03.csv", ["u1,c,300", "u1,d,50"])  # a late row: time decides
    (logs / ".partial.csv").write_text("garbage")  # hidden files are skipped
    prepare(logs, tmp_path / "out")
    data = SequenceData.load(tmp_path / "out")
    sequences = {
        user: [data.vocab.external(int(i)) for i in seq]
        for user, seq in zip(data.users, data.sequences, strict=True)
    }
    assert sequences == {"u1": ["d", "a", "b", "c"], "u2": ["b", "c"]}
    assert data.meta["format"] == "csv" and data.meta["source"] == "logs"
    # A glob picks some partitions; load_data reads a raw folder too.
    two = load_data(str(logs / "2026-12-0[12]*"))
    assert two.num_interactions == 4
    assert load_data(logs).num_interactions == 6


def test_an_error_in_one_partition_names_its_file_and_line(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    _partition(logs / "a.csv", ["u1,a,100"])
    _partition(logs / "b.csv", ["u1,b,200", "u2,c,not-a-time"])
    with pytest.raises(DataError, match=r"b\.csv: line 3"):
        prepare(logs, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_partitions_must_agree_on_timestamps_and_exist(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    _partition(logs / "a.csv", ["u1,a,100"])
    (logs / "b.txt").write_text("u1 b c\n")  # a sequence file: no timestamps
    with pytest.raises(DataError, match="timestamps in every file or in none"):
        prepare(logs, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no file"):
        prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="matches no file"):
        load_data(str(tmp_path / "nothing-*.csv"))
