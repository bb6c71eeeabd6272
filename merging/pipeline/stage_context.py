"""What the merge job's stage functions share on the driver: one run and its plumbing.

The job (merging/pipeline/job.py) builds one `StageContext` per run and hands
it to every stage function (merging/pipeline/*_stage.py): the config, the
artifact store and work folder, the resume runner (merging/pipeline/stages.py),
the Ray scheduler (merging/pipeline/scheduler.py) and the `TaskContext` each
task receives. Most stages are a single Ray task; `task_stage` and `run_task`
say that once instead of in every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from merging.pipeline.config import PipelineConfig
from merging.pipeline.scheduler import ParallelStage, StageScheduler
from merging.pipeline.stages import StageOutput, StageRunner
from merging.pipeline.store import ArtifactStore
from merging.pipeline.task_context import TaskContext


@dataclass
class StageContext:
    """One run of the job as its stages see it."""

    config: PipelineConfig
    store: ArtifactStore
    run_id: str
    runner: StageRunner
    scheduler: StageScheduler
    tasks: TaskContext  # what every task of the run is given first
    stage_seconds: dict[str, float] = field(default_factory=dict)  # filled as stages finish

    @property
    def work(self) -> str:
        return f"work/{self.run_id}"

    def task_stage(
        self, name: str, task: Any, *args: Any, outputs: tuple[str, ...] = ()
    ) -> ParallelStage:
        """A stage of one Ray task, `task.remote(tasks, *args)`, whose value is its result.

        `task`: a function the scheduler made remote; `outputs`: what the stage
        wrote (relative to the work folder), checksummed into its marker.
        """
        return ParallelStage(
            name=name,
            submit=lambda: [task.remote(self.tasks, *args)],
            finish=lambda values: StageOutput(list(outputs), values[0]),
        )

    def run_task(
        self,
        name: str,
        function: Callable[..., Any],
        *args: Any,
        outputs: tuple[str, ...] = (),
        record: bool = True,
    ) -> dict[str, Any]:
        """Run `function` as the one Ray task of stage `name` (also its label); its result.

        `record=False`: always run, no marker (see StageScheduler.run_parallel).
        """
        task = self.scheduler.remote(function, name)
        stage = self.task_stage(name, task, *args, outputs=outputs)
        return self.scheduler.run_parallel([stage], record=record)[name]
