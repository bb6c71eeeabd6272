"""The Fisher stage: each member's Fisher, as Ray tasks over user shards, summed per member.

The driver selects the training sequences once (merging/fisher.py's
`select_sequences`) and splits them into contiguous shards; every shard is one
task (`fisher_shard`), and the stage of a member finishes when all its shards
have returned: `combine_fisher_shards` sums them and writes
fisher/<name>.safetensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from merging.pipeline.scheduler import ParallelStage
from merging.pipeline.stage_context import StageContext
from merging.pipeline.stages import StageOutput
from merging.pipeline.task_context import TaskContext, load_run_data, local_checkpoint, start_task

if TYPE_CHECKING:  # torch: imported by the tasks, not by the driver's stage code
    from merging.fisher import FisherConfig


def stage_fishers(run: StageContext) -> dict[str, dict[str, Any]]:
    """The Fisher of every recipe: Ray tasks over user shards, summed per recipe."""
    from merging.fisher import select_sequences

    spec = run.config.fisher
    fisher = spec.operation()  # the typed config travels to the tasks as it is
    train = load_run_data(run.store.root, run.work).split().train
    ids, _ = select_sequences(train, spec.num_sequences, spec.seed)
    shards = shard(ids, spec.shards)
    shard_task = run.scheduler.remote(fisher_shard, "fisher")
    stages = []
    for entry in run.config.recipes:
        name = entry.name

        def submit(name: str = name) -> list[Any]:
            return [
                shard_task.remote(run.tasks, name, f"models/{name}", part, fisher)
                for part in shards
            ]

        def finish(values: list[Any], name: str = name) -> StageOutput:
            provenance = {"checkpoint": f"models/{name}", "estimator_config": fisher.model_dump()}
            result = combine_fisher_shards(run.tasks, name, values, provenance)
            return StageOutput([f"fisher/{name}.safetensors"], result)

        stages.append(ParallelStage(f"fisher/{name}", submit, finish))
    results = run.scheduler.run_parallel(stages)
    return {entry.name: results[f"fisher/{entry.name}"] for entry in run.config.recipes}


def shard(rows: list[int], shards: int) -> list[list[int]]:
    """Contiguous slices of `rows` (users), as even as possible; never an empty one."""
    parts = np.array_split(np.asarray(rows, dtype=np.int64), max(1, min(shards, len(rows))))
    return [part.tolist() for part in parts if len(part)]


def fisher_shard(
    context: TaskContext, name: str, model: str, ids: list[int], fisher: FisherConfig
) -> dict[str, Any]:
    """Fisher sums of one model over one shard of training sequences (global ids)."""
    from merging.fisher import compute_fisher
    from training.run_folder import load_run_checkpoint

    start_task(context, f"fisher/{name}")
    data = load_run_data(context.store_root, context.work)
    train = data.split().train
    checkpoint = load_run_checkpoint(local_checkpoint(context, model), context.device)
    result = compute_fisher(checkpoint.model, [train[i] for i in ids], fisher, ids=ids)
    # numpy arrays travel through Ray's object store without copies.
    return {
        "sums": {k: v.cpu().numpy() for k, v in result.sums.items()},
        "count": result.count,
        "estimator": result.estimator,
        "batch_shortcut": result.batch_shortcut,
        "dropped_mass": result.dropped_mass,
        "grams": {k: v.cpu().numpy() for k, v in result.grams.items()},
        "gram_rows": result.gram_rows,
    }


def combine_fisher_shards(
    context: TaskContext, name: str, shards: list[dict[str, Any]], provenance: dict[str, Any]
) -> dict[str, Any]:
    """Sum shard results, average, and save `fisher/<name>.safetensors` in the store."""
    import torch

    from merging.fisher_file import fisher_metadata, save_fisher
    from merging.fisher_result import FisherResult

    total = sum(
        FisherResult(
            {k: torch.tensor(v) for k, v in s["sums"].items()},
            s["count"],
            s["estimator"],
            s["batch_shortcut"],
            s["dropped_mass"],
            grams={k: torch.tensor(v) for k, v in s["grams"].items()},
            gram_rows=s["gram_rows"],
        )
        for s in shards
    )
    local = context.scratch("fisher") / f"{name}.safetensors"
    save_fisher(
        local,
        total.file_tensors(),
        fisher_metadata(total, model=name, shards=len(shards), **provenance),
    )
    context.store.upload_file(local, f"{context.work}/fisher/{name}.safetensors")
    return {"sequences": total.count, "dropped_eigenvalue_mass": total.mean_dropped_mass}
