"""The core claim: does the merged model beat every model it was merged from?

    python benchmarks/merge_baselines.py --data /work/data/ml-1m --config configs/ml-1m.yaml \
        --base-epochs 30 --recipe-epochs 5 --recipe-lr 3e-4 --seeds 0 \
        --out benchmarks/results/merge-ml-1m.json

Per seed, setting finetune (the default, as the thesis's main setting):
1. a plain base trained for --base-epochs (early stopping as the config says);
2. the pool: `plain` and every --recipes entry fine-tuned from the base for
   --recipe-epochs at --recipe-lr;
3. the equal-compute control: `plain` fine-tuned from the base for
   M x --recipe-epochs (every epoch the pool spent, spent on the plain objective);
4. each member's exact diagonal Fisher over --fisher-sequences training sequences;
5. merges: uniform and greedy soups, Fisher (λ uniform), Fisher with λ searched
   on validation, Fisher with λ per parameter group (searched), RegMean (Grams
   from the Fisher pass), task arithmetic and TIES relative to the base (scale
   searched), each also with --finetune-epochs of post-merge fine-tune
   (validated first: the merged start is kept unless an epoch beats it);
6. the output ensemble of the pool (mean log-probability: M times the cost).

Setting scratch (--setting scratch, the thesis's other setting): every pool
member trains from its own initialisation for --base-epochs at the config's
rate; there is no base, so no task-vector merges (task arithmetic, TIES), and
the evidence gives the distances between members and the validation line
between the two best members. Settings spawn (--spawn-epoch shared epochs,
then --recipe-epochs per member at the config's rate) and population
(--base-epochs per member from its own initialisation, pulled --pull toward the
members' mean every --exchange-every steps) are the other pool strategies of
training/pool.py; members train at once as Ray actors (training/population.py).
The control is a plain model given the pool's whole budget in epochs: from the
base in finetune, from scratch otherwise (counting spawn's shared epochs). The thesis finds that merging
such models loses: they sit in different basins of the loss (permutation
symmetry of the hidden units), and their average falls between them.

The best recipe is the pool member with the best validation NDCG@10 (chosen
like a user would choose, not on test). Every row is compared with it on the
test users by a paired t-test and a paired bootstrap (merging/significance.py);
"ens. gain" is the share of the ensemble's gain over the best recipe a row
reaches. Over several seeds the table shows mean ± std and the p-value of the
users pooled over seeds. Also printed: the pool's error inconsistency and each
contrastive recipe's last-epoch loss next to log(2B - 1), the value of a term
that cannot tell positives from negatives.

Results go to the JSON per seed as each seed finishes; a rerun reuses the
trained runs and Fishers it finds under --work (a seed whose runs are gone is
trained again) and keeps the seeds the JSON already holds, so seeds can run in
separate sessions. `over_seeds` (mean ± std and each seed's own test) and the
PNG of test NDCG@10 per row cover every stored seed; the pooled p-values need
per-user scores, which the JSON does not keep, so they cover the seeds of this
invocation (`pooled_seeds`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from recipes import PLAIN, base_experiment, experiment_parser, parse_recipe  # benchmarks/recipes.py
from scipy import stats

from merging.ensemble import ensemble_max_len, ensemble_scorer
from merging.fisher import FisherConfig, checkpoint_fisher
from merging.fisher_file import load_fisher, model_sha256, save_fisher
from merging.landscape import flat_weights, line_profile, validation_probe
from merging.merge import merge_checkpoints
from merging.methods import NEEDS_BASE, NEEDS_FISHERS, MergeConfig
from merging.significance import paired_comparison
from training.config import ExperimentConfig
from training.diagnostics import error_inconsistency
from training.evaluate import EvalResult, Evaluator
from training.flags import add_override_flags
from training.pool import POOL_STRATEGIES, PoolConfig
from training.population import MemberSpec, train_population
from training.prepare import load_data
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData

log = logging.getLogger("benchmarks.merge_baselines")
METRIC = ("full", "ndcg@10")
ENSEMBLE = "ensemble (Mx cost)"
CONTROL = "plain, equal compute"
WITHOUT_WEAKEST = "fisher without the weakest"


def parse_args() -> argparse.Namespace:
    parser = experiment_parser(__doc__)
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=[
            "cl4srec:similarity=cos,temperature=0.2",
            "duorec:mode=both,similarity=cos,temperature=0.2",
            "ehrec:similarity=cos,temperature=0.2",
        ],
        help="recipes merged with plain: NAME or NAME:key=value,...",
    )
    parser.add_argument(
        "--setting",
        choices=list(POOL_STRATEGIES),
        default="finetune",
        help="the pool strategy (training/pool.py): "
        + "; ".join(f"{k}: {v}" for k, v in POOL_STRATEGIES.items()),
    )
    parser.add_argument(
        "--base-epochs", type=int, default=30, help="scratch, population: every member"
    )
    parser.add_argument("--spawn-epoch", type=int, default=2, help="spawn: shared epochs")
    parser.add_argument("--pull", type=float, default=0.1, help="population: pull per exchange")
    parser.add_argument("--exchange-every", type=int, default=10, help="population: steps")
    parser.add_argument("--recipe-epochs", type=int, default=5)
    parser.add_argument("--recipe-lr", type=float, default=3e-4)
    parser.add_argument("--finetune-epochs", type=int, default=1, help="post-merge fine-tune")
    parser.add_argument("--fisher-sequences", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-control", action="store_true", help="skip the equal-compute plain")
    add_override_flags(parser)
    parser.add_argument("--work", default=None, help="runs and Fishers (default: beside --out)")
    parser.add_argument("--out", required=True, help="results JSON (PNG beside it)")
    return parser.parse_args()


# ---- training the pool ----------------------------------------------------------------


def folder_name(label: str) -> str:
    """A row or recipe label as a folder name: 'cl4srec:weight=0.1' -> 'cl4srec_weight-0.1'."""
    for old, new in ((" + ", "_"), (" ", "_"), (":", "_"), (",", "_"), ("=", "-")):
        label = label.replace(old, new)
    return label


def experiment(
    base: ExperimentConfig, recipe: str, params: dict, epochs: int, seed: int, lr: float
) -> ExperimentConfig:
    values = base.model_dump(mode="json")
    values["recipe"] = {"name": recipe, "params": params}
    values["train"] = {**values["train"], "epochs": epochs, "seed": seed, "lr": lr}
    values["train"]["progress"] = False
    return ExperimentConfig.model_validate(values)


def train_pool(
    args: argparse.Namespace, base: ExperimentConfig, data: SequenceData, seed: int, work: Path
) -> tuple[dict[str, Path], Path | None, Path | None, dict[str, Any]]:
    """Run folders of the pool, the shared base and the control; what each recipe's training logged.

    The pool strategy (training/pool.py) says where members start: finetune and
    spawn from a shared base (converged, or after --spawn-epoch epochs), scratch
    and population from their own initialisations. Scratch and population have
    no base (None), so no task-vector merges; their control is a plain model
    trained from scratch for the pool's whole budget.
    """
    pool = pool_config(args)
    backbone = base.model.backbone
    base_run = None
    base_epochs = pool.base_epochs(args.base_epochs)
    if base_epochs is not None:
        log.info("seed %d: shared base, %d epochs (%s)", seed, base_epochs, pool.strategy)
        base_cfg = experiment(base, backbone, {}, base_epochs, seed, base.train.lr)
        if pool.strategy == "spawn":  # the shared phase runs its epochs: no early stop
            patience = max(base_cfg.train.patience, base_epochs + 1)
            base_cfg = base_cfg.model_copy(
                update={"train": base_cfg.train.model_copy(update={"patience": patience})}
            )
        base_run = train(base_cfg, data, work / "base", resume=True).run_dir
    own = pool.strategy in ("scratch", "population")
    epochs = args.base_epochs if own else args.recipe_epochs
    lr = pool.member_lr(base.train.lr, args.recipe_lr)
    init = pool.member_start(base_run) if base_run is not None else None
    specs = [parse_recipe(PLAIN), *(parse_recipe(spec) for spec in args.recipes)]
    members = []
    for position, spec in enumerate(specs, start=1):
        name = backbone if spec.name == PLAIN else spec.name
        # Distinct seeds: members from their own initialisations must not share one.
        cfg = experiment(base, name, spec.params, epochs, seed + position, lr)
        folder = work / folder_name(spec.label)
        members.append(MemberSpec(spec.label, cfg.model_dump(mode="json"), str(folder), init))
    log.info("seed %d: %d members, %d epochs each (%s)", seed, len(members), epochs, pool.strategy)
    pull = pool.pull if pool.strategy == "population" else 0.0
    loader = functools.partial(load_data, Path(args.data))
    threads = max(1, (os.cpu_count() or 2) // len(members))
    with ray_session():
        trained = train_population(
            members, loader, pull, pool.exchange_every, threads=threads, resume=True
        )
    runs = {label: Path(result["run_dir"]) for label, result in trained.items()}
    logs = {
        label: {k: v for k, v in result["history"][-1].items() if k.endswith("loss")}
        for label, result in trained.items()
    }
    control = None
    if not args.no_control:
        shared = (base_epochs or 0) if pool.strategy == "spawn" else 0
        budget = len(specs) * epochs + shared
        start = base_run if pool.strategy == "finetune" else None
        log.info("seed %d: equal-compute plain, %d epochs", seed, budget)
        cfg = experiment(base, backbone, {}, budget, seed + len(specs) + 1, lr)
        control = train(cfg, data, work / "control", init=start, resume=True).run_dir
    return runs, base_run, control, logs


@contextlib.contextmanager
def ray_session():  # type: ignore[no-untyped-def]
    """A local Ray for the members' actors (stopped after: the rest of a seed runs in process)."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def pool_config(args: argparse.Namespace) -> PoolConfig:
    return PoolConfig(
        strategy=args.setting,
        spawn_epoch=args.spawn_epoch,
        pull=args.pull,
        exchange_every=args.exchange_every,
    )


