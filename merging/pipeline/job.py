"""The merge job (docs/pipeline.md): train, Fisher, merge, evaluate, export, publish, on Ray.

    data -> base -> recipes (parallel) -> Fisher (parallel shards) -> merge
         -> [post-merge fine-tune] -> evaluate -> export -> report -> publish

`run_pipeline` is the one entry point (the CLI and scheduled RayJobs call it).
With no address it starts a local Ray instance sized to the machine; with an
address (or RAY_ADDRESS) it runs the same stages on an existing cluster, whose
nodes must see the artifact root (a shared path or an object-store URI) and
have fishrec installed (the job image).

This module is the orchestration only: the order of the stages, progress,
tracking, the gate's outcome. What each stage does, on the driver and in its
Ray tasks, lives in merging/pipeline/*_stage.py (data, warm start, pool,
Fisher, merge, evaluation, bundle, report), all given one `StageContext`
(merging/pipeline/stage_context.py); publishing itself is merging/pipeline/publish.py.

Layout under the artifact root:

    work/<run_id>/        stage outputs and markers (data, models, fishers, ...)
    runs/<run_id>/        the published bundle (what serving loads)
    LATEST                the run id of the newest published bundle
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merging.bundle import utc_now
from merging.pipeline.bundle_stage import bundle_fields, stage_export, stage_gate, stage_publish
from merging.pipeline.config import PipelineConfig
from merging.pipeline.data_stage import stage_data
from merging.pipeline.evaluation_stage import published_model, stage_baselines, stage_metrics
from merging.pipeline.fisher_stage import stage_fishers
from merging.pipeline.gate import GateDecision, GateRefused
from merging.pipeline.merge_stage import stage_merges
from merging.pipeline.pool_stage import BASE, base_result, stage_base, stage_recipes
from merging.pipeline.report_stage import report_info, stage_report
from merging.pipeline.retention import apply_retention
from merging.pipeline.scheduler import StageScheduler, new_run_id, ray_session
from merging.pipeline.stage_context import StageContext
from merging.pipeline.stages import StageError, StageRunner
from merging.pipeline.store import ArtifactStore
from merging.pipeline.task_context import TaskContext
from merging.pipeline.tracking import make_tracker
from merging.pipeline.warm_start_stage import stage_warm_start

log = logging.getLogger(__name__)

OUTCOME = "outcome.json"  # work/<run_id>/outcome.json: published or refused, with the gate


@dataclass
class PipelineResult:
    run_id: str
    bundle: str  # path of the published bundle relative to the store root
    metrics: dict[str, Any]
    stage_seconds: dict[str, float]


class Pipeline:
    """One run of the merge job: the stages in order, progress, tracking and the outcome."""

    def __init__(
        self,
        config: PipelineConfig,
        store: ArtifactStore,
        run_id: str,
        force_publish: bool = False,
    ) -> None:
        self.config = config
        self.force_publish = force_publish
        self.store = store
        self.run_id = run_id
        self.work = f"work/{run_id}"
        self.stage_seconds: dict[str, float] = {}
        self.tracker = make_tracker(config.tracking)
        runner = StageRunner(store, self.work, on_event=self.report_progress)
        self.stage_context = StageContext(
            config=config,
            store=store,
            run_id=run_id,
            runner=runner,
            scheduler=StageScheduler(
                runner, config.resources, config.max_retries, self.report_progress
            ),
            tasks=TaskContext(
                store.root, self.work, threads=int(max(1, config.resources.num_cpus))
            ),
            stage_seconds=self.stage_seconds,
        )
        self.total_stages = count_stages(config)
        self.stages_done = 0

    # ---- progress -------------------------------------------------------------------------

    def report_progress(self, stage: str, event: str, info: dict[str, Any]) -> None:
        """One line per stage event, with how many of the run's stages are done."""
        if event in ("finished", "skipped"):
            self.stages_done += 1
        done = f"[{self.stages_done}/{self.total_stages}]"
        if event == "finished":
            self.stage_seconds[stage] = info["seconds"]
            self.tracker.stage(stage, info["seconds"])
            log.info("%s %-18s done in %.1f s", done, stage, info["seconds"])
        elif event == "skipped":
            log.info("%s %-18s already done and verified: skipped", done, stage)
        else:
            log.info("%s %-18s started", done, stage)

    # ---- the whole job ---------------------------------------------------------------------

    def run(self) -> PipelineResult:
        """The whole job; work/<run_id>/outcome.json says how it ended (docs/pipeline.md)."""
        self.tracker.start(self.run_id, self.config.model_dump(mode="json"))
        try:
            return self._run()
        except StageError as err:
            self.write_outcome("failed", stage=err.stage, error=str(err.cause))
            raise
        except GateRefused:
            raise  # its outcome is written where the gate refused
        except BaseException as err:  # a bug or an interrupt: the tracked run says so too
            self.tracker.finish("failed", error=repr(err))
            raise

    def _run(self) -> PipelineResult:
        run, config = self.stage_context, self.config
        self.save_config()
        data = stage_data(run)
        warm = stage_warm_start(run)
        stage_base(run, warm)
        trained = stage_recipes(run)
        base = base_result(run)
        fishers = stage_fishers(run)
        merged = stage_merges(run)
        baselines = stage_baselines(run, trained, merged)
        everything = {**({BASE: base} if base else {}), **trained}
        metrics = stage_metrics(run, everything, merged, baselines)
        self.tracker.metrics(metrics)
        label, model = published_model(config, metrics)
        fields = bundle_fields(config, self.run_id, label, merged, fishers, metrics)
        stage_export(run, model, fields)
        data = {**data, "warm_start": warm}
        info = report_info(
            config, self.run_id, data, metrics, (label, model), merged, base, self.stage_seconds
        )
        stage_report(run, info)
        if config.tracking.enabled:
            self.tracker.report(
                self.store.download_folder(
                    f"{self.work}/report", run.tasks.scratch("tracked-report")
                )
            )
        return self._publish(metrics)

    def _publish(self, metrics: dict[str, Any]) -> PipelineResult:
        """Gate, publish, retention and the outcome; a refused gate leaves LATEST alone."""
        run = self.stage_context
        # A run that already published is not judged again (its manifest has the decision).
        published = run.runner.completed("publish") is not None
        gate = None if published else stage_gate(run, self.force_publish)
        if gate is not None and not (gate["passed"] or gate["forced"]):
            self.write_outcome("refused", gate=gate)
            raise GateRefused(GateDecision(**gate).describe() + "; LATEST is unchanged")
        bundle = stage_publish(run, gate)
        if self.config.tracking.enabled and not published:
            self.tracker.published(
                self.run_id,
                self.store.download_folder(bundle, run.tasks.scratch("tracked-bundle")),
            )
        apply_retention(self.store, self.config.retention.keep_runs, self.run_id)
        if not published:
            self.write_outcome("published", gate=gate, bundle=bundle)
        return PipelineResult(self.run_id, bundle, metrics, dict(self.stage_seconds))

    def save_config(self) -> None:
        """Record the config; a run id is bound to one config (a resume must not change it)."""
        text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=True)
        relative = f"{self.work}/pipeline.yaml"
        if self.store.exists(relative) and self.store.read_text(relative) != text:
            raise StageError(
                "config",
                f"run {self.run_id} was started with another configuration; use a new --run-id",
            )
        self.store.write_text(relative, text)

    def write_outcome(self, outcome: str, **fields: Any) -> None:
        """work/<run_id>/outcome.json: what the run ended with, for schedulers and ops."""
        document = {"run_id": self.run_id, "outcome": outcome, "finished": utc_now(), **fields}
        self.store.write_text(f"{self.work}/{OUTCOME}", json.dumps(document, indent=2) + "\n")
        self.tracker.finish(outcome, **fields)


