"""The merge stage: every merge method of the config as a concurrent Ray task.

Each task merges the members' checkpoints (with their Fishers and the base
when the method needs them, merging/methods.py) into merged/<method> and
evaluates the result on valid and test (merging/merge.py does the merging).
"""

from __future__ import annotations

import shutil
from typing import Any

from merging.methods import NEEDS_BASE, NEEDS_FISHERS, MergeConfig
from merging.pipeline.pool_stage import BASE
from merging.pipeline.stage_context import StageContext
from merging.pipeline.task_context import (
    TaskContext,
    load_run_data,
    local_checkpoint,
    local_file,
    start_task,
)


def stage_merges(run: StageContext) -> dict[str, dict[str, Any]]:
    """Every merge method of the config, as concurrent tasks (each evaluates its result)."""
    spec = run.config.merge
    names = [entry.name for entry in run.config.recipes]
    models = [f"models/{name}" for name in names]
    fishers = [f"fisher/{name}.safetensors" for name in names]
    merge_task = run.scheduler.remote(merge_models, "merge")
    stages = []
    for method in spec.methods:
        # The job's seed for every merge (Dirichlet draws, post-merge fine-tune).
        operation = spec.operation(method).model_copy(
            update={"seed": run.config.experiment.train.seed}
        )
        inputs = fishers if method in NEEDS_FISHERS else None
        base = f"models/{BASE}" if method in NEEDS_BASE else None
        stages.append(
            run.task_stage(
                f"merge/{method}",
                merge_task,
                operation,
                models,
                inputs,
                base,
                outputs=(f"merged/{method}",),
            )
        )
    results = run.scheduler.run_parallel(stages)
    return {method: results[f"merge/{method}"] for method in spec.methods}


def merge_models(
    context: TaskContext,
    merge: MergeConfig,
    models: list[str],
    fishers: list[str] | None,
    base: str | None = None,
) -> dict[str, Any]:
    """Merge checkpoints of the store into `merged/<method>` (evaluated on valid and test)."""
    from merging.merge import merge_checkpoints

    method = merge.method
    start_task(context, f"merge/{method}")
    data = load_run_data(context.store_root, context.work)
    inputs = [local_checkpoint(context, m) for m in models]
    fisher_paths = [local_file(context, f) for f in fishers] if fishers else None
    out = context.scratch(f"merged/{method}")
    shutil.rmtree(out, ignore_errors=True)
    result = merge_checkpoints(
        inputs,
        out,
        merge,
        fisher_paths,
        data,
        base=local_checkpoint(context, base) if base else None,
    )
    context.store.upload_folder(out, f"{context.work}/merged/{method}")
    return {
        "method": method,
        "coefficients": result.info["merge"]["coefficients"],
        "metrics": result.metrics,
    }