def fisher_path(
    run: Path, label: str, args: argparse.Namespace, data: SequenceData, work: Path
) -> Path:
    """The exact Fisher of one run, computed once and reused while the checkpoint is the same."""
    config = FisherConfig(estimator="exact", num_sequences=args.fisher_sequences)
    path = work / "fishers" / f"{folder_name(label)}.safetensors"
    if path.is_file():
        meta = load_fisher(path).metadata
        same = meta.get("config") == config.model_dump(mode="json")
        if same and meta.get("checkpoint_sha256") == model_sha256(load_run_checkpoint(run)):
            return path
    result, meta = checkpoint_fisher(run, data, config)
    save_fisher(path, result.file_tensors(), meta)
    return path


def merge_all(
    args: argparse.Namespace,
    runs: dict[str, Path],
    base: Path | None,
    data: SequenceData,
    work: Path,
    weakest: str,
) -> dict[str, Path]:
    """Folder of every merged model (plain merges and their post-merge fine-tunes).

    "fisher without the weakest" merges the pool less its weakest member on
    validation (thesis Table 4.6: does a weak recipe hurt?; the seed's document
    names it); greedy chooses itself.
    Without a base (scratch) the task-vector merges are left out.
    """
    fishers = {label: fisher_path(run, label, args, data, work) for label, run in runs.items()}
    methods = {
        "uniform": MergeConfig(method="uniform"),
        "greedy": MergeConfig(method="greedy"),
        "fisher": MergeConfig(method="fisher"),
        "fisher + λ search": MergeConfig(method="fisher", search=True),
        "fisher per group + search": MergeConfig(method="fisher_grouped", search=True),
        "regmean": MergeConfig(method="regmean"),
        "task arithmetic + scale search": MergeConfig(method="task_arithmetic", search=True),
        "ties + scale search": MergeConfig(method="ties", search=True),
        WITHOUT_WEAKEST: MergeConfig(method="fisher"),
    }
    if base is None:
        methods = {k: v for k, v in methods.items() if v.method not in NEEDS_BASE}
    if args.finetune_epochs:
        for label in list(methods):
            methods[f"{label} + fine-tune"] = methods[label].model_copy(
                update={"finetune_epochs": args.finetune_epochs}
            )
    folders = {}
    for label, config in methods.items():
        folder = work / "merged" / folder_name(label)
        done = folder / ("best" if config.finetune_epochs else "") / "checkpoint.json"
        if not done.is_file():
            log.info("merging: %s", label)
            shutil.rmtree(folder, ignore_errors=True)
            members = [m for m in runs if not (label.startswith(WITHOUT_WEAKEST) and m == weakest)]
            merge_checkpoints(
                [runs[m] for m in members],
                folder,
                config,
                [fishers[m] for m in members] if config.method in NEEDS_FISHERS else None,
                data,
                base=base if config.method in NEEDS_BASE else None,
            )
        folders[label] = folder
    return folders


