"""Pool strategies swept: how much does the ensemble gain, and how much of it does a merge keep?

    python benchmarks/pool_sweep.py --data /work/data/beauty --config configs/beauty.yaml \
        --epochs 12 --strategies scratch spawn:0 spawn:2 spawn:6 population:0.1:10 \
        --seed 0 --out benchmarks/results/pool-sweep-beauty.json

Every strategy (training/pool.py) trains the same pool (--members, default two
`plain` members that differ in seed, so in data order and dropout) with the same
budget of --epochs epochs per member, counting a shared phase:

- `scratch`: each member from its own initialisation for E epochs;
- `spawn:S`: one shared trajectory for S epochs (a single base run, snapshotted
  each epoch), then each member E - S epochs on its own; S = 0 is one shared
  initialisation;
- `population:PULL:EVERY`: members from their own initialisations, E epochs at
  once, pulled toward their mean every EVERY steps (PAPA);
  `population:PULL:EVERY:shared` from one initialisation (`pool.shared_init`),
  `population:PULL:EVERY:cosine` with the pull decaying to 0 over training
  (`pool.pull_schedule`);
  `population:P/epoch:EVERY` sets the pull compounded over an epoch instead
  (`pool.pull_per_epoch`).

A `+align` suffix (e.g. `scratch+align`) reuses that strategy's trained pool and
merges it after weight matching (merging/alignment.py): the barrier is then
measured on the line to the aligned second member.

All members of a strategy train at once as Ray actors (training/population.py;
scratch and spawn are populations with pull 0), 1 thread each.

Per strategy: every member, the output ensemble (the ceiling: M times the
serving cost), the uniform average and (unless --no-fisher) the exact-Fisher
merge, on the test split (full ranking, whole history excluded), each compared
with the best member on validation by a paired per-user test; each merge's share
of the ensemble's gain; the barrier on the validation line between the first two
members (the largest dip below the straight line between the ends,
merging/landscape.line_barrier); distances and
error inconsistency; training compute in member-epochs and the wall time.
--control adds one plain model trained for M x E epochs (early stopping as the
config says: its JSON row says when it stopped).

Results go to the JSON as each strategy finishes; a rerun skips strategies the
JSON holds for that seed and resumes training from the runs under --work.
Per-user test NDCG@10 of every row is kept in --work (per_user.npz), so seeds of
separate invocations can be pooled. The PNG plots ensemble and merge gains per
strategy next to the barrier.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from merge_baselines import (  # benchmarks/merge_baselines.py
    experiment,
    fisher_path,
    folder_name,
    measure,
    measure_ensemble,
    per_user,
    score,
)
from recipes import PLAIN, base_experiment, experiment_parser, parse_recipe  # benchmarks/recipes.py

from merging.alignment import match_weights
from merging.landscape import flat_weights, line_barrier, line_profile, validation_probe
from merging.merge import merge_checkpoints
from merging.methods import NEEDS_FISHERS, MergeConfig
from merging.significance import paired_comparison
from training.config import ExperimentConfig
from training.diagnostics import error_inconsistency
from training.evaluate import Evaluator
from training.flags import add_override_flags
from training.pool import PULL_SCHEDULES, PoolConfig
from training.population import MemberSpec, train_population
from training.prepare import load_data
from training.run import train
from training.run_folder import LAST, load_run_checkpoint
from training.sequence_data import SequenceData

log = logging.getLogger("benchmarks.pool_sweep")
ENSEMBLE, UNIFORM, FISHER, CONTROL = "ensemble", "uniform", "fisher", "control"
ALIGN = "+align"


def parse_args() -> argparse.Namespace:
    parser = experiment_parser(__doc__)
    parser.add_argument(
        "--members",
        nargs="+",
        default=[PLAIN, PLAIN],
        help="pool members: NAME or NAME:key=value,... (repeat a name for seeds)",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["scratch", "spawn:0", "spawn:2", "spawn:6", "population:0.1:10"],
        help="scratch | spawn:S | population:PULL:EVERY[:shared][:cosine], each optionally "
        "+align (merge after weight matching)",
    )
    parser.add_argument("--epochs", type=int, default=12, help="epochs per member, shared included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fisher-sequences", type=int, default=1000)
    parser.add_argument(
        "--merges",
        nargs="+",
        default=[UNIFORM, FISHER],
        choices=list(MERGES),
        help="merged models per strategy (stored strategies get the ones they lack)",
    )
    parser.add_argument("--control", action="store_true", help="also a plain model for M x E")
    parser.add_argument(
        "--probe-users",
        type=int,
        default=100_000,
        help="validation users of the line between two members (default: all of them; a "
        "few thousand users cannot see a dip of 2%%)",
    )
    parser.add_argument(
        "--remeasure-lines",
        action="store_true",
        help="measure the line again for strategies the JSON holds (e.g. with more users)",
    )
    add_override_flags(parser)
    parser.add_argument("--work", default=None, help="runs (default: beside --out)")
    parser.add_argument("--out", required=True, help="results JSON (PNG beside it)")
    return parser.parse_args()


PER_EPOCH = "/epoch"  # population:0.15/epoch:10 - the pull compounded over an epoch


def parse_strategy(text: str) -> PoolConfig:
    name, *values = text.split(":")
    if name == "spawn" and len(values) == 1:
        return PoolConfig(strategy="spawn", spawn_epoch=int(values[0]))
    flags = set(values[2:])
    if name == "population" and len(values) >= 2 and flags <= {"shared", *PULL_SCHEDULES}:
        per_epoch = values[0].endswith(PER_EPOCH)
        pull = float(values[0].removesuffix(PER_EPOCH))
        schedules = flags & set(PULL_SCHEDULES)
        return PoolConfig(
            strategy="population",
            pull=0.0 if per_epoch else pull,
            pull_per_epoch=pull if per_epoch else None,
            exchange_every=int(values[1]),
            shared_init="shared" in flags,
            pull_schedule=schedules.pop() if len(schedules) == 1 else "constant",
        )
    if name == "scratch" and not values:
        return PoolConfig(strategy="scratch")
    raise ValueError(
        f"strategy {text!r}: use scratch, spawn:S or population:PULL:EVERY[:shared][:SCHEDULE]"
    )


# ---- training ----------------------------------------------------------------------------


def with_train(cfg: ExperimentConfig, **values: Any) -> ExperimentConfig:
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=values)})


def spawn_point(
    args: argparse.Namespace, base: ExperimentConfig, data: SequenceData, epoch: int, work: Path
) -> Path:
    """The shared trajectory's state after `epoch` epochs (one base run, snapshotted per epoch)."""
    if epoch == 0:  # a run of zero epochs keeps its initial model as best/
        cfg = experiment(base, base.model.backbone, {}, 0, args.seed, base.train.lr)
        return train(cfg, data, work / "shared-0", resume=True).run_dir
    folder = work / "shared"
    snapshot = folder / f"epoch-{epoch}"
    if not (snapshot / "checkpoint.json").is_file():

        def keep(entry: dict[str, Any]) -> None:
            target = folder / f"epoch-{entry['epoch']}"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder / LAST, target)

        cfg = experiment(base, base.model.backbone, {}, epoch, args.seed, base.train.lr)
        # The shared phase runs exactly `epoch` epochs (no early stop), on every core.
        cfg = with_train(cfg, patience=max(cfg.train.patience, epoch + 1), num_threads=None)
        train(cfg, data, folder, resume=True, on_epoch=keep)
    return snapshot


