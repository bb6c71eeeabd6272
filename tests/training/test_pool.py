"""Pool strategies: population training on Ray actors, spawning, the strategy config."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tests.support import tiny_experiment
from training.pool import POOL_STRATEGIES, PoolConfig
from training.population import (
    MemberSpec,
    exchange_pull,
    population_mean,
    scheduled_pull,
    train_population,
)
from training.prepare import load_data
from training.run import train
from training.run_folder import LAST, load_run_checkpoint
from training.sequence_data import SequenceData


@pytest.fixture(autouse=True)
def keep_threads():  # type: ignore[no-untyped-def]
    """In-process runs below use one thread (as the actors): the session's count comes back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# Population training on Ray actors: outside the inner loop (pytest -m "not slow").
pytestmark = pytest.mark.slow


def member(name: str, folder: Path, seed: int, init: Path | None = None, **train) -> MemberSpec:  # type: ignore[no-untyped-def]
    overrides = {"train__seed": seed, "train__num_threads": 1, **train}
    experiment = tiny_experiment(**overrides).model_dump(mode="json")
    return MemberSpec(name, experiment, str(folder / name), str(init) if init else None)


def loader(folder: Path):  # type: ignore[no-untyped-def]
    return functools.partial(load_data, folder)


def weights(run: Path, last: bool = False) -> dict[str, torch.Tensor]:
    return load_run_checkpoint(run / LAST if last else run).model.state_dict()


def test_pull_zero_is_independent_training_bit_for_bit(
    ray_local, small_data: SequenceData, small_data_dir: Path, tmp_path: Path
) -> None:
    specs = [member("a", tmp_path, seed=3), member("b", tmp_path, seed=4)]
    results = train_population(specs, loader(small_data_dir), pull=0.0, exchange_every=3)
    alone = train(
        tiny_experiment(train__seed=3, train__num_threads=1), small_data, tmp_path / "alone"
    )
    together, reference = (
        weights(Path(results["a"]["run_dir"]), True),
        weights(alone.run_dir / LAST),
    )
    assert together.keys() == reference.keys()
    for name in reference:
        assert torch.equal(together[name], reference[name]), name
    assert results["a"]["best_epoch"] == alone.best_epoch
    assert not torch.equal(
        together["item_embedding.weight"],
        weights(Path(results["b"]["run_dir"]), True)["item_embedding.weight"],
    )


def test_a_pull_per_epoch_replaces_the_pull_per_exchange(
    ray_local, small_data_dir: Path, tmp_path: Path
) -> None:
    """pull_per_epoch 0 overrides a strong pull: independent training again, bit for bit."""
    specs = [member("a", tmp_path / "p", seed=3), member("b", tmp_path / "p", seed=4)]
    train_population(specs, loader(small_data_dir), pull=0.5, exchange_every=3, pull_per_epoch=0.0)
    alone = [member("a", tmp_path / "q", seed=3), member("b", tmp_path / "q", seed=4)]
    train_population(alone, loader(small_data_dir), pull=0.0, exchange_every=3)
    for name in ("a", "b"):
        got, want = weights(tmp_path / "p" / name, True), weights(tmp_path / "q" / name, True)
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_full_pull_makes_members_one_model(ray_local, small_data_dir: Path, tmp_path: Path) -> None:
    """Pull 1 replaces every member by the mean at each exchange: after the last one they agree."""
    specs = [member("a", tmp_path, seed=3), member("b", tmp_path, seed=4)]
    train_population(specs, loader(small_data_dir), pull=1.0, exchange_every=1)
    a, b = (weights(tmp_path / name, last=True) for name in ("a", "b"))
    # last/ is written at the epoch's end, after the exchange that followed its last step.
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_a_gentle_pull_brings_members_closer(
    ray_local, small_data_dir: Path, tmp_path: Path
) -> None:
    def distance(folder: Path, pull: float) -> float:
        specs = [member("a", folder, seed=3), member("b", folder, seed=4)]
        train_population(specs, loader(small_data_dir), pull=pull, exchange_every=2)
        a, b = (weights(folder / name, last=True) for name in ("a", "b"))
        return float(sum(((a[k] - b[k]) ** 2).sum() for k in a if a[k].is_floating_point()))

    assert distance(tmp_path / "pulled", 0.2) < 0.5 * distance(tmp_path / "free", 0.0)


def test_a_decaying_pull_leaves_members_further_apart_than_a_constant_one(
    ray_local, small_data_dir: Path, tmp_path: Path
) -> None:
    def distance(folder: Path, schedule: str) -> float:
        specs = [member("a", folder, seed=3), member("b", folder, seed=4)]
        train_population(
            specs, loader(small_data_dir), pull=0.5, exchange_every=2, pull_schedule=schedule
        )
        a, b = (weights(folder / name, last=True) for name in ("a", "b"))
        return float(sum(((a[k] - b[k]) ** 2).sum() for k in a if a[k].is_floating_point()))

    # The cosine pull is strong only early: by the end the members drift apart again.
    assert distance(tmp_path / "cosine", "cosine") > 2 * distance(tmp_path / "constant", "constant")
    with pytest.raises(ValueError, match="unknown pull schedule"):
        specs = [member("a", tmp_path / "x", seed=3), member("b", tmp_path / "x", seed=4)]
        train_population(specs, loader(small_data_dir), 0.5, 2, pull_schedule="sawtooth")