# ---- measuring ------------------------------------------------------------------------


def measure(evaluator: Evaluator, runs: dict[str, Path]) -> dict[str, dict[str, EvalResult]]:
    out = {}
    for label, run in runs.items():
        model = load_run_checkpoint(run).model
        out[label] = {part: evaluator.evaluate_model(model, part) for part in ("valid", "test")}
    return out


def measure_ensemble(evaluator: Evaluator, runs: dict[str, Path]) -> dict[str, EvalResult]:
    models = [load_run_checkpoint(run).model for run in runs.values()]
    scorer, length = ensemble_scorer(models), ensemble_max_len(models)
    return {part: evaluator.evaluate(scorer, part, length) for part in ("valid", "test")}


def score(result: EvalResult) -> float:
    return result.metrics[METRIC[0]][METRIC[1]]


def per_user(result: EvalResult) -> np.ndarray:
    return result.per_user[METRIC[0]][METRIC[1]]


def why_evidence(
    args: argparse.Namespace,
    runs: dict[str, Path],
    base: Path | None,
    data: SequenceData,
    work: Path,
    best: str,
    merged: tuple[str, Path],
) -> dict[str, Any]:
    """What explains a merge that does or does not win: distances, Fisher overlap, the line.

    - the distance between every pair of members, each member's norm; with a base,
      each member's distance from it and the cosine between task vectors;
    - Fisher overlap per pair: cosine of the Fisher vectors and the Jaccard overlap
      of their top-1% coordinates (low overlap: the models care about different
      weights, which is when Fisher weighting can differ from averaging);
    - validation NDCG@10 and loss along the line from the best recipe to the best
      merge, and along the line from the best recipe to the next best member.
    """
    flats = {
        label: flat_weights(load_run_checkpoint(run).model.state_dict())
        for label, run in runs.items()
    }
    fishers = {
        label: flat_weights(load_fisher(fisher_path(run, label, args, data, work)).tensors)
        for label, run in runs.items()
    }
    labels = list(runs)
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]

    def cosine(x: Any, y: Any) -> float:
        return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-30))

    def top_overlap(x: Any, y: Any) -> float:
        k = max(1, len(x) // 100)
        a, b = set(x.topk(k).indices.tolist()), set(y.topk(k).indices.tolist())
        return len(a & b) / len(a | b)

    template = load_run_checkpoint(runs[best]).model
    probe = validation_probe(data.split(), users=1000, seed=0)

    def line(label: str, run: Path) -> dict[str, Any]:
        end = load_run_checkpoint(run).model.state_dict()
        profile = line_profile(template.state_dict(), end, template, probe, points=15)
        return {"from": best, "to": label, **profile}

    partner = next(label for label in labels if label != best)  # pool order: plain first
    evidence: dict[str, Any] = {
        "norm": {label: float(flat.norm()) for label, flat in flats.items()},
        "distance_between": {f"{a} | {b}": float((flats[a] - flats[b]).norm()) for a, b in pairs},
        "fisher_cosine": {f"{a} | {b}": cosine(fishers[a], fishers[b]) for a, b in pairs},
        "fisher_top1pct_jaccard": {
            f"{a} | {b}": top_overlap(fishers[a], fishers[b]) for a, b in pairs
        },
        "line": line(merged[0], merged[1]),
        "member_line": line(partner, runs[partner]),
    }
    if base is not None:
        base_flat = flat_weights(load_run_checkpoint(base).model.state_dict())
        vectors = {label: flat - base_flat for label, flat in flats.items()}
        evidence["distance_from_base"] = {label: float(v.norm()) for label, v in vectors.items()}
        evidence["base_norm"] = float(base_flat.norm())
        evidence["task_vector_cosine"] = {
            f"{a} | {b}": cosine(vectors[a], vectors[b]) for a, b in pairs
        }
    return evidence


def run_seed(
    args: argparse.Namespace, base: ExperimentConfig, data: SequenceData, seed: int, work: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One seed: the row of every model, and the per-user test NDCG@10 of each."""
    evaluator = Evaluator(data.split())
    runs, base_run, control, logs = train_pool(args, base, data, seed, work)
    results = measure(evaluator, runs)
    pool = list(results)
    weakest = min(pool, key=lambda label: score(results[label]["valid"]))
    merged = merge_all(args, runs, base_run, data, work, weakest)
    if control is not None:
        results[CONTROL] = measure(evaluator, {CONTROL: control})[CONTROL]
    results.update(measure(evaluator, merged))
    results[ENSEMBLE] = measure_ensemble(evaluator, runs)
    best = max(pool, key=lambda label: score(results[label]["valid"]))
    best_merge = max(merged, key=lambda label: score(results[label]["valid"]))
    evidence = why_evidence(
        args, runs, base_run, data, work, best, (best_merge, merged[best_merge])
    )
    rows = {
        label: {"valid": score(parts["valid"]), "test": score(parts["test"])}
        for label, parts in results.items()
    }
    rows["mostpop"] = {part: score(evaluator.evaluate_mostpop(part)) for part in ("valid", "test")}
    users = {label: per_user(parts["test"]) for label, parts in results.items()}
    comparisons = {
        label: paired_comparison(users[label], users[best], seed=seed).to_dict()
        for label in results
        if label != best
    }
    batch = base.train.batch_size
    document = {
        "seed": seed,
        "setting": args.setting,
        "best_recipe": best,
        "weakest": weakest,
        "pool": pool,
        "rows": rows,
        "vs_best_recipe": comparisons,
        "ensemble_gain_share": gain_shares(rows, best),
        "error_inconsistency": {
            f"{a} | {b}": error_inconsistency(users[a], users[b])
            for i, a in enumerate(pool)
            for b in pool[i + 1 :]
        },
        "training_logs": logs,
        "evidence": evidence,
        "uninformative_contrastive_loss": {
            "log(2B-1)": math.log(2 * batch - 1),
            "batch_size": batch,
        },
    }
    return document, users


def gain_shares(rows: dict[str, dict[str, float]], best: str) -> dict[str, float]:
    """(row - best recipe) / (ensemble - best recipe) on test, per row."""
    gain = rows[ENSEMBLE]["test"] - rows[best]["test"]
    if gain <= 0:
        return {}
    return {label: (row["test"] - rows[best]["test"]) / gain for label, row in rows.items()}


# ---- reporting ------------------------------------------------------------------------


def table(seeds: list[dict[str, Any]], pooled: dict[str, dict[str, float]]) -> str:
    """Mean ± std of test NDCG@10 per row over seeds, vs the best recipe."""
    labels = list(seeds[0]["rows"])
    lines = [
        "| model | valid NDCG@10 | test NDCG@10 | vs best recipe | p (t-test) | ens. gain |",
        "|---|---|---|---|---|---|",
    ]

    def spread(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    for label in labels:
        valid = [s["rows"][label]["valid"] for s in seeds]
        test = [s["rows"][label]["test"] for s in seeds]
        vs = pooled.get(label)
        best = all(s["best_recipe"] == label for s in seeds)
        relative = "best recipe" if best else f"{vs['relative']:+.1%}" if vs else "-"
        p = f"{vs['p_ttest']:.3g}" if vs else "-"
        shares = [s["ensemble_gain_share"].get(label) for s in seeds]
        share = f"{statistics.mean(shares):.0%}" if all(v is not None for v in shares) else "-"
        lines.append(f"| {label} | {spread(valid)} | {spread(test)} | {relative} | {p} | {share} |")
    return "\n".join(lines)


def row_label(label: str) -> str:
    """Documents written before the row got its fixed name called it 'fisher without <name>'."""
    return re.sub(r"^fisher without \S+", WITHOUT_WEAKEST, label)


def over_seeds(seeds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per row over the seeds: test mean ± std, each seed's test, gain and p-value.

    `p_over_seeds` treats seeds as the units: a one-sample t-test of the per-seed
    difference to that seed's best recipe (0 where the row is the best recipe),
    from 3 seeds on; it asks whether the gain repeats across training runs, which
    the per-user tests of one seed cannot.
    """
    rows = [{row_label(k): v for k, v in s["rows"].items()} for s in seeds]
    versus_all = [{row_label(k): v for k, v in s["vs_best_recipe"].items()} for s in seeds]
    out: dict[str, dict[str, Any]] = {}
    for label in rows[0]:
        present = [i for i, r in enumerate(rows) if label in r]
        test = [rows[i][label]["test"] for i in present]
        versus = [versus_all[i].get(label) for i in present]
        gaps = [test[j] - rows[i][seeds[i]["best_recipe"]]["test"] for j, i in enumerate(present)]
        p_seeds = stats.ttest_1samp(gaps, 0.0).pvalue if len(gaps) >= 3 and any(gaps) else None
        out[label] = {
            "seeds": [seeds[i]["seed"] for i in present],
            "test": test,
            "test_mean": statistics.mean(test),
            "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "best_recipe_in": [
                seeds[i]["seed"] for i in present if seeds[i]["best_recipe"] == label
            ],
            # None where nothing was compared (the seed's best recipe itself, MostPop).
            "relative_vs_best": [v["relative"] if v else None for v in versus],
            "p_ttest": [v["p_ttest"] if v else None for v in versus],
            "p_over_seeds": None if p_seeds is None else float(p_seeds),
        }
    return out


def stored_table(summary: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| model | test NDCG@10 | vs best recipe, per seed | p (t-test), per seed | p over seeds |",
        "|---|---|---|---|---|",
    ]
    for label, row in summary.items():
        best = [seed in row["best_recipe_in"] for seed in row["seeds"]]
        gains = " / ".join(
            "best" if is_best else "-" if v is None else f"{v:+.1%}"
            for v, is_best in zip(row["relative_vs_best"], best, strict=True)
        )
        ps = " / ".join("-" if v is None else f"{v:.2g}" for v in row["p_ttest"])
        spread = f"{row['test_mean']:.4f} ± {row['test_std']:.4f}"
        p_seeds = "-" if row["p_over_seeds"] is None else f"{row['p_over_seeds']:.2g}"
        lines.append(f"| {label} | {spread} | {gains} | {ps} | {p_seeds} |")
    return "\n".join(lines)


def pooled_comparisons(
    seeds: list[dict[str, Any]], users: list[dict[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
    """Each row vs its seed's best recipe with the users of every seed in one paired test."""
    out = {}
    for label in users[0]:
        if any(label == s["best_recipe"] for s in seeds):
            continue
        a = np.concatenate([u[label] for u in users])
        b = np.concatenate([u[s["best_recipe"]] for u, s in zip(users, seeds, strict=True)])
        out[label] = paired_comparison(a, b).to_dict()
    return out


def plot(seeds: list[dict[str, Any]], path: Path) -> None:
    """Test NDCG@10 per row, zoomed on the models (MostPop is far below: left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = over_seeds(seeds)  # a row missing from a seed (another weakest) is left out there
    labels = [label for label in summary if label != "mostpop"]
    means = [summary[label]["test_mean"] for label in labels]
    stds = [summary[label]["test_std"] for label in labels]
    pool = set(seeds[0]["pool"])
    colours = [
        "tab:blue"
        if label in pool
        else "tab:grey"
        if label in (ENSEMBLE, CONTROL)
        else "tab:orange"
        for label in labels
    ]
    # Recipe parameters make long labels: the name says enough on a plot (the JSON has all).
    short = [re.sub(r":[^ ]*", "", label) for label in labels]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(labels) + 1.8))
    ax.barh(short, means, xerr=stds, color=colours)
    best = statistics.mean(s["rows"][s["best_recipe"]]["test"] for s in seeds)
    ax.axvline(best, color="black", linestyle="--", linewidth=1, label="best recipe")
    low, high = min(m - e for m, e in zip(means, stds, strict=True)), max(means) + max(stds)
    pad = 0.25 * (high - low) + 1e-4
    ax.set_xlim(low - pad, high + pad)
    ax.invert_yaxis()
    ax.set_xlabel("test NDCG@10 (full ranking, whole history excluded)")
    mostpop = statistics.mean(s["rows"]["mostpop"]["test"] for s in seeds)
    ax.set_title(
        f"pool (blue), merges (orange), references (grey); {len(seeds)} seed(s), "
        f"MostPop {mostpop:.4f}",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_folder(args: argparse.Namespace, seed: int) -> str:
    """Runs of one seed (finetune and scratch keep the names of earlier results)."""
    pool = pool_config(args)
    tag = {
        "finetune": "",
        "scratch": "scratch-",
        "spawn": f"spawn{pool.spawn_epoch}-",
        "population": f"population{pool.pull:g}x{pool.exchange_every}-",
    }[pool.strategy]
    return f"{tag}seed-{seed}"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("merging").setLevel(logging.INFO)
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_suffix("")
    base = base_experiment(args)
    data = load_data(Path(args.data))
    saved = json.loads(out.read_text()) if out.is_file() else {"seeds": {}}
    start = time.perf_counter()
    seeds, users = [], []
    for seed in args.seeds:
        folder = work / seed_folder(args, seed)
        document, per_user_test = run_seed(args, base, data, seed, folder)
        saved["seeds"][str(seed)] = document
        saved["settings"] = {k: v for k, v in vars(args).items() if k != "overrides"}
        saved["settings"]["overrides"] = args.overrides
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(saved, indent=2) + "\n")
        seeds.append(document)
        users.append(per_user_test)
    pooled = pooled_comparisons(seeds, users)
    saved["pooled_vs_best_recipe"] = pooled
    saved["pooled_seeds"] = list(args.seeds)
    stored = [saved["seeds"][key] for key in sorted(saved["seeds"], key=int)]
    saved["over_seeds"] = over_seeds(stored)
    out.write_text(json.dumps(saved, indent=2) + "\n")
    plot(stored, out.with_suffix(".png"))
    model = base.model
    print(
        f"\n## {Path(args.data).name}: {data.num_users} users, {data.num_items} items; "
        f"{model.backbone} D={model.hidden_size} L={model.num_layers} max_len {model.max_len}; "
        f"setting {args.setting}: {pool_text(args, base)}; seeds {args.seeds}; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print("test split, leave-one-out, full ranking, the user's whole history excluded\n")
    print(table(seeds, pooled))
    if len(stored) > len(seeds):
        print(f"\nevery stored seed ({[s['seed'] for s in stored]}), p-values per seed\n")
        print(stored_table(saved["over_seeds"]))
    for document in seeds:
        print(f"\nseed {document['seed']}: best recipe (validation) {document['best_recipe']}")
        for pair, value in document["error_inconsistency"].items():
            print(f"  error inconsistency {pair}: {value:.4f}")
        reference = document["uninformative_contrastive_loss"]["log(2B-1)"]
        for label, logs in document["training_logs"].items():
            for key, value in logs.items():
                if key.endswith("contrastive_loss"):
                    print(f"  {label}: {key} {value:.3f} (log(2B-1) = {reference:.3f})")
        print_evidence(document["evidence"])


def pool_text(args: argparse.Namespace, base: ExperimentConfig) -> str:
    if args.setting == "scratch":
        return f"every member {args.base_epochs} epochs from scratch at lr {base.train.lr}"
    if args.setting == "population":
        return (
            f"every member {args.base_epochs} epochs from scratch at lr {base.train.lr}, "
            f"pulled {args.pull:g} toward the mean every {args.exchange_every} steps"
        )
    if args.setting == "spawn":
        return (
            f"shared {args.spawn_epoch} epochs, then {args.recipe_epochs} epochs per member "
            f"at lr {base.train.lr}"
        )
    return (
        f"base {args.base_epochs} epochs, recipes {args.recipe_epochs} epochs at lr "
        f"{args.recipe_lr}"
    )


def print_evidence(evidence: dict[str, Any]) -> None:
    if "base_norm" in evidence:
        print(f"  |base| = {evidence['base_norm']:.2f}")
        for label, value in evidence["distance_from_base"].items():
            print(f"  {label}: |θ - θ_base| = {value:.3f}")
    for label, value in evidence.get("norm", {}).items():
        print(f"  {label}: |θ| = {value:.2f}")
    keys = ("distance_between", "task_vector_cosine", "fisher_cosine", "fisher_top1pct_jaccard")
    for key in keys:
        for pair, value in evidence.get(key, {}).items():
            print(f"  {key} {pair}: {value:.3f}")
    for name in ("line", "member_line"):
        if name not in evidence:
            continue
        line = evidence[name]
        points = ", ".join(
            f"{t:+.1f}: {v:.4f}" for t, v in zip(line["t"], line["ndcg@10"], strict=True)
        )
        print(f"  valid NDCG@10 from {line['from']} (t=0) to {line['to']} (t=1): {points}")


if __name__ == "__main__":
    main()
