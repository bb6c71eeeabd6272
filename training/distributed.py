"""Data-parallel training of one model on Ray Train (`train.workers: N > 1`).

A `TorchTrainer` starts N workers (gloo on CPU, nccl on GPU), each running the
ordinary `Trainer` loop with a `Parallel` place: every rank draws the same
seeded global batches and trains on its share of the rows of each
(`batch_size / N`), and DDP averages the gradients, so one optimiser step sees
the same global batch as a single worker would. Rank 0 validates, early-stops
for everyone and writes the run folder in the usual format (best/, last/,
history.json, metrics.json): evaluation, Fisher, merging and export read a
data-parallel run like any other.

Checkpoints: after every epoch rank 0 writes last/ and reports it to Ray
Train, which keeps the newest copy under `<run>/ray-train/`. When a worker
dies, Ray Train restarts the group (`train.max_failures` times) and every rank
continues from the newest of the two; `--resume` (and the pipeline's stage
resume) continue from last/ of the run folder as for a single worker. On a multi-node cluster the run folder
must be on storage every node sees (as Ray Train's own storage path must be).

What differs from one worker, by design: contrastive recipes draw their
in-batch negatives from the rank's rows only (batch_size / N of them), and each
rank draws its own masks and dropout.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from training.config import ExperimentConfig
from training.data_parallel import Parallel
from training.run_folder import LAST
from training.sequence_data import SequenceData
from training.trainer import SELECTION_METRIC, Trainer, TrainResult
from training.transfer import Transfer

log = logging.getLogger(__name__)

RAY_TRAIN_DIR = "ray-train"  # inside the run folder: Ray Train's storage of this run
# Fault injection for resilience tests: when this names a folder, rank 0 notes
# each epoch it finished in `epochs`, and rank 1 dies once after its first epoch
# (leaving `rank1-died`).
FAULT_DIR = "FISHREC_TRAIN_FAULT_DIR"


def train_distributed(
    config: ExperimentConfig, data: SequenceData, run_dir: Path, **start: Any
) -> TrainResult:
    """`training.run.train` with `config.train.workers` Ray Train workers.

    `start`: train's init, resume and transfer (on_epoch callbacks cannot run in
    the workers' processes).
    """
    init: Path | None = start.get("init")
    resume: bool = start.get("resume", False)
    transfer: Transfer | None = start.get("transfer")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = config.train
    run_dir = Path(run_dir).resolve()
    use_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    threads = cfg.num_threads or 1
    started = not ray.is_initialized()
    if started:  # a laptop run; RAY_ADDRESS (or `ray start`) joins an existing cluster
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    try:
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={
                "config": config.model_dump(mode="json"),
                "data": ray.put(data),
                "run_dir": str(run_dir),
                "init": str(init) if init else None,
                "resume": resume,
                "transfer": transfer,
                "threads": threads,
                "token": uuid.uuid4().hex,  # tells a restarted worker group from a new one
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": threads}
            ),
            run_config=RunConfig(
                name="train",
                storage_path=str(run_dir / RAY_TRAIN_DIR),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                worker_runtime_env={"env_vars": {FAULT_DIR: os.environ[FAULT_DIR]}}
                if FAULT_DIR in os.environ
                else None,
            ),
        )
        log.info("training on %d Ray Train workers x %d threads", cfg.workers, threads)
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return read_result(run_dir)


def read_result(run_dir: Path) -> TrainResult:
    """The result of a finished run, from the files rank 0 wrote."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    best_epoch = metrics["best_epoch"]
    setting, metric = SELECTION_METRIC
    scores = [
        e["valid"][setting][metric] for e in history if e["epoch"] == best_epoch and "valid" in e
    ]
    return TrainResult(run_dir, best_epoch, scores[0] if scores else -1.0, metrics, history)


def _worker_loop(loop: dict[str, Any]) -> None:
    """One rank of the run (runs in a Ray Train worker)."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    parallel = Parallel(context.get_world_rank(), context.get_world_size())
    torch.set_num_threads(loop["threads"])
    values = loop["config"]
    # Each rank computes on the device Ray Train gave it (its GPU, or the CPU).
    values["train"]["device"] = str(ray.train.torch.get_device())
    config = ExperimentConfig.model_validate(values)
    run_dir = Path(loop["run_dir"])

    def report(entry: dict[str, Any]) -> None:
        # A collective: every rank reports each epoch, rank 0 with last/.
        checkpoint = (
            ray.train.Checkpoint.from_directory(run_dir / LAST) if parallel.writer else None
        )
        metrics = {k: v for k, v in entry.items() if isinstance(v, int | float)}
        ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False)
        _fault_hook(parallel, entry["epoch"])

    trainer = Trainer(
        config,
        ray.get(loop["data"]),
        run_dir,
        init=Path(loop["init"]) if loop["init"] else None,
        on_epoch=report,
        transfer=loop["transfer"],
        parallel=parallel,
    )
    # Rank 0 decides where every rank continues from, so that they all agree.
    folder = parallel.from_writer(
        restart_folder(run_dir, loop["token"]) if parallel.writer else None
    )
    if folder is None:
        trainer.fit(resume=loop["resume"])
        return
    log.info("rank %d continues from %s", parallel.rank, folder)
    trainer.fit(restore=Path(folder))


def restart_folder(run_dir: Path, token: str) -> str | None:
    """On a restart of the worker group: the newest copy of last/ to continue from.

    The first attempt of a `fit` leaves a marker named by its token; finding it
    means Ray Train restarted the group after a failure. last/ of the run folder
    is then the newest state (Ray Train's copy lags when the failure came right
    after a report); Ray Train's checkpoint, downloaded, serves when rank 0 now
    runs where the run folder is not.
    """
    import ray.train

    marker = run_dir / RAY_TRAIN_DIR / f"attempt-{token}"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return None
    last = run_dir / LAST / "checkpoint.json"
    if last.is_file() and last.stat().st_mtime >= marker.stat().st_mtime:  # this fit's own
        return str(run_dir / LAST)
    reported = ray.train.get_checkpoint()
    if reported is None:
        return None  # it died before its first epoch ended: start again
    return reported.to_directory(str(run_dir / RAY_TRAIN_DIR / "restored"))


def _fault_hook(parallel: Parallel, epoch: int) -> None:
    """The injected fault (FISHREC_TRAIN_FAULT_DIR): rank 1 dies once."""
    folder = os.environ.get(FAULT_DIR)
    if folder and parallel.writer:
        with open(Path(folder) / "epochs", "a") as notes:
            notes.write(f"{epoch}\n")
    if not folder or parallel.rank != 1 or (Path(folder) / "rank1-died").exists():
        return
    (Path(folder) / "rank1-died").write_text("died once\n")
    log.warning("injected fault: rank 1 exits now")
    time.sleep(1.0)  # rank 0 notes its epoch first
    os._exit(17)
