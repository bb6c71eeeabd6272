"""The merge job (DESIGN §2): train, Fisher, merge, evaluate, export, publish, on Ray.

    data -> base -> recipes (parallel) -> Fisher (parallel shards) -> merge
         -> [post-merge fine-tune] -> evaluate -> export -> report -> publish

`run_pipeline` is the one entry point (the CLI and scheduled RayJobs call it).
With no address it starts a local Ray instance sized to the machine; with an
address (or RAY_ADDRESS) it runs the same stages on an existing cluster, whose
nodes must see the artifact root (a shared path or an object-store URI) and
have fishrec installed (the job image).

Layout under the artifact root:

    work/<run_id>/        stage outputs and markers (data, models, fishers, ...)
    runs/<run_id>/        the published bundle (what serving loads)
    LATEST                the run id of the newest published bundle
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from merging import tasks
from merging.job_config import PipelineConfig, RecipeEntry
from merging.stages import StageError, StageOutput, StageRunner
from merging.store import ArtifactStore
from merging.tasks import TaskContext

log = logging.getLogger(__name__)

LATEST = "LATEST"
BASE = "base"


def new_run_id() -> str:
    """Sortable and unique: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def machine_cpus() -> int:
    """CPUs this process may use: the cgroup quota of a container, else the affinity mask."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0))


@contextmanager
def ray_session(address: str | None, num_cpus: int | None):  # type: ignore[no-untyped-def]
    """Connect to `address` (or RAY_ADDRESS), or start a local instance; stop only what we started."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = num_cpus or machine_cpus()
        log.info("starting a local Ray instance with %d CPUs", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def failure_cause(err: BaseException) -> str:
    """One readable line for a Ray failure (the remote traceback stays in the logs)."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None:
        return f"{type(err.cause).__name__}: {err.cause}"
    if isinstance(err, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return f"the worker died on every attempt ({type(err).__name__})"
    return f"{type(err).__name__}: {err}"


@dataclass
class ParallelStage:
    """A stage made of Ray tasks: submitted together, recorded as each completes."""

    name: str
    submit: Callable[[], list[Any]]  # returns Ray object refs
    finish: Callable[[list[Any]], StageOutput]  # turns their values into the stage output
    refs: list[Any] = field(default_factory=list)
    started: float = 0.0


@dataclass
class PipelineResult:
    run_id: str
    bundle: str  # path of the published bundle relative to the store root
    metrics: dict[str, Any]
    stage_seconds: dict[str, float]


class Pipeline:
    """One run of the merge job; stage methods in the order they run."""

    def __init__(self, config: PipelineConfig, store: ArtifactStore, run_id: str) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.work = f"work/{run_id}"
        self.context = TaskContext(
            store.root, self.work, threads=int(max(1, config.resources.num_cpus))
        )
        self.stage_seconds: dict[str, float] = {}
        self.runner = StageRunner(store, self.work, on_event=self.report_progress)

    # ---- progress and Ray plumbing -----------------------------------------------------

    def report_progress(self, stage: str, event: str, info: dict[str, Any]) -> None:
        if event == "finished":
            self.stage_seconds[stage] = info["seconds"]
            log.info("stage %-24s done in %6.1f s", stage, info["seconds"])
        elif event == "skipped":
            log.info("stage %-24s already done (verified), skipped", stage)
        else:
            log.info("stage %-24s started", stage)

    def remote(self, function: Callable[..., Any], label: str):  # type: ignore[no-untyped-def]
        """`function` as a Ray task with the job's resources and retries."""
        import ray

        env = {k: os.environ[k] for k in (tasks.FAULT_LABEL, tasks.FAULT_DIR) if k in os.environ}
        resources = self.config.resources
        return ray.remote(function).options(
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_retries=self.config.max_retries,
            retry_exceptions=True,
            name=label,
            runtime_env={"env_vars": env} if env else None,
        )

    def run_parallel(self, stages: list[ParallelStage]) -> dict[str, dict[str, Any]]:
        """Run stages whose tasks may overlap; every stage that succeeds is recorded."""
        import ray

        results: dict[str, dict[str, Any]] = {}
        waiting: dict[Any, ParallelStage] = {}
        for stage in stages:
            done = self.runner.completed(stage.name)
            if done is not None:
                self.report_progress(stage.name, "skipped", done)
                results[stage.name] = done["result"]
                continue
            self.report_progress(stage.name, "started", {})
            stage.started = time.perf_counter()
            stage.refs = stage.submit()
            waiting.update({ref: stage for ref in stage.refs})
        failures: list[StageError] = []
        pending = {stage.name: stage for stage in waiting.values()}
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1)
            stage = waiting.pop(ready[0])
            if any(ref in waiting for ref in stage.refs) or stage.name not in pending:
                continue
            del pending[stage.name]
            try:
                values = ray.get(stage.refs)
                output = stage.finish(values)
            except Exception as err:
                failures.append(StageError(stage.name, failure_cause(err)))
                for ref in [r for r in waiting if waiting[r] is stage]:
                    waiting.pop(ref)
                continue
            results[stage.name] = self.runner.record(
                stage.name, output, time.perf_counter() - stage.started
            )
        if failures:
            raise failures[0]
        return results

    # ---- stages --------------------------------------------------------------------------

    def save_config(self) -> None:
        """Record the config; a run id is bound to one config (a resume must not change it)."""
        text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=True)
        relative = f"{self.work}/pipeline.yaml"
        if self.store.exists(relative) and self.store.read_text(relative) != text:
            raise StageError("config", f"run {self.run_id} was started with another configuration; use a new --run-id")
        self.store.write_text(relative, text)

    def stage_data(self) -> dict[str, Any]:
        def work() -> StageOutput:
            from training.sources import load_source

            data = load_source(self.config.experiment.data)
            local = self.context.scratch("data-staging")
            data.save(local / "data")
            self.store.upload_folder(local / "data", f"{self.work}/data")
            result = {"fingerprint": data.fingerprint, "num_users": data.num_users,
                      "num_items": data.num_items, "num_interactions": data.num_interactions}
            return StageOutput(["data"], result)

        return self.runner.run("data", work)

    def experiment_for(self, recipe: str, params: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
        values = self.config.experiment.model_dump(mode="json")
        values["recipe"] = {"name": recipe, "params": params}
        values["train"].update(epochs=epochs, seed=seed, progress=False, device=self._device())
        return values

    def _device(self) -> str:
        return "cuda" if self.config.resources.num_gpus > 0 else "cpu"

    def training_stage(self, name: str, experiment: dict[str, Any], init: str | None) -> ParallelStage:
        task = self.remote(tasks.train_model, f"train/{name}")
        return ParallelStage(
            name=f"train/{name}",
            submit=lambda: [task.remote(self.context, name, experiment, init)],
            finish=lambda values: StageOutput([f"models/{name}"], values[0]),
        )

    def stage_base(self) -> None:
        if self.config.setting != "finetune":
            return
        train = self.config.experiment.train
        experiment = self.experiment_for(self.config.experiment.model.backbone, {}, train.epochs, train.seed)
        self.run_parallel([self.training_stage(BASE, experiment, None)])

    def stage_recipes(self) -> dict[str, dict[str, Any]]:
        """Every recipe of the pool, trained concurrently (fine-tuned from the base or from scratch)."""
        init = f"models/{BASE}" if self.config.setting == "finetune" else None
        stages = []
        for position, entry in enumerate(self.config.recipes):
            seed = entry.seed if entry.seed is not None else self.config.experiment.train.seed + position + 1
            epochs = entry.epochs if entry.epochs is not None else self.config.recipe_epochs
            experiment = self.experiment_for(self.config.recipe_of(entry), entry.params, epochs, seed)
            stages.append(self.training_stage(entry.name, experiment, init))
        results = self.run_parallel(stages)
        return {entry.name: results[f"train/{entry.name}"] for entry in self.config.recipes}
