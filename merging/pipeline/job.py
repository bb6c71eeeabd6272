"""The merge job (docs/pipeline.md): train, Fisher, merge, evaluate, export, publish, on Ray.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merging.bundle import MANIFEST, utc_now
from merging.methods import NEEDS_BASE, NEEDS_FISHERS
from merging.pipeline import tasks
from merging.pipeline.config import CONTROL, PipelineConfig
from merging.pipeline.gate import GateDecision, GateRefused
from merging.pipeline.publish import describe_pool, describe_warm_start, publish_bundle
from merging.pipeline.retention import LATEST, apply_retention
from merging.pipeline.scheduler import (
    ParallelStage,
    StageScheduler,
    new_run_id,
    ray_session,
)
from merging.pipeline.stages import StageError, StageOutput, StageRunner
from merging.pipeline.store import ArtifactStore
from merging.pipeline.tasks import ENSEMBLE, TaskContext
from merging.pipeline.tracking import make_tracker

log = logging.getLogger(__name__)

BASE = "base"
POPULATION = "train/population"  # the one stage that trains a population's members
WARM = "warm-start"  # models/warm-start: the published model on this run's catalogue


OUTCOME = "outcome.json"  # work/<run_id>/outcome.json: published or refused, with the gate


@dataclass
class PipelineResult:
    run_id: str
    bundle: str  # path of the published bundle relative to the store root
    metrics: dict[str, Any]
    stage_seconds: dict[str, float]


class Pipeline:
    """One run of the merge job; stage methods in the order they run."""

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
        self.context = TaskContext(
            store.root, self.work, threads=int(max(1, config.resources.num_cpus))
        )
        self.stage_seconds: dict[str, float] = {}
        self.tracker = make_tracker(config.tracking)
        self.runner = StageRunner(store, self.work, on_event=self.report_progress)
        self.scheduler = StageScheduler(
            self.runner, config.resources, config.max_retries, self.report_progress
        )
        recipes, merges = len(config.recipes), len(config.merge.methods)
        pool = config.pool_config
        # data, [base], recipes (one stage for a population) (+ control), Fishers, merges,
        # baselines, metrics, export, report, gate, publish
        trainings = 1 if pool.strategy == "population" else recipes
        self.total_stages = 1 + pool.shared_base + trainings + recipes + config.control + merges + 6
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

    # ---- stages --------------------------------------------------------------------------

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

    def stage_data(self) -> dict[str, Any]:
        def work() -> StageOutput:
            from training.sources import load_source

            data = load_source(self.config.experiment.data)
            local = self.context.scratch("data-staging")
            data.save(local / "data")
            result = {
                "fingerprint": data.fingerprint,
                "num_users": data.num_users,
                "num_items": data.num_items,
                "num_interactions": data.num_interactions,
                "protocol": data.split().protocol,
                "test_users": len(data.split().test),
            }
            if self.needs_features():
                result["features"] = self.stage_features(data, local / "data")
            self.store.upload_folder(local / "data", f"{self.work}/data")
            return StageOutput(["data"], result)

        return self.runner.run("data", work)

    def needs_features(self) -> bool:
        """Whether a model of the pool reads item features (text models, KDSR)."""
        from training.recipes import needs_features

        text_model = self.config.experiment.model.item_representation != "id"
        return text_model or any(needs_features(entry.recipe_name) for entry in self.config.recipes)

    def stage_features(self, data: Any, folder: Path) -> dict[str, Any]:
        """Copy the item features into the run's data folder, checked against its vocabulary.

        Workers on other nodes cannot read the submitter's files: they read the
        features from the store, beside the data (see tasks.train_model).
        """
        import shutil

        from training.features import FEATURES_FILE, features_path, load_item_features

        spec = self.config.experiment.data
        features = load_item_features(spec.path, spec.features, data)
        shutil.copy2(features_path(spec.path, spec.features), folder / FEATURES_FILE)
        return {"encoder": features.encoder, "dim": features.dim, "coverage": features.coverage}

    def experiment_for(
        self, recipe: str, params: dict[str, Any], epochs: int, seed: int, lr: float | None = None
    ) -> dict[str, Any]:
        values = self.config.experiment.model_dump(mode="json")
        values["recipe"] = {"name": recipe, "params": {**self.shared_loss_params(), **params}}
        values["train"].update(epochs=epochs, seed=seed, progress=False, device=self._device())
        if values["train"]["workers"] > 1 and values["train"]["num_threads"] is None:
            values["train"]["num_threads"] = int(max(1, self.config.resources.num_cpus))
        if lr is not None:
            values["train"]["lr"] = lr
        return values

    def shared_loss_params(self) -> dict[str, Any]:
        """experiment.recipe.params of the plain objective (e.g. sampled softmax): every stage's.

        A recipe entry's own params override them.
        """
        from training.recipes.base import RecipeParams

        shared = self.config.experiment.recipe.params
        return {k: v for k, v in shared.items() if k in RecipeParams.model_fields}

    def _device(self) -> str:
        return "cuda" if self.config.resources.num_gpus > 0 else "cpu"

    def training_stage(
        self, name: str, experiment: dict[str, Any], init: str | None, keep_last: bool = False
    ) -> ParallelStage:
        workers = experiment["train"]["workers"]
        task = self.scheduler.remote(tasks.train_model, f"train/{name}", coordinator=workers > 1)
        return ParallelStage(
            name=f"train/{name}",
            submit=lambda: [task.remote(self.context, name, experiment, init, keep_last)],
            finish=lambda values: StageOutput([f"models/{name}"], values[0]),
        )

    def stage_warm_start(self) -> dict[str, Any] | None:
        """base.init_from: the published model carried over to this run's items, or None.

        The source run is chosen once and recorded: a resumed run continues from
        the same model even if LATEST moved meanwhile.
        """
        wanted = self.config.base.init_from
        if wanted is None:
            return None
        source = (
            self.store.read_text(LATEST).strip()
            if wanted == "latest" and self.store.exists(LATEST)
            else None
        )
        source = wanted if wanted != "latest" else source
        if source is None:
            log.info("warm start: nothing is published yet, so the base starts from scratch")
            result = self.runner.run(WARM, lambda: StageOutput([], {"source_run": None}))
            return result if result["source_run"] else None
        if wanted != "latest" and not self.store.exists(f"runs/{source}/{MANIFEST}"):
            raise StageError(WARM, f"base.init_from: runs/{source} is not a published run")
        task = self.scheduler.remote(tasks.warm_start, WARM)
        seed = self.config.experiment.train.seed
        stage = ParallelStage(
            name=WARM,
            submit=lambda: [task.remote(self.context, source, WARM, seed)],
            finish=lambda values: StageOutput([f"models/{WARM}"], values[0]),
        )
        result = self.scheduler.run_parallel([stage])[WARM]
        log.info(
            "warm start from run %s: %d items kept, %d new, %d dropped",
            result["source_run"],
            result["kept"],
            result["new"],
            result["dropped"],
        )
        return result

    def stage_base(self, warm: dict[str, Any] | None = None) -> None:
        """The shared base: converged (finetune) or the first spawn_epoch epochs (spawn)."""
        pool = self.config.pool_config
        train = self.config.experiment.train
        epochs = pool.base_epochs(train.epochs)
        if epochs is None:
            return
        if warm is not None and self.config.base.warm_epochs is not None:
            epochs = self.config.base.warm_epochs
        experiment = self.experiment_for(
            self.config.experiment.model.backbone, {}, epochs, train.seed
        )
        if pool.strategy == "spawn":  # the shared phase runs its epochs: no early stop
            experiment["train"]["patience"] = max(train.patience, epochs + 1)
        init = f"models/{WARM}" if warm is not None else None
        self.scheduler.run_parallel(
            [self.training_stage(BASE, experiment, init, pool.spawns_from_last)]
        )

    def recipe_experiments(self) -> dict[str, dict[str, Any]]:
        """name -> the experiment of every pool member."""
        out = {}
        for position, entry in enumerate(self.config.recipes):
            seed = (
                entry.seed
                if entry.seed is not None
                else self.config.experiment.train.seed + position + 1
            )
            epochs = entry.epochs if entry.epochs is not None else self.config.recipe_epochs
            out[entry.name] = self.experiment_for(
                self.config.recipe_of(entry),
                entry.params,
                epochs,
                seed,
                self.config.recipe_lr_of(entry),
            )
        return out

    def stage_recipes(self) -> dict[str, dict[str, Any]]:
        """Every member of the pool, trained concurrently as the pool strategy says.

        With `control`, the equal-compute plain model trains alongside them.
        """
        pool = self.config.pool_config
        experiments = self.recipe_experiments()
        init = None
        if pool.shared_base:
            init = f"models/{BASE}/last" if pool.spawns_from_last else f"models/{BASE}"
        if pool.strategy == "population":
            stages = [self.population_stage(experiments)]
        else:
            stages = [self.training_stage(n, e, init) for n, e in experiments.items()]
        if self.config.control:
            # From the base in finetune (the fine-tunes' start), from scratch otherwise.
            start = init if pool.strategy == "finetune" else None
            stages.append(self.training_stage(CONTROL, self._control_experiment(), start))
        results = self.scheduler.run_parallel(stages)
        trained = results.pop(POPULATION, {})
        trained.update({name.removeprefix("train/"): result for name, result in results.items()})
        return trained

    def population_stage(self, experiments: dict[str, dict[str, Any]]) -> ParallelStage:
        """All members at once as Ray actors (training/population.py), driven by one task."""
        pool = self.config.pool_config
        task = self.scheduler.remote(tasks.train_population_members, POPULATION, coordinator=True)
        resources = self.config.resources
        return ParallelStage(
            name=POPULATION,
            submit=lambda: [
                task.remote(
                    self.context,
                    experiments,
                    pool.pull,
                    pool.exchange_every,
                    resources.num_gpus,
                )
            ],
            finish=lambda values: StageOutput([f"models/{n}" for n in experiments], values[0]),
        )

    def _control_experiment(self) -> dict[str, Any]:
        """The plain objective for every epoch the pool spent (its shared epochs included).

        At the fine-tunes' rate from the base in finetune; at the experiment's
        rate from scratch otherwise, so that early stopping may end it sooner
        (its history says when).
        """
        config, pool = self.config, self.config.pool_config
        epochs = sum(
            entry.epochs if entry.epochs is not None else config.recipe_epochs
            for entry in config.recipes
        )
        if pool.strategy == "spawn":
            epochs += pool.spawn_epoch
        backbone = config.experiment.model.backbone
        seed = config.experiment.train.seed + len(config.recipes) + 1
        return self.experiment_for(
            backbone, {}, epochs, seed, config.recipe_lr_of(config.recipes[0])
        )

    def stage_baselines(self, trained: dict[str, Any], merged: dict[str, Any]) -> dict[str, Any]:
        """The output ensemble and paired tests of every model against the best recipe."""
        pool = {entry.name: f"models/{entry.name}" for entry in self.config.recipes}
        others = {f"merged-{m}": f"merged/{m}" for m in merged}
        if CONTROL in trained:
            others[CONTROL] = f"models/{CONTROL}"
        task = self.scheduler.remote(tasks.evaluate_baselines, "baselines")
        stage = ParallelStage(
            "baselines",
            submit=lambda: [
                task.remote(self.context, pool, others, self.config.report.landscape_users)
            ],
            finish=lambda values: StageOutput([], values[0]),
        )
        return self.scheduler.run_parallel([stage])["baselines"]

    def pool_summary(self, baselines: dict[str, Any]) -> dict[str, Any]:
        """The pool strategy, its training budget and how different its members came out."""
        config, pool = self.config, self.config.pool_config
        epochs = [
            e.epochs if e.epochs is not None else config.recipe_epochs for e in config.recipes
        ]
        shared = pool.base_epochs(config.experiment.train.epochs) or 0
        seconds = [v for k, v in self.stage_seconds.items() if k.startswith("train/")]
        return {
            **pool.model_dump(mode="json"),
            "members": len(epochs),
            # Budgets: early stopping may end a run sooner (its history says when).
            "member_epochs_budget": shared + sum(epochs),
            "train_stage_seconds": sum(seconds) if seconds else None,
            **baselines.get("members", {}),
        }

    def stage_fishers(self) -> dict[str, dict[str, Any]]:
        """The Fisher of every recipe: Ray tasks over user shards, summed per recipe."""
        from merging.fisher import select_sequences

        spec = self.config.fisher
        fisher = spec.operation().model_dump()
        train = tasks.load_run_data(self.store.root, self.work).split().train
        ids, _ = select_sequences(train, spec.num_sequences, spec.seed)
        shards = tasks.shard(ids, spec.shards)
        shard_task = self.scheduler.remote(tasks.fisher_shard, "fisher")
        stages = []
        for entry in self.config.recipes:
            name = entry.name

            def submit(name: str = name) -> list[Any]:
                return [
                    shard_task.remote(self.context, name, f"models/{name}", part, fisher)
                    for part in shards
                ]

            def finish(values: list[Any], name: str = name) -> StageOutput:
                provenance = {"checkpoint": f"models/{name}", "estimator_config": fisher}
                result = tasks.combine_fisher_shards(self.context, name, values, provenance)
                return StageOutput([f"fisher/{name}.safetensors"], result)

            stages.append(ParallelStage(f"fisher/{name}", submit, finish))
        results = self.scheduler.run_parallel(stages)
        return {entry.name: results[f"fisher/{entry.name}"] for entry in self.config.recipes}

    def stage_merges(self) -> dict[str, dict[str, Any]]:
        """Every merge method of the config, as concurrent tasks (each evaluates its result)."""
        spec = self.config.merge
        names = [entry.name for entry in self.config.recipes]
        models = [f"models/{name}" for name in names]
        fishers = [f"fisher/{name}.safetensors" for name in names]
        merge_task = self.scheduler.remote(tasks.merge_models, "merge")
        stages = []
        for method in spec.methods:
            # The job's seed for every merge (Dirichlet draws, post-merge fine-tune).
            operation = spec.operation(method).model_copy(
                update={"seed": self.config.experiment.train.seed}
            )
            options = operation.model_dump(exclude={"method"})

            def submit(method: str = method, options: dict[str, Any] = options) -> list[Any]:
                inputs = fishers if method in NEEDS_FISHERS else None
                base = f"models/{BASE}" if method in NEEDS_BASE else None
                return [merge_task.remote(self.context, method, models, inputs, options, base)]

            def finish(values: list[Any], method: str = method) -> StageOutput:
                return StageOutput([f"merged/{method}"], values[0])

            stages.append(ParallelStage(f"merge/{method}", submit, finish))
        results = self.scheduler.run_parallel(stages)
        return {method: results[f"merge/{method}"] for method in spec.methods}

    def stage_metrics(
        self,
        trained: dict[str, dict[str, Any]],
        merged: dict[str, dict[str, Any]],
        baselines: dict[str, Any],
    ) -> dict[str, Any]:
        """One table of every model (training, merges, the ensemble, MostPop) and the tests."""

        def work() -> StageOutput:
            any_result = next(iter(trained.values()))
            table = {name: result["metrics"]["model"] for name, result in trained.items()}
            table.update(
                {f"merged-{m}": result["metrics"]["model"] for m, result in merged.items()}
            )
            table[ENSEMBLE] = baselines["ensemble"]
            table["mostpop"] = any_result["metrics"]["mostpop"]
            document = {
                "protocol": any_result["metrics"]["protocol"],
                "models": table,
                "best_recipe": baselines["best_recipe"],
                "vs_best_recipe": baselines["vs_best_recipe"],
                "pool": self.pool_summary(baselines),
            }
            self.store.write_text(
                f"{self.work}/metrics.json", json.dumps(document, indent=2) + "\n"
            )
            return StageOutput(["metrics.json"], document)

        return self.runner.run("metrics", work)

    def published_model(self, metrics: dict[str, Any]) -> tuple[str, str]:
        """(table name, store path) of the model to export."""
        choice = self.config.merge.publish
        if choice != "best":
            if choice not in self.config.merge.methods:
                raise StageError(
                    "export", f"merge.publish is {choice!r} but merge.methods lacks it"
                )
            return f"merged-{choice}", f"merged/{choice}"
        # The ensemble is M models, not one that could be exported.
        candidates = {k: v for k, v in metrics["models"].items() if k not in ("mostpop", ENSEMBLE)}
        best = max(candidates, key=lambda name: candidates[name]["valid"]["full"]["ndcg@10"])
        return best, (
            f"merged/{best.removeprefix('merged-')}"
            if best.startswith("merged-")
            else f"models/{best}"
        )

    def stage_export(self, model: str, fields: dict[str, Any]) -> dict[str, Any]:
        export_task = self.scheduler.remote(tasks.export_model, "export")
        export = self.config.export.model_dump()
        stage = ParallelStage(
            "export",
            submit=lambda: [export_task.remote(self.context, model, export, fields)],
            finish=lambda values: StageOutput(["bundle"], values[0]),
        )
        return self.scheduler.run_parallel([stage])["export"]

    def stage_report(self, info: dict[str, Any]) -> dict[str, Any]:
        report_task = self.scheduler.remote(tasks.write_run_report, "report")
        stage = ParallelStage(
            "report",
            submit=lambda: [report_task.remote(self.context, info)],
            finish=lambda values: StageOutput(["report"], values[0]),
        )
        return self.scheduler.run_parallel([stage])["report"]

    def stage_publish(self, gate: dict[str, Any] | None = None) -> str:
        """Bundle + report + metrics as runs/<run_id>/, verified, then LATEST (docs/export.md, "The model bundle")."""

        def work() -> StageOutput:
            relative = publish_bundle(
                self.store, self.work, self.run_id, self.context.scratch("publish"), gate
            )
            return StageOutput([], {"bundle": relative})

        return self.runner.run("publish", work)["bundle"]

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
        self.save_config()
        data = self.stage_data()
        warm = self.stage_warm_start()
        self.stage_base(warm)
        trained = self.stage_recipes()
        base_result = self._base_result()
        fishers = self.stage_fishers()
        merged = self.stage_merges()
        baselines = self.stage_baselines(trained, merged)
        everything = {**({BASE: base_result} if base_result else {}), **trained}
        metrics = self.stage_metrics(everything, merged, baselines)
        self.tracker.metrics(metrics)
        label, model = self.published_model(metrics)
        data = {**data, "warm_start": warm}
        merge_info = {
            "published": label,
            "methods": {m: {"coefficients": r["coefficients"]} for m, r in merged.items()},
            "estimator": self.config.fisher.estimator,
            "fisher_sequences": {n: r["sequences"] for n, r in fishers.items()},
        }
        fields = {
            "run_id": self.run_id,
            "recipes": [
                {"name": e.name, "recipe": self.config.recipe_of(e), "params": e.params}
                for e in self.config.recipes
            ],
            "merge": merge_info,
            "metrics": metrics["models"][label],
        }
        self.stage_export(model, fields)
        self.stage_report(self._report_info(data, metrics, label, model, merged, base_result))
        if self.config.tracking.enabled:
            self.tracker.report(
                self.store.download_folder(
                    f"{self.work}/report", self.context.scratch("tracked-report")
                )
            )
        # A run that already published is not judged again (its manifest has the decision).
        published = self.runner.completed("publish") is not None
        gate = None if published else self.check_gate()
        if gate is not None and not (gate["passed"] or gate["forced"]):
            self.write_outcome("refused", gate=gate)
            raise GateRefused(GateDecision(**gate).describe() + "; LATEST is unchanged")
        bundle = self.stage_publish(gate)
        if self.config.tracking.enabled and not published:
            self.tracker.published(
                self.run_id,
                self.store.download_folder(bundle, self.context.scratch("tracked-bundle")),
            )
        apply_retention(self.store, self.config.retention.keep_runs, self.run_id)
        if not published:
            self.write_outcome("published", gate=gate, bundle=bundle)
        return PipelineResult(self.run_id, bundle, metrics, dict(self.stage_seconds))

    def check_gate(self) -> dict[str, Any] | None:
        """Champion/challenger (merging/pipeline/gate.py); None when the gate is off."""
        spec = self.config.gate
        if not spec.enabled:
            return None
        latest = self.store.read_text(LATEST).strip() if self.store.exists(LATEST) else None
        champion = latest if latest and latest != self.run_id else None
        task = self.scheduler.remote(tasks.check_gate, "gate")
        stage = ParallelStage(
            "gate",
            submit=lambda: [
                task.remote(self.context, champion, spec.metric, spec.tolerance, self.force_publish)
            ],
            finish=lambda values: StageOutput([], values[0]),
        )
        decision = self.scheduler.run_parallel([stage], record=False)["gate"]
        log.info("%s", GateDecision(**decision).describe())
        return decision

    def write_outcome(self, outcome: str, **fields: Any) -> None:
        """work/<run_id>/outcome.json: what the run ended with, for schedulers and ops."""
        document = {"run_id": self.run_id, "outcome": outcome, "finished": utc_now(), **fields}
        self.store.write_text(f"{self.work}/{OUTCOME}", json.dumps(document, indent=2) + "\n")
        self.tracker.finish(outcome, **fields)

    def _base_result(self) -> dict[str, Any] | None:
        done = self.runner.completed(f"train/{BASE}")
        return done["result"] if done else None

    def _report_info(
        self,
        data: dict[str, Any],
        metrics: dict[str, Any],
        label: str,
        model: str,
        merged: dict[str, Any],
        base_result: dict[str, Any] | None,
    ) -> dict[str, Any]:
        names = [entry.name for entry in self.config.recipes]
        trained = {n: f"models/{n}" for n in names}
        offsets: dict[str, int] = {}
        pool = self.config.pool_config
        if pool.shared_base:
            trained = {BASE: f"models/{BASE}", **trained}
            start = (base_result or {}).get("best_epoch", 0)
            if pool.strategy == "spawn":
                start = pool.spawn_epoch
            offsets = dict.fromkeys(names, max(0, int(start)))
        return {
            "run_id": self.run_id,
            "summary": {
                "data": f"{self.config.experiment.data.path} ({data['num_users']} users, {data['num_items']} items, "
                f"{data['num_interactions']} interactions, {data['fingerprint'][:19]}...)",
                "backbone": self.config.experiment.model.backbone,
                "setting": describe_pool(metrics.get("pool")) or self.config.setting,
                "protocol": data.get("protocol", "leave-one-out"),
                "base": describe_warm_start(self.config.base.init_from, data.get("warm_start")),
                "Fisher estimator": self.config.fisher.estimator,
                "published model": label,
            },
            "metrics": metrics["models"],
            "best_recipe": metrics["best_recipe"],
            "vs_best_recipe": metrics["vs_best_recipe"],
            "trained": trained,
            "epoch_offsets": offsets,
            "recipes": names,
            "fishers": {n: f"fisher/{n}.safetensors" for n in names},
            "merged": {f"merged-{m}": f"merged/{m}" for m in merged},
            "published_model": model,
            "stage_seconds": dict(self.stage_seconds),
            "report": self.config.report.model_dump(),
        }


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