def train_pool(
    args: argparse.Namespace,
    base: ExperimentConfig,
    data: SequenceData,
    pool: PoolConfig,
    work: Path,
) -> tuple[dict[str, Path], int]:
    """Run folders of the members, and the training compute in member-epochs."""
    shared = pool.spawn_epoch if pool.strategy == "spawn" else 0
    init = spawn_point(args, base, data, shared, work) if pool.strategy == "spawn" else None
    members = []
    init_seed = pool.member_init_seed(args.seed)
    for position, text in enumerate(args.members, start=1):
        spec = parse_recipe(text)
        name = base.model.backbone if spec.name == PLAIN else spec.name
        cfg = experiment(
            base, name, spec.params, args.epochs - shared, args.seed + position, base.train.lr
        )
        cfg = with_train(cfg, init_seed=init_seed)
        label = f"{position}-{folder_name(spec.label)}"
        members.append(
            MemberSpec(
                label, cfg.model_dump(mode="json"), str(work / label), str(init) if init else None
            )
        )
    pull = pool.pull if pool.strategy == "population" else 0.0
    loader = functools.partial(load_data, Path(args.data))
    per_epoch = pool.pull_per_epoch if pool.strategy == "population" else None
    results = train_population(
        members,
        loader,
        pull,
        pool.exchange_every,
        resume=True,
        pull_per_epoch=per_epoch,
        pull_schedule=pool.pull_schedule,
    )
    return {name: Path(r["run_dir"]) for name, r in results.items()}, shared + len(members) * (
        args.epochs - shared
    )


