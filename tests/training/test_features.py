"""Item text readers, encoders, the encoding cache and the feature file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from merging.main import main
from tests.modality_support import write_features
from training.data_error import DataError
from training.item_features import (
    FEATURES_FILE,
    ItemFeatures,
    build_item_features,
    load_item_features,
    vocabulary_digest,
)
from training.item_text import detect_text_format, read_id_map, read_item_texts
from training.sequence_data import SequenceData
from training.text_encoders import HashingEncoder, encode_texts
from training.vocabulary import Vocabulary

MOVIES = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
    "5::Misérables, Les (1995)::Drama|Musical\n"
).encode("iso-8859-1")
ML100K = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Children's Comedy\n"
    "11\tGoldenEye\t1995\tAction Adventure Thriller\n"
)


class CountingEncoder(HashingEncoder):
    """The hashing encoder, counting the texts it is asked to encode."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__(dim)
        self.encoded: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.encoded.extend(texts)
        return super().encode(texts)


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# ---- readers ---------------------------------------------------------------------------------


def test_movielens_titles_and_genres_in_iso_8859_1(tmp_path: Path) -> None:
    texts = read_item_texts(write(tmp_path / "movies.dat", MOVIES))
    assert texts.format == "movielens"
    assert texts.texts["1"] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert texts.texts["5"] == "Misérables, Les (1995). Genres: Drama, Musical."


def test_recbole_item_file_gives_the_same_text_as_movielens(tmp_path: Path) -> None:
    ml100k = read_item_texts(write(tmp_path / "ml-100k.item", ML100K))
    ml1m = read_item_texts(write(tmp_path / "movies.dat", MOVIES))
    assert ml100k.format == "recbole"
    # The same film has the same text in both catalogues, whatever its id.
    assert ml100k.texts["10"] == ml1m.texts["1"]
    assert ml100k.texts["11"] == "GoldenEye (1995). Genres: Action, Adventure, Thriller."


def test_tsv_uses_the_last_field_and_skips_a_header(tmp_path: Path) -> None:
    amazon = "item_id\tasin\tattributes\n1\tB004756YJA\tOPI | Makeup | Nails\n2\tB0020\tSkin Care\n"
    texts = read_item_texts(write(tmp_path / "attributes.tsv", amazon))
    assert texts.format == "tsv"
    assert texts.texts == {"1": "OPI | Makeup | Nails", "2": "Skin Care"}
    plain = read_item_texts(write(tmp_path / "plain.tsv", "a\tred   shoe\n\nb\t  \n"))
    assert plain.texts == {"a": "red shoe"} and plain.empty == 1  # blank lines and texts


def test_repeated_lines_are_ignored_and_conflicts_are_errors(tmp_path: Path) -> None:
    repeated = read_item_texts(write(tmp_path / "r.tsv", "a\tred\nb\tblue\na\tred\n"))
    assert repeated.texts == {"a": "red", "b": "blue"} and repeated.repeated == 1
    with pytest.raises(DataError, match=r"line 3: item 'a' already has another text \(line 1\)"):
        read_item_texts(write(tmp_path / "c.tsv", "a\tred\nb\tblue\na\tgreen\n"))


def test_badly_encoded_and_malformed_lines_name_their_line(tmp_path: Path) -> None:
    latin = write(tmp_path / "latin.tsv", "a\tcaf\xe9\n".encode("latin-1") + b"b\tok\n")
    with pytest.raises(DataError, match=r"line 1: expected utf-8 text \(pass --encoding"):
        read_item_texts(latin)
    assert read_item_texts(latin, encoding="latin-1").texts["a"] == "café"
    with pytest.raises(DataError, match="line 2: expected MovieID::Title::Genres"):
        read_item_texts(write(tmp_path / "m.dat", "1::A (1990)::Drama\n2::broken\n"))
    with pytest.raises(DataError, match="line 1: expected item_id<TAB>text"):
        read_item_texts(write(tmp_path / "one.tsv", "no tab here\n"), "tsv")
    with pytest.raises(DataError, match="unknown item text format"):
        read_item_texts(latin, "xml")
    with pytest.raises(DataError, match="no such file"):
        read_item_texts(tmp_path / "missing.tsv")


def test_format_detection(tmp_path: Path) -> None:
    assert detect_text_format(write(tmp_path / "a", MOVIES)) == "movielens"
    assert detect_text_format(write(tmp_path / "b", ML100K)) == "recbole"
    assert detect_text_format(write(tmp_path / "c", "1\tx\n")) == "tsv"


def test_id_map(tmp_path: Path) -> None:
    mapping = read_id_map(write(tmp_path / "map.tsv", "item_id\tMovieID\n1\t3186\n2\t1721\n"))
    assert mapping == {"1": "3186", "2": "1721"}


# ---- encoding and the cache ------------------------------------------------------------------


def test_hashing_encoder_is_deterministic_and_normalised() -> None:
    encoder = HashingEncoder(64)
    a, b, c = encoder.encode(["red running shoe", "red running shoe", "blue garden chair"])
    assert np.array_equal(a, b) and abs(float(np.linalg.norm(a)) - 1.0) < 1e-6
    assert float(a @ encoder.encode(["red running boot"])[0]) > float(a @ c)


