"""What every Ray task of the merge job starts from, on whichever node it runs.

A task reads its inputs from the artifact store, works in node-local scratch,
writes its outputs back to the store and returns a small JSON-able result. This
module is what they share: `TaskContext` (where the run lives), the common
set-up (`start_task`), and local copies of the run's data, checkpoints and files.
The task bodies themselves sit with their stage (merging/pipeline/*_stage.py);
they are plain functions so that tests and a debugger can call them without
Ray, and the scheduler wraps them with `ray.remote` and the config's resources.

Fault injection for resilience tests: when FISHREC_INJECT_FAULT names a task
label (e.g. "train/cl4srec") and the file of that label does not yet exist in
FISHREC_FAULT_DIR, the worker creates it and dies (os._exit): the first attempt
crashes, Ray's retry succeeds.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merging.pipeline.store import ArtifactStore

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


@functools.cache
def run_data_folder(store_root: str, work: str) -> Path:
    """A local copy of the run's data folder (one download per worker process)."""
    context = TaskContext(store_root, work)
    return context.store.download_folder(f"{work}/data", context.scratch("data"))


@functools.lru_cache(maxsize=4)
def load_run_data(store_root: str, work: str):  # type: ignore[no-untyped-def]
    """The run's data (cached per worker process: several tasks reuse it)."""
    from training.sequence_data import SequenceData

    return SequenceData.load(run_data_folder(store_root, work))


def with_staged_features(context: TaskContext, experiment: dict[str, Any]) -> dict[str, Any]:
    """The experiment reading the item features the data stage put beside the data."""
    from training.item_features import FEATURES_FILE

    staged = run_data_folder(context.store_root, context.work) / FEATURES_FILE
    if not staged.exists():
        return experiment
    return {**experiment, "data": {**experiment["data"], "features": str(staged)}}


def local_checkpoint(context: TaskContext, relative: str) -> Path:
    """A local copy of a checkpoint (or run) folder that lives in the store."""
    return context.store.download_folder(
        f"{context.work}/{relative}", context.scratch(f"in/{relative}")
    )


def local_file(context: TaskContext, relative: str) -> Path:
    """A local copy of one file of the store."""
    store = context.store
    if store.local:
        return store.local_path(f"{context.work}/{relative}")
    local = context.scratch("in") / relative
    local.parent.mkdir(parents=True, exist_ok=True)
    store.fs.get_file(store.path(f"{context.work}/{relative}"), str(local))
    return local
