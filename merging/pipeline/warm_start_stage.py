"""Warm start (base.init_from): the published model carried over to this run's items.

The driver picks the source run once and records it: a resumed run continues
from the same model even if LATEST moved meanwhile. The task verifies the
source bundle with the service's own reader and writes models/warm-start,
which the shared base (merging/pipeline/pool_stage.py) then starts from.
"""

from __future__ import annotations

import logging
from typing import Any

from merging.pipeline.stage_context import StageContext
from merging.pipeline.stages import StageError, StageOutput
from merging.pipeline.task_context import TaskContext, load_run_data, start_task
from serving.bundle import LATEST, MANIFEST, run_path

log = logging.getLogger(__name__)

WARM = "warm-start"  # models/warm-start: the published model on this run's catalogue


def stage_warm_start(run: StageContext) -> dict[str, Any] | None:
    """base.init_from: the published model carried over to this run's items, or None."""
    wanted = run.config.base.init_from
    if wanted is None:
        return None
    source = (
        run.store.read_text(LATEST).strip()
        if wanted == "latest" and run.store.exists(LATEST)
        else None
    )
    source = wanted if wanted != "latest" else source
    if source is None:
        log.info("warm start: nothing is published yet, so the base starts from scratch")
        result = run.runner.run(WARM, lambda: StageOutput([], {"source_run": None}))
        return result if result["source_run"] else None
    if wanted != "latest" and not run.store.exists(f"{run_path(source)}/{MANIFEST}"):
        raise StageError(WARM, f"base.init_from: runs/{source} is not a published run")
    seed = run.config.experiment.train.seed
    result = run.run_task(WARM, warm_start, source, WARM, seed, outputs=(f"models/{WARM}",))
    log.info(
        "warm start from run %s: %d items kept, %d new, %d dropped",
        result["source_run"],
        result["kept"],
        result["new"],
        result["dropped"],
    )
    return result


def warm_start(context: TaskContext, source_run: str, name: str, seed: int) -> dict[str, Any]:
    """The published model of runs/<source_run> carried over to this run's catalogue.

    Its bundle is verified by the service's own reader first; kept items' rows
    are matched by external id (training/warm_start.py). Writes models/<name>.
    """
    from merging.bundle import verify_bundle
    from training.warm_start import load_bundle_source, write_warm_start

    start_task(context, f"warm-start/{name}")
    bundle = context.store.download_folder(run_path(source_run), context.scratch("warm/bundle"))
    verify_bundle(bundle)
    source, vocab = load_bundle_source(bundle)
    data = load_run_data(context.store_root, context.work)
    out = context.scratch("warm/out") / name
    change = write_warm_start(source, vocab, data, out, seed, {"source_run": source_run})
    context.store.upload_folder(out, f"{context.work}/models/{name}")
    return {"source_run": source_run, **change.to_json()}
