"""Ray plumbing of the merge job: the session, tasks with the job's resources, parallel stages.

A stage is one or more Ray tasks; `StageScheduler.run_parallel` submits stages
whose tasks may overlap, records each stage as soon as all its tasks are done
(merging/pipeline/stages.py: a resumed run skips it), and turns a Ray failure
into one readable line. Nothing here knows what a stage computes.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from merging.pipeline.config import ResourceSpec
from merging.pipeline.stages import StageError, StageOutput, StageRunner
from merging.pipeline.task_context import FAULT_DIR, FAULT_LABEL

log = logging.getLogger(__name__)
ProgressCallback = Callable[[str, str, dict[str, Any]], None]  # (stage, event, info)


def new_run_id() -> str:
    """Sortable and unique: UTC time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def machine_cpus() -> int:
    """CPUs this process may use: the cgroup quota of a container, else the affinity mask."""
    from serving.cpus import usable_cpus

    return usable_cpus()


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


class StageScheduler:
    """Runs the job's stages as Ray tasks with its resources and retries."""

    def __init__(
        self,
        runner: StageRunner,
        resources: ResourceSpec,
        max_retries: int,
        report_progress: ProgressCallback,
    ) -> None:
        self.runner = runner
        self.resources = resources
        self.max_retries = max_retries
        self.report_progress = report_progress

    def remote(  # type: ignore[no-untyped-def]
        self, function: Callable[..., Any], label: str, coordinator: bool = False
    ):
        """`function` as a Ray task with the job's resources and retries.

        coordinator: the task only drives Ray Train workers (train.workers > 1),
        which take the resources; it must not hold them itself.
        """
        import ray

        env = {k: os.environ[k] for k in (FAULT_LABEL, FAULT_DIR) if k in os.environ}
        resources = self.resources
        return ray.remote(function).options(
            num_cpus=0 if coordinator else resources.num_cpus,
            num_gpus=0 if coordinator else resources.num_gpus,
            max_retries=self.max_retries,
            retry_exceptions=True,
            name=label,
            runtime_env={"env_vars": env} if env else None,
        )

    def run_parallel(
        self, stages: list[ParallelStage], record: bool = True
    ) -> dict[str, dict[str, Any]]:
        """Run stages whose tasks may overlap; every stage that succeeds is recorded.

        `record=False`: always run (no skip on resume, no marker), e.g. the quality
        gate, whose answer depends on what LATEST names at the time.
        """
        import ray

        results: dict[str, dict[str, Any]] = {}
        waiting: dict[Any, ParallelStage] = {}
        for stage in stages:
            done = self.runner.completed(stage.name) if record else None
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
            seconds = time.perf_counter() - stage.started
            if record:
                results[stage.name] = self.runner.record(stage.name, output, seconds)
            else:
                self.report_progress(stage.name, "finished", {"seconds": seconds})
                results[stage.name] = output.result
        if failures:
            raise failures[0]
        return results