def count_stages(config: PipelineConfig) -> int:
    """How many stages a run reports progress over.

    data, [base], recipes (one stage for a population) (+ control), Fishers,
    merges, baselines, metrics, export, report, gate, publish.
    """
    recipes, merges = len(config.recipes), len(config.merge.methods)
    pool = config.pool_config
    trainings = 1 if pool.strategy == "population" else recipes
    return 1 + pool.shared_base + trainings + recipes + config.control + merges + 6


def load_pipeline_config(path: Path | None, overrides: list[str]) -> PipelineConfig:
    from training.config import load_config, parse_override

    return load_config(PipelineConfig, path, dict(parse_override(text) for text in overrides))


def run_pipeline(
    config: PipelineConfig,
    artifacts: str,
    address: str | None = None,
    run_id: str | None = None,
    force_publish: bool = False,
) -> PipelineResult:
    """Run (or resume, given the run id of an earlier attempt) the merge job.

    `force_publish` publishes even when the quality gate refuses (recorded as forced).
    """
    store = ArtifactStore(artifacts)
    pipeline = Pipeline(config, store, run_id or new_run_id(), force_publish)
    log.info("run %s, artifacts %s", pipeline.run_id, store.root)
    with ray_session(address, config.num_cpus):
        return pipeline.run()
