"""Training the pool: the shared base, the members (as the pool strategy says) and the control.

The driver side builds each member's experiment from the job config and runs
the training stages; the task side (`train_model`, `train_population_members`)
trains in a Ray worker and uploads the run folder to models/<name>. The pool
strategies themselves live in training/pool.py and training/population.py.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

from merging.pipeline.config import CONTROL, PipelineConfig
from merging.pipeline.scheduler import ParallelStage
from merging.pipeline.stage_context import StageContext
from merging.pipeline.task_context import (
    TaskContext,
    load_run_data,
    local_checkpoint,
    start_task,
    with_staged_features,
)
from merging.pipeline.warm_start_stage import WARM

BASE = "base"
POPULATION = "train/population"  # the one stage that trains a population's members


# ---- experiments ------------------------------------------------------------------------


def experiment_for(
    config: PipelineConfig,
    recipe: str,
    params: dict[str, Any],
    epochs: int,
    seed: int,
    lr: float | None = None,
) -> dict[str, Any]:
    """The experiment of one training stage: the job's, with this recipe, budget and seed."""
    values = config.experiment.model_dump(mode="json")
    values["recipe"] = {"name": recipe, "params": {**shared_loss_params(config), **params}}
    values["train"].update(epochs=epochs, seed=seed, progress=False, device=device_of(config))
    if values["train"]["workers"] > 1 and values["train"]["num_threads"] is None:
        values["train"]["num_threads"] = int(max(1, config.resources.num_cpus))
    if lr is not None:
        values["train"]["lr"] = lr
    return values


def shared_loss_params(config: PipelineConfig) -> dict[str, Any]:
    """experiment.recipe.params of the plain objective (e.g. sampled softmax): every stage's.

    A recipe entry's own params override them.
    """
    from training.recipes.base import RecipeParams

    shared = config.experiment.recipe.params
    return {k: v for k, v in shared.items() if k in RecipeParams.model_fields}


def device_of(config: PipelineConfig) -> str:
    return "cuda" if config.resources.num_gpus > 0 else "cpu"


def recipe_experiments(config: PipelineConfig) -> dict[str, dict[str, Any]]:
    """name -> the experiment of every pool member."""
    out = {}
    init_seed = config.pool_config.member_init_seed(config.experiment.train.seed)
    for position, entry in enumerate(config.recipes):
        seed = entry.seed if entry.seed is not None else config.experiment.train.seed + position + 1
        epochs = entry.epochs if entry.epochs is not None else config.recipe_epochs
        out[entry.name] = experiment_for(
            config,
            config.recipe_of(entry),
            entry.params,
            epochs,
            seed,
            config.recipe_lr_of(entry),
        )
        if init_seed is not None:
            out[entry.name]["train"]["init_seed"] = init_seed
    return out


def control_experiment(config: PipelineConfig) -> dict[str, Any]:
    """The plain objective for every epoch the pool spent (its shared epochs included).

    At the fine-tunes' rate from the base in finetune; at the experiment's
    rate from scratch otherwise, so that early stopping may end it sooner
    (its history says when).
    """
    pool = config.pool_config
    epochs = sum(
        entry.epochs if entry.epochs is not None else config.recipe_epochs
        for entry in config.recipes
    )
    if pool.strategy == "spawn":
        epochs += pool.spawn_epoch
    backbone = config.experiment.model.backbone
    seed = config.experiment.train.seed + len(config.recipes) + 1
    return experiment_for(
        config, backbone, {}, epochs, seed, config.recipe_lr_of(config.recipes[0])
    )


# ---- stages -----------------------------------------------------------------------------


def training_stage(
    run: StageContext,
    name: str,
    experiment: dict[str, Any],
    init: str | None,
    keep_last: bool = False,
) -> ParallelStage:
    """The stage train/<name>: one task (a coordinator when data-parallel) into models/<name>."""
    workers = experiment["train"]["workers"]
    task = run.scheduler.remote(train_model, f"train/{name}", coordinator=workers > 1)
    return run.task_stage(
        f"train/{name}", task, name, experiment, init, keep_last, outputs=(f"models/{name}",)
    )


def stage_base(run: StageContext, warm: dict[str, Any] | None = None) -> None:
    """The shared base: converged (finetune) or the first spawn_epoch epochs (spawn)."""
    config = run.config
    pool = config.pool_config
    train = config.experiment.train
    epochs = pool.base_epochs(train.epochs)
    if epochs is None:
        return
    if warm is not None and config.base.warm_epochs is not None:
        epochs = config.base.warm_epochs
    experiment = experiment_for(config, config.experiment.model.backbone, {}, epochs, train.seed)
    if pool.strategy == "spawn":  # the shared phase runs its epochs: no early stop
        experiment["train"]["patience"] = max(train.patience, epochs + 1)
    init = f"models/{WARM}" if warm is not None else None
    run.scheduler.run_parallel([training_stage(run, BASE, experiment, init, pool.spawns_from_last)])


