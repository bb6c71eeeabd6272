"""The run's bundle: exported from the chosen model, judged by the gate, then published.

`stage_export` writes the bundle into work/<run_id>/bundle (a Ray task, parity
checked by merging/export.py); `stage_gate` compares it with the published
champion (merging/pipeline/gate.py decides); `stage_publish` copies it, with the
report and metrics, to runs/<run_id>/ and moves LATEST (merging/pipeline/publish.py).
"""

from __future__ import annotations

import logging
from typing import Any

from merging.pipeline.config import PipelineConfig
from merging.pipeline.gate import GateDecision
from merging.pipeline.publish import publish_bundle
from merging.pipeline.stage_context import StageContext
from merging.pipeline.stages import StageOutput
from merging.pipeline.task_context import TaskContext, load_run_data, local_checkpoint, start_task
from serving.bundle import LATEST, run_path

log = logging.getLogger(__name__)


# ---- stages -----------------------------------------------------------------------------


def bundle_fields(
    config: PipelineConfig,
    run_id: str,
    label: str,
    merged: dict[str, dict[str, Any]],
    fishers: dict[str, dict[str, Any]],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The manifest fields of the run's bundle: its recipes, merge and the published metrics."""
    merge_info = {
        "published": label,
        "methods": {m: {"coefficients": r["coefficients"]} for m, r in merged.items()},
        "estimator": config.fisher.estimator,
        "fisher_sequences": {n: r["sequences"] for n, r in fishers.items()},
    }
    return {
        "run_id": run_id,
        "recipes": [
            {"name": e.name, "recipe": config.recipe_of(e), "params": e.params}
            for e in config.recipes
        ],
        "merge": merge_info,
        "metrics": metrics["models"][label],
    }


def stage_export(run: StageContext, model: str, fields: dict[str, Any]) -> dict[str, Any]:
    export = run.config.export.model_dump()
    return run.run_task("export", export_model, model, export, fields, outputs=("bundle",))


def stage_gate(run: StageContext, force_publish: bool) -> dict[str, Any] | None:
    """Champion/challenger (merging/pipeline/gate.py); None when the gate is off.

    Never skipped on resume: the answer depends on what LATEST names now.
    """
    spec = run.config.gate
    if not spec.enabled:
        return None
    latest = run.store.read_text(LATEST).strip() if run.store.exists(LATEST) else None
    champion = latest if latest and latest != run.run_id else None
    decision = run.run_task(
        "gate", check_gate, champion, spec.metric, spec.tolerance, force_publish, record=False
    )
    log.info("%s", GateDecision(**decision).describe())
    return decision


def stage_publish(run: StageContext, gate: dict[str, Any] | None = None) -> str:
    """Bundle + report + metrics as runs/<run_id>/, verified, then LATEST (docs/export.md, "The model bundle")."""

    def work() -> StageOutput:
        relative = publish_bundle(
            run.store, run.work, run.run_id, run.tasks.scratch("publish"), gate
        )
        return StageOutput([], {"bundle": relative})

    return run.runner.run("publish", work)["bundle"]


# ---- tasks ------------------------------------------------------------------------------


def export_model(
    context: TaskContext, model: str, export: dict[str, Any], fields: dict[str, Any]
) -> dict[str, Any]:
    """Export a checkpoint of the store as the run's bundle into `bundle/` (parity-checked)."""
    from merging.export import export_bundle

    start_task(context, "export")
    data = load_run_data(context.store_root, context.work)
    out = context.scratch("bundle") / fields["run_id"]
    manifest = export_bundle(
        local_checkpoint(context, model), out, data, manifest_fields=fields, **export
    )
    context.store.upload_folder(out, f"{context.work}/bundle")
    return {"onnx": manifest["onnx"], "quantized": manifest.get("quantized")}


def check_gate(
    context: TaskContext,
    champion_run: str | None,
    metric: str,
    tolerance: float,
    force: bool,
) -> dict[str, Any]:
    """The quality gate of merging/pipeline/gate.py: this run's bundle against runs/<champion>."""
    from merging.pipeline.gate import decide

    start_task(context, "gate")
    data = load_run_data(context.store_root, context.work)
    challenger = context.store.download_folder(
        f"{context.work}/bundle", context.scratch("gate/new")
    )
    champion = (
        context.store.download_folder(run_path(champion_run), context.scratch("gate/champion"))
        if champion_run
        else None
    )
    decision = decide(challenger, champion, champion_run, data, metric, tolerance, force)
    return decision.to_dict()
