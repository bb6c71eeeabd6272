"""The report stage: what the run report is told, and the Ray task that writes it.

The driver gathers the summary lines, metrics and where every model lives
(`report_info`); the task loads histories, weights and Fishers from the store
and renders report.md and plots/ with merging/pipeline/report.py.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import numpy as np

from merging.pipeline.config import PipelineConfig
from merging.pipeline.pool_stage import BASE
from merging.pipeline.publish import describe_pool, describe_warm_start
from merging.pipeline.stage_context import StageContext
from merging.pipeline.task_context import (
    TaskContext,
    load_run_data,
    local_checkpoint,
    local_file,
    start_task,
)


def stage_report(run: StageContext, info: dict[str, Any]) -> dict[str, Any]:
    return run.run_task("report", write_run_report, info, outputs=("report",))


def report_info(
    config: PipelineConfig,
    run_id: str,
    data: dict[str, Any],
    metrics: dict[str, Any],
    published: tuple[str, str],
    merged: dict[str, Any],
    base_result: dict[str, Any] | None,
    stage_seconds: dict[str, float],
) -> dict[str, Any]:
    """Everything write_run_report needs; `published`: (table name, store path) of the model."""
    label, model = published
    names = [entry.name for entry in config.recipes]
    trained, offsets = trained_runs(config, base_result)
    return {
        "run_id": run_id,
        "summary": run_summary(config, data, metrics, label),
        "metrics": metrics["models"],
        "best_recipe": metrics["best_recipe"],
        "vs_best_recipe": metrics["vs_best_recipe"],
        "trained": trained,
        "epoch_offsets": offsets,
        "recipes": names,
        "fishers": {n: f"fisher/{n}.safetensors" for n in names},
        "merged": {f"merged-{m}": f"merged/{m}" for m in merged},
        "published_model": model,
        "stage_seconds": dict(stage_seconds),
        "report": config.report.model_dump(),
    }


def trained_runs(
    config: PipelineConfig, base_result: dict[str, Any] | None
) -> tuple[dict[str, str], dict[str, int]]:
    """The trained runs whose histories the report plots, and each member's first epoch.

    Members that start from a shared base continue its epochs: their curves are
    shifted by the base's best epoch (finetune) or spawn_epoch (spawn).
    """
    names = [entry.name for entry in config.recipes]
    trained = {n: f"models/{n}" for n in names}
    offsets: dict[str, int] = {}
    pool = config.pool_config
    if pool.shared_base:
        trained = {BASE: f"models/{BASE}", **trained}
        start = (base_result or {}).get("best_epoch", 0)
        if pool.strategy == "spawn":
            start = pool.spawn_epoch
        offsets = dict.fromkeys(names, max(0, int(start)))
    return trained, offsets


def run_summary(
    config: PipelineConfig, data: dict[str, Any], metrics: dict[str, Any], label: str
) -> dict[str, str]:
    """The report's summary lines: data, backbone, pool, protocol, base, estimator, model."""
    return {
        "data": f"{config.experiment.data.path} ({data['num_users']} users, {data['num_items']} items, "
        f"{data['num_interactions']} interactions, {data['fingerprint'][:19]}...)",
        "backbone": config.experiment.model.backbone,
        "setting": describe_pool(metrics.get("pool")) or config.setting,
        "protocol": data.get("protocol", "leave-one-out"),
        "base": describe_warm_start(config.base.init_from, data.get("warm_start")),
        "Fisher estimator": config.fisher.estimator,
        "published model": label,
    }


def write_run_report(context: TaskContext, info: dict[str, Any]) -> dict[str, Any]:
    """report.md and plots/ of the run into `report/`."""
    from merging.fisher_file import load_fisher
    from merging.landscape import validation_probe
    from merging.pipeline.report import write_report
    from training.batching import pad_left
    from training.run_folder import load_run_checkpoint

    start_task(context, "report")
    data = load_run_data(context.store_root, context.work)

    def weights(relative: str) -> dict[str, Any]:
        return load_run_checkpoint(local_checkpoint(context, relative)).model.state_dict()

    histories = {}
    for name, relative in info["trained"].items():
        folder = local_checkpoint(context, relative)
        histories[name] = json.loads((folder / "history.json").read_text())
    published = load_run_checkpoint(local_checkpoint(context, info["published_model"])).model
    test = data.split().test
    rows = np.linspace(0, len(test) - 1, num=min(5, len(test))).astype(int)
    out = context.scratch("report-out")
    shutil.rmtree(out, ignore_errors=True)
    spec = info["report"]
    users = spec["landscape_users"]
    write_report(
        out,
        title=f"fishrec run {info['run_id']}",
        summary=info["summary"],
        metrics=info["metrics"],
        histories=histories,
        epoch_offsets=info["epoch_offsets"],
        fishers={
            n: load_fisher(local_file(context, f)).tensors for n, f in info["fishers"].items()
        },
        recipe_weights={n: weights(f"models/{n}") for n in info["recipes"]},
        merged_weights={n: weights(r) for n, r in info["merged"].items()},
        published=published,
        sample_histories=pad_left([test.histories[i] for i in rows], published.config.max_len),
        stage_seconds=info["stage_seconds"],
        comparisons=(info["best_recipe"], info["vs_best_recipe"]),
        probe=validation_probe(data.split(), users) if users else None,
        grid_points=spec["grid_points"],
        line_points=spec["line_points"],
        protocol=data.split().protocol,
    )
    context.store.upload_folder(out, f"{context.work}/report")
    return {"report": "report/report.md"}