def stage_recipes(run: StageContext) -> dict[str, dict[str, Any]]:
    """Every member of the pool, trained concurrently as the pool strategy says.

    With `control`, the equal-compute plain model trains alongside them.
    """
    config = run.config
    pool = config.pool_config
    experiments = recipe_experiments(config)
    init = None
    if pool.shared_base:
        init = f"models/{BASE}/last" if pool.spawns_from_last else f"models/{BASE}"
    if pool.strategy == "population":
        stages = [population_stage(run, experiments)]
    else:
        stages = [training_stage(run, n, e, init) for n, e in experiments.items()]
    if config.control:
        # From the base in finetune (the fine-tunes' start), from scratch otherwise.
        start = init if pool.strategy == "finetune" else None
        stages.append(training_stage(run, CONTROL, control_experiment(config), start))
    results = run.scheduler.run_parallel(stages)
    trained = results.pop(POPULATION, {})
    trained.update({name.removeprefix("train/"): result for name, result in results.items()})
    return trained


def population_stage(run: StageContext, experiments: dict[str, dict[str, Any]]) -> ParallelStage:
    """All members at once as Ray actors (training/population.py), driven by one task."""
    pool = run.config.pool_config
    task = run.scheduler.remote(train_population_members, POPULATION, coordinator=True)
    num_gpus = run.config.resources.num_gpus
    outputs = tuple(f"models/{name}" for name in experiments)
    return run.task_stage(
        POPULATION,
        task,
        experiments,
        pool.pull,
        pool.exchange_every,
        num_gpus,
        pool.pull_per_epoch,
        pool.pull_schedule,
        outputs=outputs,
    )


def base_result(run: StageContext) -> dict[str, Any] | None:
    """The shared base's training result, if this run trained one."""
    done = run.runner.completed(f"train/{BASE}")
    return done["result"] if done else None


def pool_summary(run: StageContext, baselines: dict[str, Any]) -> dict[str, Any]:
    """The pool strategy, its training budget and how different its members came out."""
    config, pool = run.config, run.config.pool_config
    epochs = [e.epochs if e.epochs is not None else config.recipe_epochs for e in config.recipes]
    shared = pool.base_epochs(config.experiment.train.epochs) or 0
    seconds = [v for k, v in run.stage_seconds.items() if k.startswith("train/")]
    return {
        **pool.model_dump(mode="json"),
        "members": len(epochs),
        # Budgets: early stopping may end a run sooner (its history says when).
        "member_epochs_budget": shared + sum(epochs),
        "train_stage_seconds": sum(seconds) if seconds else None,
        **baselines.get("members", {}),
    }


# ---- tasks ------------------------------------------------------------------------------


def train_model(
    context: TaskContext,
    name: str,
    experiment: dict[str, Any],
    init: str | None,
    keep_last: bool = False,
) -> dict[str, Any]:
    """Train one model into `models/<name>` of the work folder (resuming a crashed attempt).

    keep_last: also publish last/ (a spawn base: members start from its last epoch).
    """
    from training.config import ExperimentConfig
    from training.run import train

    start_task(context, f"train/{name}")
    config = ExperimentConfig.model_validate(with_staged_features(context, experiment))
    data = load_run_data(context.store_root, context.work)
    scratch = context.scratch(f"train/{name}")
    init_path = local_checkpoint(context, init) if init else None
    result = train(config, data, scratch, init=init_path, resume=True)
    publish_run(context, name, scratch, keep_last)
    return {
        "name": name,
        "best_epoch": result.best_epoch,
        "best_score": result.best_score,
        "metrics": result.metrics,
    }


def publish_run(context: TaskContext, name: str, run_dir: Path, keep_last: bool = False) -> None:
    """Upload a trained run folder to `models/<name>` (best/, config, history, metrics)."""
    publishable = context.scratch(f"out/{name}")
    shutil.rmtree(publishable, ignore_errors=True)
    publishable.mkdir(parents=True)
    items = ["best", "config.yaml", "history.json", "metrics.json"] + (
        ["last"] if keep_last else []
    )
    for item in items:
        source = run_dir / item
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, publishable / item)
    context.store.upload_folder(publishable, f"{context.work}/models/{name}")


def train_population_members(
    context: TaskContext,
    experiments: dict[str, dict[str, Any]],
    pull: float,
    exchange_every: int,
    num_gpus: float = 0.0,
    pull_per_epoch: float | None = None,
    pull_schedule: str = "constant",
) -> dict[str, dict[str, Any]]:
    """The pool as a population (training/population.py): one actor per member.

    This task only drives: each actor loads the run's data, trains, and uploads
    its own run to `models/<name>` (actors may sit on any node). A retried task
    resumes every member from its last epoch.
    """
    from training.population import MemberSpec, train_population

    start_task(context, "train/population")
    members = [
        MemberSpec(
            name,
            with_staged_features(context, experiment),
            str(context.scratch(f"train/{name}")),
        )
        for name, experiment in experiments.items()
    ]
    results = train_population(
        members,
        functools.partial(load_run_data, context.store_root, context.work),
        pull,
        exchange_every,
        threads=context.threads,
        num_gpus=num_gpus,
        resume=True,
        on_finish=functools.partial(publish_run, context),
        pull_per_epoch=pull_per_epoch,
        pull_schedule=pull_schedule,
    )
    return {
        name: {
            "name": name,
            "best_epoch": result["best_epoch"],
            "best_score": result["best_score"],
            "metrics": result["metrics"],
        }
        for name, result in results.items()
    }