# The merges --merges can ask for: does Fisher weighting matter once members differ, and
# do its floor and normalisation (rare items' rows) matter?
MERGES = {
    UNIFORM: MergeConfig(method="uniform"),
    FISHER: MergeConfig(method="fisher"),
    "fisher normalized": MergeConfig(method="fisher", normalize_fishers=True),
    "fisher floor 1e-3": MergeConfig(method="fisher", fisher_floor=1e-3),
    "regmean": MergeConfig(method="regmean"),
}


def merges(
    args: argparse.Namespace,
    runs: dict[str, Path],
    data: SequenceData,
    work: Path,
    align: bool,
    labels: list[str] | None = None,
) -> dict[str, Path]:
    """Folder of each merged model (`labels`, default --merges), built once and reused."""
    folders = {}
    for label in labels or args.merges:
        config = MERGES[label].model_copy(update={"align": align})
        if align and config.method == "regmean":
            continue  # alignment does not permute RegMean's Grams
        folder = work / ("merged-aligned" if align else "merged") / label.replace(" ", "-")
        if not (folder / "checkpoint.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            fishers = (
                [fisher_path(run, name, args, data, work) for name, run in runs.items()]
                if config.method in NEEDS_FISHERS
                else None
            )
            merge_checkpoints(list(runs.values()), folder, config, fishers, data)
        folders[label] = folder
    return folders


def add_merges(
    args: argparse.Namespace,
    data: SequenceData,
    evaluator: Evaluator,
    work: Path,
    text: str,
    document: dict[str, Any],
) -> None:
    """Rows of --merges a stored strategy lacks, compared with its best member as the rest."""
    missing = [label for label in args.merges if label not in document["rows"]]
    align = text.endswith(ALIGN)
    folder = work / text.removesuffix(ALIGN).replace(":", "-")
    members = sorted(p for p in folder.iterdir() if p.name[0].isdigit() and (p / "best").is_dir())
    runs = {member.name: member for member in members}
    merged = merges(args, runs, data, folder, align, missing)
    if not merged:
        return
    name = "per_user-aligned.npz" if align else "per_user.npz"
    users = dict(np.load(folder / name))
    best = document["best_member"]
    for label, parts in measure(evaluator, merged).items():
        users[label] = per_user(parts["test"])
        document["rows"][label] = {"valid": score(parts["valid"]), "test": score(parts["test"])}
        versus = paired_comparison(users[label], users[best], seed=args.seed).to_dict()
        document["vs_best_member"][label] = versus
        document["merge_gain"][label] = versus["relative"]
        ceiling = document["rows"][ENSEMBLE]["test"] - document["rows"][best]["test"]
        gain = document["rows"][label]["test"] - document["rows"][best]["test"]
        document["share_of_ensemble_gain"][label] = gain / ceiling if ceiling > 0 else None
    np.savez_compressed(folder / name, **users)


