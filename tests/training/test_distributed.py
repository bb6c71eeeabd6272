"""Data-parallel training on Ray Train: 2 workers on the session's local Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import tiny_experiment
from training.distributed import FAULT_DIR, RAY_TRAIN_DIR
from training.run import train
from training.run_folder import load_run_checkpoint

# Real Ray runs of the job: minutes, so outside the inner loop (pytest -m "not slow").
pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def distributed(epochs: int, workers: int = 2):  # type: ignore[no-untyped-def]
    return tiny_experiment(
        train__epochs=epochs, train__workers=workers, train__num_threads=1, train__max_failures=1
    )


def test_two_workers_survive_a_dead_worker_and_resume(
    small_data, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "ddp"
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(FAULT_DIR, str(faults))
    result = train(distributed(epochs=2), small_data, run)
    # Rank 1 died after epoch 1; Ray Train restarted the group from its checkpoint,
    # so epoch 1 was not trained again.
    assert (faults / "rank1-died").exists()
    assert (faults / "epochs").read_text().split() == ["1", "2"]
    assert [e["epoch"] for e in result.history] == [1, 2]
    assert all(e["workers"] == 2 for e in result.history)
    assert list((run / RAY_TRAIN_DIR).rglob("checkpoint.json"))
    # The run folder is a run like any other: same files, same metrics document.
    for name in ("best", "last", "config.yaml", "history.json", "metrics.json"):
        assert (run / name).exists(), name
    single = json.loads((trained_run / "metrics.json").read_text())
    assert result.metrics.keys() == single.keys()
    assert result.metrics["model"]["test"].keys() == single["model"]["test"].keys()
    model = load_run_checkpoint(run).model
    assert model.config == load_run_checkpoint(trained_run).model.config
    # It learned: above MostPop on validation (the untrained model is far below).
    assert result.best_score > result.metrics["mostpop"]["valid"]["full"]["ndcg@10"]
    # --resume continues the same run folder for one more epoch.
    monkeypatch.delenv(FAULT_DIR)
    before = load_file(str(run / "last" / "model.safetensors"))
    resumed = train(distributed(epochs=3), small_data, run, resume=True)
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]
    after = load_file(str(run / "last" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_zero_cpu_ray_task_drives_the_workers(small_data, tmp_path: Path) -> None:
    # What the merge job does for a stage with train.workers > 1: the stage's task
    # holds no CPU, so the workers can take both of the cluster's CPUs. The stage
    # trains under sampled softmax with sparse item rows: DDP all-reduces the
    # table's sparse gradients (only the rows a step touched).
    import ray

    config = tiny_experiment(
        train__epochs=1,
        train__workers=2,
        train__num_threads=1,
        train__sparse_items=True,
        recipe__params={"negatives": 64},
    )
    task = ray.remote(train).options(num_cpus=0)
    result = ray.get(task.remote(config, small_data, tmp_path / "stage"), timeout=300)
    assert result.best_epoch == 1 and (tmp_path / "stage" / "best" / "checkpoint.json").is_file()
    assert result.history[0]["workers"] == 2 and math.isfinite(result.history[0]["loss"])
