"""training.synthetic: determinism, size, and enough sequential signal to be worth modelling."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydantic
import pytest

from merging.main import main
from training.interactions import Interactions
from training.prepare import build_sequences, load_data
from training.readers import read_log
from training.sequence_data import SequenceData
from training.splits import Split
from training.synthetic import SyntheticConfig, generate
from training.synthetic_log import generate_chunks, write_parquet

# The default data set, pinned: refactors of the generator must not change it. (A numpy
# release that changes Generator streams would, and the pin is then updated knowingly.)
DEFAULT_FINGERPRINT = "sha256:12c9b268eeba0a943fe679c6928d14ded922aac466358e8655ea1846934916ca"
# Small enough for tests, large enough that every chunk has varied lengths.
SMALL = SyntheticConfig(num_users=300, num_items=2000, num_topics=8)


@pytest.fixture(scope="module")
def default_data() -> tuple[SequenceData, float]:
    """The default data set and the seconds its generation took, shared by the tests."""
    started = time.perf_counter()
    data = generate()
    return data, time.perf_counter() - started


def ndcg_at_10(split: Split, scores_of: Callable[[np.ndarray], np.ndarray]) -> float:
    """Mean NDCG@10 on the test split: full ranking over all items, history items excluded."""
    total = 0.0
    for history, target in zip(split.test.histories, split.test.targets, strict=True):
        scores = np.array(scores_of(history), dtype=np.float64)  # (num_items + 1,)
        scores[0] = -np.inf
        scores[history] = -np.inf
        if np.isfinite(scores[target]):  # a repeated target cannot be recommended
            rank = int((scores > scores[target]).sum())
            total += 1.0 / np.log2(rank + 2) if rank < 10 else 0.0
    return total / len(split.test.targets)


def transition_counts(split: Split) -> np.ndarray:
    """(V, V) counts of item a followed by item b in the training sequences."""
    counts = np.zeros((split.num_items + 1, split.num_items + 1))
    for seq in split.train:
        np.add.at(counts, (seq[:-1], seq[1:]), 1.0)
    return counts


def test_default_size_and_speed(default_data: tuple[SequenceData, float]) -> None:
    data, seconds = default_data
    lengths = np.array([len(seq) for seq in data.sequences])
    assert data.num_users == 3000
    assert 1000 <= data.num_items <= 1500
    assert 35 <= lengths.mean() <= 45 and lengths.min() >= 5 and lengths.max() <= 100
    assert seconds < 3.0
    assert data.users[0] == "u1" and all(item.startswith("i") for item in data.vocab.items)
    assert data.meta["synthetic"]["seed"] == 0
    assert data.fingerprint == DEFAULT_FINGERPRINT


def test_few_repeats(default_data: tuple[SequenceData, float]) -> None:
    data, _ = default_data
    repeats = sum(len(seq) - len(np.unique(seq)) for seq in data.sequences)
    assert repeats / data.num_interactions < 0.03


def test_deterministic_in_the_seed() -> None:
    small = SyntheticConfig(num_users=200, num_items=300, num_topics=10)
    first, again = generate(small), generate(small)
    assert first.fingerprint == again.fingerprint
    other = generate(small.model_copy(update={"seed": 1}))
    assert other.fingerprint != first.fingerprint


def test_markov_beats_most_popular_by_far(default_data: tuple[SequenceData, float]) -> None:
    data, _ = default_data
    split = data.split()
    popularity = split.popularity.astype(np.float64)
    counts = transition_counts(split)
    most_pop = ndcg_at_10(split, lambda history: popularity)
    # Transitions from the last item; popularity only breaks ties among unseen pairs.
    markov = ndcg_at_10(split, lambda history: counts[history[-1]] + 1e-6 * popularity)
    assert most_pop > 0.02  # popularity carries signal too (Zipf)
    assert markov >= 2.0 * most_pop, (markov, most_pop)


def test_config_is_validated_and_frozen() -> None:
    with pytest.raises(pydantic.ValidationError, match="must not exceed 1"):
        SyntheticConfig(p_successor=0.6, p_recent_topic=0.5)
    with pytest.raises(pydantic.ValidationError, match="mean_length"):
        SyntheticConfig(mean_length=200)
    with pytest.raises(pydantic.ValidationError):
        SyntheticConfig(num_user=5)  # a typo is an error, not ignored
    with pytest.raises(pydantic.ValidationError):
        SyntheticConfig().seed = 3  # type: ignore[misc]
    assert all(field.description for field in SyntheticConfig.model_fields.values())


# ---- the streamed Parquet log --------------------------------------------------------


def parquet_contents(folder: Path) -> dict[str, list[dict[str, object]]]:
    import pyarrow.parquet as pq

    return {path.name: pq.read_table(path).to_pylist() for path in sorted(folder.iterdir())}


def test_parquet_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = write_parquet(SMALL, tmp_path / "a", chunk_users=128)
    write_parquet(SMALL, tmp_path / "b", chunk_users=128)
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert first.files == 3 and names == [f"part-0000{i}.parquet" for i in range(3)]
    for name in names:  # byte for byte: no clock or path inside the files
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_parquet(SMALL.model_copy(update={"seed": 1}), tmp_path / "c", chunk_users=128)
    contents = parquet_contents(tmp_path / "a")
    assert contents.keys() == parquet_contents(tmp_path / "c").keys()
    assert all(contents[n] != parquet_contents(tmp_path / "c")[n] for n in names)


def test_parquet_memory_is_bounded_by_the_chunk(tmp_path: Path) -> None:
    """4x the users at the same chunk size: the same Python/numpy peak and Arrow footprint."""
    import pyarrow as pa

    def config(num_users: int) -> SyntheticConfig:
        return SyntheticConfig(num_users=num_users, num_items=1000, num_topics=10)

    def measure(num_users: int) -> tuple[int, list[int], list[int]]:
        """tracemalloc's peak, then per chunk: memory still held, Arrow's (untraced) bytes."""
        held: list[int] = []
        arrow: list[int] = []

        def sample(_: int) -> None:
            held.append(tracemalloc.get_traced_memory()[0] - base)
            arrow.append(pa.total_allocated_bytes())

        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            write_parquet(config(num_users), tmp_path / str(num_users), 100, progress=sample)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        return peak, held, arrow

    write_parquet(config(100), tmp_path / "warm-up", 100)  # lazy imports are not the chunk's
    small_peak, _, small_arrow = measure(200)
    large_peak, held, large_arrow = measure(800)
    # Keeping the 800 users' sequences (or tables) to the end would double these.
    assert large_peak < 1.25 * small_peak, (small_peak, large_peak)
    assert max(held) < 1.25 * held[0], held
    assert max(large_arrow) < 1.25 * max(small_arrow) + 65536, (small_arrow, large_arrow)


def test_parquet_log_is_read_and_prepared(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log_dir, prepared = tmp_path / "log", tmp_path / "prepared"
    overrides = ["--set", "num_users=300", "--set", "num_items=2000", "--set", "num_topics=8"]
    argv = ["data", "synthetic", "--output", str(log_dir), "--parquet", "--chunk-users", "128"]
    assert main([*argv, "--no-progress", *overrides]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "300 users" in summary and "3 Parquet files" in summary and summary.endswith(" s")
    interactions, formats = read_log(log_dir)
    assert formats == ["parquet"] * 3
    assert interactions.users[0] == "u1" and interactions.items[0].startswith("i")
    assert main(["data", "prepare", "--input", str(log_dir), "--output", str(prepared)]) == 0
    data = load_data(prepared)
    expected = write_parquet(SMALL, tmp_path / "again", chunk_users=128)
    assert data.users == tuple(f"u{n}" for n in range(1, 301))  # every user, in order
    assert (data.num_items, data.num_interactions) == (expected.items, expected.rows)
    assert data.timestamps is not None
    assert all((np.diff(stamps) > 0).all() for stamps in data.timestamps)
    lengths = np.array([len(seq) for seq in data.sequences])
    assert lengths.min() >= SMALL.min_length and lengths.max() <= SMALL.max_length


def test_streamed_users_keep_the_signal() -> None:
    """Chunks skip the lockstep's surplus draws, yet come from the same model."""
    chunks = list(generate_chunks(SyntheticConfig(), chunk_users=1000))
    items = np.concatenate([chunk.items for chunk in chunks])
    lengths = np.concatenate([chunk.lengths for chunk in chunks])
    stamps = np.concatenate([chunk.timestamps for chunk in chunks]).astype(np.float64)
    users = np.repeat(np.array([f"u{n}" for n in range(1, 3001)], dtype=object), lengths)
    names = np.array([f"i{n}" for n in range(1, 1201)], dtype=object)
    streamed = build_sequences(Interactions(users, names[items], stamps))
    assert abs(lengths.mean() - 40) < 2.0 and streamed.num_users == 3000
    repeats = sum(len(seq) - len(np.unique(seq)) for seq in streamed.sequences)
    assert repeats / streamed.num_interactions < 0.03
    split = streamed.split()
    counts = transition_counts(split)
    popularity = split.popularity.astype(np.float64)
    most_pop = ndcg_at_10(split, lambda history: popularity)
    markov = ndcg_at_10(split, lambda history: counts[history[-1]] + 1e-6 * popularity)
    assert markov >= 2.0 * most_pop, (markov, most_pop)


def test_bad_chunk_size_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "log"
    with pytest.raises(ValueError, match="chunk_users must be a positive number of users, got 0"):
        write_parquet(SMALL, out, chunk_users=0)
    argv = ["data", "synthetic", "--output", str(out), "--no-progress"]
    assert main([*argv, "--parquet", "--chunk-users", "0"]) == 2
    assert "--chunk-users must be at least 1, got 0" in capsys.readouterr().err
    assert main([*argv, "--chunk-users", "10"]) == 2
    assert "--chunk-users needs --parquet" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_log(tmp_path: Path) -> None:
    out = tmp_path / "log"
    write_parquet(SMALL, out, chunk_users=300)
    before = parquet_contents(out)

    def crash(_: int) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_parquet(SMALL.model_copy(update={"seed": 5}), out, chunk_users=100, progress=crash)
    assert parquet_contents(out) == before
    assert [path.name for path in tmp_path.iterdir()] == ["log"]  # no staging folder left
