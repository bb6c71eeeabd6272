"""Judging the run: what a merge must beat, the one metrics table, and the model to publish.

`stage_baselines` evaluates the output ensemble of the pool and compares every
model with the best member by paired tests (a Ray task, `evaluate_baselines`);
`stage_metrics` writes metrics.json from every stage's results; and
`published_model` picks what the export stage exports (docs/pipeline.md).
"""

from __future__ import annotations

import json
from typing import Any

from merging.pipeline.config import CONTROL, PipelineConfig
from merging.pipeline.pool_stage import pool_summary
from merging.pipeline.stage_context import StageContext
from merging.pipeline.stages import StageError, StageOutput
from merging.pipeline.task_context import TaskContext, load_run_data, local_checkpoint, start_task

ENSEMBLE = "ensemble"


# ---- stages -----------------------------------------------------------------------------


def stage_baselines(
    run: StageContext, trained: dict[str, Any], merged: dict[str, Any]
) -> dict[str, Any]:
    """The output ensemble and paired tests of every model against the best recipe."""
    pool = {entry.name: f"models/{entry.name}" for entry in run.config.recipes}
    others = {f"merged-{m}": f"merged/{m}" for m in merged}
    if CONTROL in trained:
        others[CONTROL] = f"models/{CONTROL}"
    users = run.config.report.landscape_users
    return run.run_task("baselines", evaluate_baselines, pool, others, users)


def stage_metrics(
    run: StageContext,
    trained: dict[str, dict[str, Any]],
    merged: dict[str, dict[str, Any]],
    baselines: dict[str, Any],
) -> dict[str, Any]:
    """One table of every model (training, merges, the ensemble, MostPop) and the tests."""

    def work() -> StageOutput:
        any_result = next(iter(trained.values()))
        table = {name: result["metrics"]["model"] for name, result in trained.items()}
        table.update({f"merged-{m}": result["metrics"]["model"] for m, result in merged.items()})
        table[ENSEMBLE] = baselines["ensemble"]
        table["mostpop"] = any_result["metrics"]["mostpop"]
        document = {
            "protocol": any_result["metrics"]["protocol"],
            "models": table,
            "best_recipe": baselines["best_recipe"],
            "vs_best_recipe": baselines["vs_best_recipe"],
            "pool": pool_summary(run, baselines),
        }
        run.store.write_text(f"{run.work}/metrics.json", json.dumps(document, indent=2) + "\n")
        return StageOutput(["metrics.json"], document)

    return run.runner.run("metrics", work)


def published_model(config: PipelineConfig, metrics: dict[str, Any]) -> tuple[str, str]:
    """(table name, store path) of the model to export."""
    choice = config.merge.publish
    if choice != "best":
        if choice not in config.merge.methods:
            raise StageError("export", f"merge.publish is {choice!r} but merge.methods lacks it")
        return f"merged-{choice}", f"merged/{choice}"
    # The ensemble is M models, not one that could be exported.
    candidates = {k: v for k, v in metrics["models"].items() if k not in ("mostpop", ENSEMBLE)}
    best = max(candidates, key=lambda name: candidates[name]["valid"]["full"]["ndcg@10"])
    return best, (
        f"merged/{best.removeprefix('merged-')}" if best.startswith("merged-") else f"models/{best}"
    )


# ---- tasks ------------------------------------------------------------------------------


def evaluate_model(
    context: TaskContext, name: str, relative: str, eval_seed: int
) -> dict[str, Any]:
    """The metrics document of a checkpoint in the store."""
    from training.evaluate import Evaluator
    from training.run_folder import load_run_checkpoint

    start_task(context, f"evaluate/{name}")
    data = load_run_data(context.store_root, context.work)
    checkpoint = load_run_checkpoint(local_checkpoint(context, relative))
    return Evaluator(data.split(), seed=eval_seed).metrics_document(checkpoint.model)


def evaluate_baselines(
    context: TaskContext, pool: dict[str, str], others: dict[str, str], line_users: int = 500
) -> dict[str, Any]:
    """What a merge must beat, on the run's test users (docs/pipeline.md).

    The output ensemble of the pool (mean log-probability, M times the serving
    cost) is evaluated; every other model and the ensemble are compared with the
    best pool member on validation by a paired test on per-user test NDCG@10,
    with the share of the ensemble's gain each reaches. Also how the members
    differ: error inconsistency of every pair, and (line_users > 0) validation
    NDCG@10 on the line between the first two members and its barrier.
    """
    from merging.ensemble import ensemble_max_len, ensemble_scorer
    from merging.significance import paired_comparison
    from training.diagnostics import error_inconsistency
    from training.evaluate import Evaluator
    from training.run_folder import load_run_checkpoint

    start_task(context, "baselines")
    data = load_run_data(context.store_root, context.work)
    evaluator = Evaluator(data.split())
    models = {
        name: load_run_checkpoint(local_checkpoint(context, relative)).model
        for name, relative in {**pool, **others}.items()
    }
    results = {
        name: {p: evaluator.evaluate_model(m, p) for p in ("valid", "test")}
        for name, m in models.items()
    }
    members = [models[name] for name in pool]
    scorer, length = ensemble_scorer(members), ensemble_max_len(members)
    results[ENSEMBLE] = {p: evaluator.evaluate(scorer, p, length) for p in ("valid", "test")}

    def ndcg(name: str, part: str) -> float:
        return float(results[name][part].metrics["full"]["ndcg@10"])

    best = max(pool, key=lambda name: ndcg(name, "valid"))
    users = {name: parts["test"].per_user["full"]["ndcg@10"] for name, parts in results.items()}
    gain = ndcg(ENSEMBLE, "test") - ndcg(best, "test")
    names = list(pool)
    return {
        "members": {
            "error_inconsistency": {
                f"{a} | {b}": error_inconsistency(users[a], users[b])
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            },
            "line": member_line(models[names[0]], models[names[1]], data, line_users)
            if len(names) > 1 and line_users > 0
            else None,
        },
        "best_recipe": best,
        "ensemble": {p: results[ENSEMBLE][p].metrics for p in ("valid", "test")},
        "ensemble_members": len(pool),
        "vs_best_recipe": {
            name: {
                **paired_comparison(users[name], users[best]).to_dict(),
                "ensemble_gain_share": (ndcg(name, "test") - ndcg(best, "test")) / gain
                if gain > 0
                else None,
            }
            for name in results
            if name != best
        },
    }


def member_line(first: Any, second: Any, data: Any, users: int) -> dict[str, Any]:
    """Validation NDCG@10 on the line between two members, and its barrier (`line_barrier`)."""
    from merging.landscape import line_barrier, line_profile, validation_probe

    probe = validation_probe(data.split(), users=users, seed=0)
    line = line_profile(first.state_dict(), second.state_dict(), first, probe, points=9, extend=0.0)
    return {**line, "barrier": line_barrier(line)[0]}