def test_scheduled_pull_decays_along_a_half_cosine() -> None:
    assert scheduled_pull(0.05, "constant", 0.7) == 0.05
    assert scheduled_pull(0.05, "cosine", 0.0) == pytest.approx(0.05)
    assert scheduled_pull(0.05, "cosine", 0.5) == pytest.approx(0.025)
    assert scheduled_pull(0.05, "cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_pull(0.05, "cosine", 1.3) == pytest.approx(0.0, abs=1e-12)


def test_exchange_pull_compounds_to_the_pull_per_epoch() -> None:
    # Beauty: 175 steps per epoch, an exchange every 10 -> 17.5 exchanges compound to 16%.
    per_exchange = exchange_pull(0.16, 175, 10)
    assert per_exchange == pytest.approx(0.00991, abs=1e-4)
    assert 1 - (1 - per_exchange) ** 17.5 == pytest.approx(0.16)
    # ML-1M's 48 steps need a stronger pull per exchange for the same per-epoch pull.
    assert exchange_pull(0.16, 48, 10) > 3 * per_exchange
    assert exchange_pull(0.0, 48, 10) == 0.0
    assert exchange_pull(0.3, 5, 10) == pytest.approx(0.3)  # fewer steps than one exchange
    with pytest.raises(ValueError):
        exchange_pull(1.0, 48, 10)
    with pytest.raises(ValidationError):
        PoolConfig(strategy="population", pull_per_epoch=1.0)


def test_population_mean_is_the_elementwise_mean() -> None:
    import numpy as np

    mean = population_mean([{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 6.0])}])
    assert mean["w"].tolist() == [2.0, 4.0]


def test_members_must_take_the_same_steps_per_epoch(
    ray_local, small_data_dir: Path, tmp_path: Path
) -> None:
    specs = [member("a", tmp_path, seed=3), member("b", tmp_path, seed=4, train__batch_size=32)]
    with pytest.raises(ValueError, match="different numbers of steps"):
        train_population(specs, loader(small_data_dir), pull=0.1, exchange_every=2)


def test_spawning_at_the_last_epoch_equals_the_finetune_setting(
    ray_local, small_data: SequenceData, small_data_dir: Path, tmp_path: Path
) -> None:
    """A member spawned from the shared run's last epoch is the fine-tune of that run.

    The shared run validates only at its end, so its best/ (what finetune starts
    from) is its last epoch (what spawn starts from).
    """
    shared = train(tiny_experiment(train__eval_every=99), small_data, tmp_path / "shared")
    assert shared.best_epoch == 2
    spawn = PoolConfig(strategy="spawn", spawn_epoch=2)
    finetune = PoolConfig(strategy="finetune")
    assert spawn.base_epochs(2) == finetune.base_epochs(2) == 2
    start = spawn.member_start(shared.run_dir)
    assert start == shared.run_dir / LAST
    spawned = train_population(
        [member("m", tmp_path / "spawn", seed=7, init=start)], loader(small_data_dir), 0.0, 5
    )
    tuned = train(
        tiny_experiment(train__seed=7, train__num_threads=1),
        small_data,
        tmp_path / "finetune",
        init=finetune.member_start(shared.run_dir),
    )
    a, b = weights(Path(spawned["m"]["run_dir"])), weights(tuned.run_dir)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_spawn_at_zero_shares_only_the_initialisation(
    small_data: SequenceData, tmp_path: Path
) -> None:
    shared = train(tiny_experiment(train__epochs=0), small_data, tmp_path / "shared-0")
    start = PoolConfig(strategy="spawn", spawn_epoch=0).member_start(shared.run_dir)
    assert start == shared.run_dir  # no last/: best/ holds the initial model
    initial = weights(shared.run_dir)
    from training.model import ModelConfig, build_model

    spec = tiny_experiment().model.model_dump()
    fresh = build_model(
        ModelConfig(num_items=small_data.num_items, **{**spec, "feature_dim": 0}), seed=0
    )
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(initial[name], tensor), name


def test_a_shared_initialisation_is_one_initial_model_whatever_the_seed(
    small_data: SequenceData, tmp_path: Path
) -> None:
    """train.init_seed (pool.shared_init): members start as one model, no permutation apart."""

    def initial(seed: int, init_seed: int | None) -> dict[str, torch.Tensor]:
        cfg = tiny_experiment(train__epochs=0, train__seed=seed, train__init_seed=init_seed)
        return weights(train(cfg, small_data, tmp_path / f"{seed}-{init_seed}").run_dir)

    shared_a, shared_b = initial(3, 7), initial(4, 7)
    for name in shared_a:
        assert torch.equal(shared_a[name], shared_b[name]), name
    own_a, own_b = initial(3, None), initial(4, None)
    assert not torch.equal(own_a["item_embedding.weight"], own_b["item_embedding.weight"])
    pool = PoolConfig(strategy="population", shared_init=True)
    assert pool.member_init_seed(7) == 7
    assert PoolConfig(strategy="population").member_init_seed(7) is None
    assert PoolConfig(strategy="scratch", shared_init=True).member_init_seed(7) is None


def test_pool_config_validates_and_covers_the_registry() -> None:
    for name in POOL_STRATEGIES:
        PoolConfig(strategy=name)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PoolConfig(strategy="nearby")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PoolConfig(strategy="population", pull=1.5)
    assert PoolConfig(strategy="scratch").base_epochs(30) is None
    assert PoolConfig(strategy="finetune").member_lr(1e-3, 3e-4) == 3e-4
    assert PoolConfig(strategy="spawn").member_lr(1e-3, 3e-4) == 1e-3