# ---- measuring ---------------------------------------------------------------------------


def barrier(runs: dict[str, Path], data: SequenceData, users: int, align: bool) -> dict[str, Any]:
    """Validation NDCG@10 on the line between the first two members; the dip below their ends.

    align: the second member's units permuted onto the first's first (weight matching).
    """
    first, second = list(runs.values())[:2]
    start = load_run_checkpoint(first).model
    end = load_run_checkpoint(second).model.state_dict()
    if align:
        end = {**end, **match_weights(start.state_dict(), end, start.config.num_heads)[0]}
    probe = validation_probe(data.split(), users=users, seed=0)
    line = line_profile(start.state_dict(), end, start, probe, points=9, extend=0.0)
    ends = (line["ndcg@10"][0] + line["ndcg@10"][-1]) / 2
    dip, relative = line_barrier(line)
    return {
        **line,
        "users": len(probe.split.users),
        "barrier": dip,
        "barrier_relative": relative,
        "midpoint_gain": line["ndcg@10"][4] - ends,
    }


def run_strategy(
    args: argparse.Namespace,
    base: ExperimentConfig,
    data: SequenceData,
    evaluator: Evaluator,
    pool: PoolConfig,
    work: Path,
    align: bool,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    start = time.perf_counter()
    runs, member_epochs = train_pool(args, base, data, pool, work)
    train_seconds = time.perf_counter() - start
    results = measure(evaluator, runs)
    merged = merges(args, runs, data, work, align)
    results.update(measure(evaluator, merged))
    results[ENSEMBLE] = measure_ensemble(evaluator, runs)
    best = max(runs, key=lambda label: score(results[label]["valid"]))
    rows = {k: {"valid": score(v["valid"]), "test": score(v["test"])} for k, v in results.items()}
    users = {label: per_user(parts["test"]) for label, parts in results.items()}
    versus = {
        label: paired_comparison(users[label], users[best], seed=args.seed).to_dict()
        for label in results
        if label != best
    }
    ceiling = rows[ENSEMBLE]["test"] - rows[best]["test"]
    flats = [flat_weights(load_run_checkpoint(run).model.state_dict()) for run in runs.values()]
    names = list(runs)
    document = {
        "strategy": pool.model_dump(mode="json"),
        "best_member": best,
        "rows": rows,
        "vs_best_member": versus,
        "ensemble_gain": versus[ENSEMBLE]["relative"],
        "merge_gain": {label: versus[label]["relative"] for label in merged},
        "share_of_ensemble_gain": {
            label: (rows[label]["test"] - rows[best]["test"]) / ceiling if ceiling > 0 else None
            for label in merged
        },
        "aligned": align,
        "line": barrier(runs, data, args.probe_users, align),
        "distance_between_first_two": float((flats[0] - flats[1]).norm()),
        "norms": [float(f.norm()) for f in flats],
        "error_inconsistency": error_inconsistency(users[names[0]], users[names[1]]),
        "member_epochs": member_epochs,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
    }
    return document, users


def remeasure_line(
    args: argparse.Namespace, data: SequenceData, work: Path, text: str, document: dict[str, Any]
) -> None:
    """The line between the first two members of a stored strategy, with --probe-users."""
    trained = text.removesuffix(ALIGN)
    folder = work / trained.replace(":", "-")
    members = sorted(p for p in folder.iterdir() if p.name[0].isdigit() and (p / "best").is_dir())
    runs = {member.name: member for member in members}  # "1-plain", "2-plain", ...
    document["line"] = barrier(runs, data, args.probe_users, text.endswith(ALIGN))


def run_control(
    args: argparse.Namespace,
    base: ExperimentConfig,
    data: SequenceData,
    evaluator: Evaluator,
    work: Path,
) -> tuple[dict[str, Any], np.ndarray]:
    epochs = len(args.members) * args.epochs
    cfg = experiment(base, base.model.backbone, {}, epochs, args.seed + 100, base.train.lr)
    cfg = with_train(cfg, num_threads=None)  # alone: every core
    start = time.perf_counter()
    result = train(cfg, data, work / CONTROL, resume=True)
    parts = measure(evaluator, {CONTROL: result.run_dir})[CONTROL]
    trained = len(result.history) - (1 if result.history and "loss" not in result.history[0] else 0)
    return {
        "valid": score(parts["valid"]),
        "test": score(parts["test"]),
        "budget_epochs": epochs,
        "trained_epochs": trained,
        "best_epoch": result.best_epoch,
        "stopped_early": trained < epochs,
        "seconds": time.perf_counter() - start,
    }, per_user(parts["test"])


def add_control_comparisons(args: argparse.Namespace, work: Path, seed_doc: dict[str, Any]) -> None:
    """Every row of every strategy against the equal-compute control (paired per user)."""
    control = np.load(work / CONTROL / "per_user.npz")["test_ndcg10"]
    for text, document in seed_doc["strategies"].items():
        folder = work / text.removesuffix(ALIGN).replace(":", "-")
        name = "per_user-aligned.npz" if text.endswith(ALIGN) else "per_user.npz"
        users = np.load(folder / name)
        document["vs_control"] = {
            label: paired_comparison(users[label], control, seed=args.seed).to_dict()
            for label in users.files
        }


# ---- reporting ---------------------------------------------------------------------------


def table(strategies: dict[str, dict[str, Any]]) -> str:
    """One line per strategy: the best member, the ensemble and every merge against it."""
    labels = [ENSEMBLE, *dict.fromkeys(m for d in strategies.values() for m in d["merge_gain"])]
    lines = [
        "| strategy | best member | "
        + " | ".join(labels)
        + " | barrier (valid NDCG@10) | error incons. | member-epochs | train s |",
        "|---|---|" + "---|" * len(labels) + "---|---|---|---|",
    ]

    def cell(doc: dict[str, Any], label: str) -> str:
        if label not in doc["rows"]:
            return "-"
        vs = doc["vs_best_member"][label]
        share = doc["share_of_ensemble_gain"].get(label)
        kept = "" if share is None else f", keeps {share:.0%}"
        return (
            f"{doc['rows'][label]['test']:.4f} ({vs['relative']:+.1%}, p {vs['p_ttest']:.2g}{kept})"
        )

    for name, doc in strategies.items():
        cells = " | ".join(cell(doc, label) for label in labels)
        lines.append(
            f"| {name} | {doc['rows'][doc['best_member']]['test']:.4f} | {cells} "
            f"| {barrier_text(doc['line'])} | {doc['error_inconsistency']:.3f} "
            f"| {doc['member_epochs']} | {doc['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def pooled(saved: dict[str, Any], root: Path) -> dict[str, dict[str, Any]]:
    """Each merge and ensemble vs its seed's best member, users of every seed in one paired test.

    Reads the per-user scores kept under --work (seed-N/<strategy>/per_user.npz).
    """
    out: dict[str, dict[str, Any]] = {}
    seeds = sorted(saved["seeds"], key=int)
    names = dict.fromkeys(n for s in seeds for n in saved["seeds"][s]["strategies"])
    for name in names:
        found = []
        for seed in seeds:
            document = saved["seeds"][seed]["strategies"].get(name)
            folder = root / f"seed-{seed}" / name.removesuffix(ALIGN).replace(":", "-")
            file = folder / ("per_user-aligned.npz" if name.endswith(ALIGN) else "per_user.npz")
            if document is not None and file.is_file():
                found.append((seed, document, dict(np.load(file))))
        if len(found) < 2:
            continue
        out[name] = {}
        shared = set.intersection(*(set(d["merge_gain"]) for _, d, _ in found))
        for label in [ENSEMBLE, *(m for m in found[0][1]["merge_gain"] if m in shared)]:
            a = np.concatenate([users[label] for _, _, users in found])
            b = np.concatenate([users[d["best_member"]] for _, d, users in found])
            row = paired_comparison(a, b).to_dict()
            out[name][label] = {**row, "seeds": [int(s) for s, _, _ in found], "users": len(a)}
    return out


def seeds_table(saved: dict[str, Any]) -> str:
    """Strategies stored for several seeds: mean ± std of test NDCG@10, each seed's gain and p."""
    from scipy import stats

    seeds = sorted(saved["seeds"], key=int)
    names = dict.fromkeys(n for s in seeds for n in saved["seeds"][s]["strategies"])
    lines = [
        "| strategy | model | seeds | test NDCG@10 | vs best member, per seed | p, per seed "
        "| p over seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        docs = [
            saved["seeds"][s]["strategies"][name]
            for s in seeds
            if name in saved["seeds"][s]["strategies"]
        ]
        if len(docs) < 2:
            continue
        shared = set.intersection(*(set(d["merge_gain"]) for d in docs))
        merges = [m for m in docs[0]["merge_gain"] if m in shared]
        for label in [ENSEMBLE, *merges, "best member"]:
            if label == "best member":
                tests = [d["rows"][d["best_member"]]["test"] for d in docs]
                gains = ps = ""
                p_seeds = "-"
            else:
                tests = [d["rows"][label]["test"] for d in docs]
                versus = [d["vs_best_member"][label] for d in docs]
                gains = " / ".join(f"{v['relative']:+.1%}" for v in versus)
                ps = " / ".join(f"{v['p_ttest']:.2g}" for v in versus)
                gaps = [
                    d["rows"][label]["test"] - d["rows"][d["best_member"]]["test"] for d in docs
                ]
                p_seeds = f"{stats.ttest_1samp(gaps, 0.0).pvalue:.2g}" if len(gaps) >= 3 else "-"
            spread = f"{np.mean(tests):.4f} ± {np.std(tests, ddof=1):.4f}"
            lines.append(
                f"| {name} | {label} | {len(docs)} | {spread} | {gains} | {ps} | {p_seeds} |"
            )
    return "\n".join(lines)


def control_table(strategies: dict[str, dict[str, Any]]) -> str:
    """Each strategy's ensemble and merges against the equal-compute control."""
    lines = [
        "| strategy | model | test NDCG@10 | vs control | p (t-test) |",
        "|---|---|---|---|---|",
    ]
    for name, doc in strategies.items():
        for label, row in doc.get("vs_control", {}).items():
            if label == ENSEMBLE or label in doc["merge_gain"]:
                lines.append(
                    f"| {name} | {label} | {row['mean_a']:.4f} | {row['relative']:+.1%} "
                    f"| {row['p_ttest']:.2g} |"
                )
    return "\n".join(lines)


def barrier_text(line: dict[str, Any]) -> str:
    dip, relative = line_barrier(line)
    return f"{dip:+.4f} ({relative:+.1%})"


def plot(strategies: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(strategies)
    x = np.arange(len(labels))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 1.3 * len(labels)), 6), sharex=True)
    width = 0.27
    series = [
        (ENSEMBLE, "ensemble (Mx cost)", "tab:grey"),
        (UNIFORM, "uniform average", "tab:blue"),
    ]
    series.append((FISHER, "Fisher merge", "tab:orange"))
    for offset, (key, name, colour) in zip((-width, 0, width), series, strict=True):
        values = [
            100 * s["vs_best_member"][key]["relative"] if key in s["rows"] else np.nan
            for s in strategies.values()
        ]
        top.bar(x + offset, values, width, label=name, color=colour)
    top.axhline(0, color="black", linewidth=0.8)
    top.set_ylabel("test NDCG@10 vs best member (%)")
    top.legend(fontsize=8)
    top.set_title(title, fontsize=9)
    barriers = [100 * line_barrier(s["line"])[1] for s in strategies.values()]
    bottom.bar(x, barriers, color="tab:red")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("barrier: dip below the ends\nof the line between two members (%)")
    bottom.set_xticks(x, labels, rotation=20, fontsize=8)
    for axis in (top, bottom):
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    import ray

    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("benchmarks", "merging", "training.population"):
        logging.getLogger(name).setLevel(logging.INFO)
    out = Path(args.out)
    work = (Path(args.work) if args.work else out.with_suffix("")) / f"seed-{args.seed}"
    # One thread per actor: the members share the cores.
    base = base_experiment(args, **{"train.num_threads": 1})
    data = load_data(Path(args.data))
    evaluator = Evaluator(data.split())
    saved = json.loads(out.read_text()) if out.is_file() else {"seeds": {}}
    seed_doc = saved["seeds"].setdefault(str(args.seed), {"strategies": {}})
    saved["settings"] = {k: v for k, v in vars(args).items()}
    ray.init(num_cpus=len(args.members), include_dashboard=False, log_to_driver=False)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(saved, indent=2) + "\n")

    try:
        for text in args.strategies:
            if text in seed_doc["strategies"]:
                if args.remeasure_lines:
                    remeasure_line(args, data, work, text, seed_doc["strategies"][text])
                    save()
                add_merges(args, data, evaluator, work, text, seed_doc["strategies"][text])
                save()
                log.info("%s: already in %s, skipped", text, out)
                continue
            log.info("strategy %s: training %d members", text, len(args.members))
            # "+align": the same trained pool, merged after weight matching.
            trained, align = text.removesuffix(ALIGN), text.endswith(ALIGN)
            folder = work / trained.replace(":", "-")
            pool = parse_strategy(trained)
            document, users = run_strategy(args, base, data, evaluator, pool, folder, align)
            name = "per_user-aligned.npz" if align else "per_user.npz"
            np.savez_compressed(folder / name, **{k: v for k, v in users.items()})
            seed_doc["strategies"][text] = document
            save()
            print(table({text: document}), flush=True)
        if args.control and CONTROL not in seed_doc:
            seed_doc[CONTROL], users = run_control(args, base, data, evaluator, work)
            np.savez_compressed(work / CONTROL / "per_user.npz", test_ndcg10=users)
            save()
    finally:
        ray.shutdown()
    if CONTROL in seed_doc:
        add_control_comparisons(args, work, seed_doc)
        save()
    strategies = seed_doc["strategies"]
    title = (
        f"{Path(args.data).name}, seed {args.seed}: {len(args.members)} members, "
        f"{args.epochs} epochs each"
    )
    plot(strategies, out.with_name(f"{out.stem}-seed{args.seed}.png"), title)
    print(f"\n## {title}\n")
    print(table(strategies))
    if len(saved["seeds"]) > 1:
        saved["pooled_vs_best_member"] = pooled(saved, work.parent)
        save()
        print(f"\n## over the stored seeds {sorted(saved['seeds'], key=int)}\n")
        print(seeds_table(saved))
        for name, rows in saved["pooled_vs_best_member"].items():
            for label, row in rows.items():
                print(
                    f"pooled over seeds {row['seeds']}: {name} {label} {row['relative']:+.1%} "
                    f"vs the best member (paired over {row['users']} user-seeds, p {row['p_ttest']:.2g})"
                )
    if CONTROL in seed_doc:
        c = seed_doc[CONTROL]
        print(
            f"\ncontrol (plain, {c['budget_epochs']} epochs budget, trained {c['trained_epochs']}, "
            f"best epoch {c['best_epoch']}): test {c['test']:.4f}\n"
        )
        print(control_table(strategies))


if __name__ == "__main__":
    main()
