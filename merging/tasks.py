"""The work of the merge job's Ray tasks, as plain functions.

Each function runs in a Ray worker (any node of the cluster): it reads its
inputs from the artifact store, works in node-local scratch, writes its outputs
back to the store and returns a small JSON-able result. They are plain
functions so that tests and a debugger can call them without Ray; the job
wraps them with `ray.remote` and the resources of the config.

Fault injection for resilience tests: when FISHREC_INJECT_FAULT names a task
label (e.g. "train/cl4srec") and the file of that label does not yet exist in
FISHREC_FAULT_DIR, the worker creates it and dies (os._exit): the first attempt
crashes, Ray's retry succeeds.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merging.store import ArtifactStore

log = logging.getLogger(__name__)

FAULT_LABEL = "FISHREC_INJECT_FAULT"
FAULT_DIR = "FISHREC_FAULT_DIR"


@dataclass(frozen=True)
class TaskContext:
    """Where a task finds the run: store root, work folder, and its thread budget."""

    store_root: str
    work: str
    threads: int = 1
    device: str = "cpu"

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_root)

    def scratch(self, name: str) -> Path:
        """A node-local folder for `name` that survives a retry on the same node."""
        store = self.store
        if store.local:
            folder = store.local_path(f"{self.work}/scratch/{name}")
        else:
            folder = (
                Path(tempfile.gettempdir()) / "fishrec-scratch" / self.work.replace("/", "_") / name
            )
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def start_task(context: TaskContext, label: str) -> None:
    """Common set-up of every task: threads, logging, optional injected fault."""
    import torch

    torch.set_num_threads(max(1, context.threads))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get(FAULT_LABEL) == label:
        flag = Path(os.environ.get(FAULT_DIR, tempfile.gettempdir())) / label.replace("/", "_")
        if not flag.exists():
            flag.parent.mkdir(parents=True, exist_ok=True)
            flag.write_text("crashed once\n")
            log.warning("injected fault: task %s exits now", label)
            os._exit(17)


@functools.lru_cache(maxsize=4)
def load_run_data(store_root: str, work: str):  # type: ignore[no-untyped-def]
    """The run's data folder (cached per worker process: several tasks reuse it)."""
    from training.data import SequenceData

    context = TaskContext(store_root, work)
    local = context.store.download_folder(f"{work}/data", context.scratch("data"))
    return SequenceData.load(local)


def local_checkpoint(context: TaskContext, relative: str) -> Path:
    """A local copy of a checkpoint (or run) folder that lives in the store."""
    return context.store.download_folder(
        f"{context.work}/{relative}", context.scratch(f"in/{relative}")
    )


# ---- training ------------------------------------------------------------------------


def train_model(
    context: TaskContext, name: str, experiment: dict[str, Any], init: str | None
) -> dict[str, Any]:
    """Train one model into `models/<name>` of the work folder (resuming a crashed attempt)."""
    from training.config import ExperimentConfig
    from training.trainer import train

    start_task(context, f"train/{name}")
    config = ExperimentConfig.model_validate(experiment)
    data = load_run_data(context.store_root, context.work)
    scratch = context.scratch(f"train/{name}")
    init_path = local_checkpoint(context, init) if init else None
    result = train(config, data, scratch, init=init_path, resume=True)
    publishable = context.scratch(f"out/{name}")
    shutil.rmtree(publishable, ignore_errors=True)
    publishable.mkdir(parents=True)
    for item in ("best", "config.yaml", "history.json", "metrics.json"):
        source = scratch / item
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, publishable / item)
    context.store.upload_folder(publishable, f"{context.work}/models/{name}")
    return {
        "name": name,
        "best_epoch": result.best_epoch,
        "best_score": result.best_score,
        "metrics": result.metrics,
    }


# ---- evaluation ----------------------------------------------------------------------


def evaluate_model(
    context: TaskContext, name: str, relative: str, eval_seed: int
) -> dict[str, Any]:
    """The metrics document of a checkpoint in the store."""
    from training.evaluate import Evaluator
    from training.trainer import load_run_checkpoint

    start_task(context, f"evaluate/{name}")
    data = load_run_data(context.store_root, context.work)
    checkpoint = load_run_checkpoint(local_checkpoint(context, relative))
    return Evaluator(data.split(), seed=eval_seed).metrics_document(checkpoint.model)


def sequences_for_fisher(
    num_sequences: int | None, seed: int, store_root: str, work: str
) -> list[int]:
    """Seeded rows of the training split that the Fisher averages over."""
    data = load_run_data(store_root, work)
    rows = [i for i, seq in enumerate(data.split().train) if len(seq) >= 2]
    if num_sequences is not None and num_sequences < len(rows):
        rng = np.random.default_rng(seed)
        rows = sorted(rng.choice(rows, size=num_sequences, replace=False).tolist())
    return rows


def shard(rows: list[int], shards: int) -> list[list[int]]:
    """Contiguous slices of `rows` (users), as even as possible; never an empty one."""
    parts = np.array_split(np.asarray(rows, dtype=np.int64), max(1, min(shards, len(rows))))
    return [part.tolist() for part in parts if len(part)]