def test_cache_encodes_only_new_or_changed_texts(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    encoder = CountingEncoder()
    first = encode_texts(["red", "blue", "red"], encoder, cache, progress=False)
    assert encoder.encoded == ["red", "blue"]  # distinct texts only
    again = CountingEncoder()
    assert np.array_equal(
        encode_texts(["blue", "red"], again, cache, progress=False), first[[1, 0]]
    )
    assert again.encoded == []  # everything came from the cache
    changed = CountingEncoder()
    result = encode_texts(["red", "green"], changed, cache, progress=False)
    assert changed.encoded == ["green"]  # the changed text alone is encoded again
    assert np.array_equal(result[1], HashingEncoder(16).encode(["green"])[0])
    assert not np.array_equal(result[1], first[1])


def test_cache_of_another_encoder_is_separate(tmp_path: Path) -> None:
    encode_texts(["red"], CountingEncoder(16), tmp_path, progress=False)
    wider = CountingEncoder(32)
    assert encode_texts(["red"], wider, tmp_path, progress=False).shape == (1, 32)
    assert wider.encoded == ["red"]


# ---- the feature matrix ------------------------------------------------------------------------


def test_features_align_with_the_vocabulary_and_mask_missing_items(tmp_path: Path) -> None:
    vocab = Vocabulary(("5", "1", "99", "2"))  # 99 has no text; 5 comes first
    texts = read_item_texts(write(tmp_path / "movies.dat", MOVIES))
    encoder = HashingEncoder(16)
    features = build_item_features(vocab, texts, encoder, cache_dir=None, progress=False)
    assert features.mask.tolist() == [True, True, False, True]
    for row, item in enumerate(vocab.items):
        expected = encoder.encode([texts.texts[item]])[0] if item in texts.texts else np.zeros(16)
        assert np.array_equal(features.vectors[row], expected)
    assert features.info["items_without_text"] == 1 and features.coverage == 0.75


def test_id_map_joins_other_ids(tmp_path: Path) -> None:
    texts = read_item_texts(write(tmp_path / "movies.dat", MOVIES))
    mapping = {"a": "2", "b": "1"}
    features = build_item_features(
        Vocabulary(("a", "b")), texts, HashingEncoder(8), mapping, cache_dir=None, progress=False
    )
    assert np.array_equal(features.vectors[0], HashingEncoder(8).encode([texts.texts["2"]])[0])


def test_no_overlap_is_a_clear_error(tmp_path: Path) -> None:
    texts = read_item_texts(write(tmp_path / "movies.dat", MOVIES))
    with pytest.raises(DataError, match="no item of the data has a text"):
        build_item_features(Vocabulary(("x", "y")), texts, HashingEncoder(8), cache_dir=None)


def test_file_round_trip_checksum_and_alignment(tmp_path: Path, small_data: SequenceData) -> None:
    path = write_features(small_data, tmp_path / FEATURES_FILE, without_text=3)
    loaded = ItemFeatures.load(path, small_data.vocab)
    assert (
        loaded.num_items == small_data.num_items and loaded.mask.sum() == small_data.num_items - 3
    )
    assert loaded.vocab_sha256 == vocabulary_digest(small_data.vocab)
    with pytest.raises(DataError, match="built for another vocabulary"):
        ItemFeatures.load(path, Vocabulary(tuple(reversed(small_data.vocab.items))))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum mismatch"):
        ItemFeatures.load(path)


def test_run_features_are_found_next_to_the_data(
    tmp_path: Path, small_data: SequenceData, small_data_dir: Path
) -> None:
    with pytest.raises(DataError, match="no feature file"):
        load_item_features(str(small_data_dir), None, small_data)
    with pytest.raises(DataError, match=r"set data\.features"):
        load_item_features("synthetic", None, small_data)
    explicit = write_features(small_data, tmp_path / "f.safetensors")
    assert load_item_features("synthetic", str(explicit), small_data).dim > 0


def test_cli_writes_features_next_to_the_data(
    tmp_path: Path, small_data: SequenceData, capsys
) -> None:
    data = tmp_path / "data"
    small_data.save(data)
    texts = "\n".join(f"{item}\tthing number {item}" for item in small_data.vocab.items[:-5])
    source = write(tmp_path / "items.tsv", texts + "\n")
    argv = ["data", "features", "--data", str(data), "--input", str(source), "--encoder", "hashing"]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    features = ItemFeatures.load(data / FEATURES_FILE, small_data.vocab)
    assert (
        features.encoder == "hashing-256" and int(features.mask.sum()) == small_data.num_items - 5
    )
    assert "with text" in capsys.readouterr().out
    assert main([*argv[:-2], "--input", str(tmp_path / "none.tsv")]) == 2  # a clear error


REAL_ENCODER_CHILD = textwrap.dedent(
    """
    import json, sys
    from training.text_encoders import get_encoder, DEFAULT_ENCODER
    encoder = get_encoder(DEFAULT_ENCODER)
    vectors = encoder.encode(json.loads(sys.argv[1]))
    print(json.dumps({"name": encoder.name, "vectors": vectors.tolist()}))
    """
)


def test_the_default_encoder_runs_offline() -> None:
    texts = [
        "Toy Story (1995). Genres: Animation, Children's, Comedy.",
        "Toy Story 2 (1999). Genres: Animation, Children's, Comedy.",
        "Heat (1995). Genres: Action, Crime, Thriller.",
        "OPI | Makeup | Nails | Nail Polish",
        "",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REAL_ENCODER_CHILD, json.dumps(texts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    vectors = np.array(out["vectors"])
    assert out["name"] == "all-MiniLM-L6-v2" and vectors.shape == (5, 384)
    assert np.allclose(np.linalg.norm(vectors[:4], axis=1), 1.0, atol=1e-4)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] > similarity[0, 3]  # sequels are closest
