"""Recipes side by side: ranking quality, time per epoch, representation geometry.

    python benchmarks/recipes.py --data ../shared/data/ml-1m/ml-1m_5core_iclrec_format.txt \
        --config configs/ml-1m.yaml --setting finetune --base-epochs 100 --epochs 20

Settings (as in the thesis):
- finetune: train a base with the plain objective for --base-epochs, then every
  recipe continues from the base's best checkpoint for --epochs. The row `plain`
  continues with the plain objective for the same epochs: the fair control.
- scratch: every recipe, `plain` included, trains from its own initialisation
  for --epochs.

Prints one markdown table per setting (test split; history items excluded in
`full` unless --no-exclude-seen): NDCG@10, NDCG@20, HR@10 under full, random100
and popular100; median training seconds per epoch and its ratio to `plain`
measured in the same run; alignment and uniformity of the representations
(training/diagnostics.py); then the pairwise error inconsistency of all models.
Recipes may carry parameters: --recipes cl4srec duorec duorec:mode=both,weight=0.2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import ExperimentConfig, load_config, parse_override
from training.diagnostics import error_inconsistency, representation_quality
from training.evaluate import SETTINGS, Evaluator
from training.flags import add_override_flags
from training.prepare import load_data
from training.run import train
from training.run_folder import load_run_checkpoint
from training.sequence_data import SequenceData
from training.trainer import TrainResult

log = logging.getLogger("benchmarks.recipes")
PLAIN = "plain"
METRICS = ("ndcg@10", "ndcg@20", "hr@10")


def experiment_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser with the --data and --config of every experiment benchmark."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder")
    parser.add_argument("--config", default=None, help="experiment YAML (configs/)")
    return parser


def start_logging(logger: logging.Logger, threads: int | None = None) -> None:
    """Timestamped warnings from the libraries, this benchmark's own progress, torch threads."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    if threads:
        torch.set_num_threads(threads)


def add_recipe_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--backbone, --recipes, --epochs and --base-epochs of the recipe benchmarks."""
    parser.add_argument("--backbone", choices=["bert4rec", "sasrec"], default=None)
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["cl4srec", "duorec", "ehrec"],
        help=f"recipes {what} plain: NAME or NAME:key=value,...",
    )
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every recipe run")
    parser.add_argument(
        "--base-epochs", type=int, default=50, help="finetune: epochs of the plain base"
    )


def base_experiment(args: argparse.Namespace, **fixed: Any) -> ExperimentConfig:
    """--config, then its --set overrides, then data.path from --data and `fixed` (dotted keys)."""
    overrides = dict(parse_override(text) for text in args.overrides)
    overrides["data.path"] = args.data
    overrides.update({key: value for key, value in fixed.items() if value is not None})
    return load_config(ExperimentConfig, Path(args.config) if args.config else None, overrides)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepared data folder or raw log file")
    parser.add_argument(
        "--setting", choices=["finetune", "scratch"], default="finetune", help="see above"
    )
    parser.add_argument(
        "--config", default=None, help="experiment YAML for model and training (configs/)"
    )
    add_recipe_flags(parser, "to compare with")
    parser.add_argument(
        "--users", type=int, default=0, help="use only the first N users (0: all; quick checks)"
    )
    parser.add_argument(
        "--no-exclude-seen", action="store_true", help="rank history items in full (RecBole)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    add_override_flags(parser)
    parser.add_argument("--out", default="/tmp/fishrec-bench-recipes", help="folder of the runs")
    return parser.parse_args()


@dataclass(frozen=True)
class RecipeRun:
    label: str  # as given on the command line
    name: str  # key of RECIPES
    params: dict[str, Any]


def parse_recipe(spec: str) -> RecipeRun:
    """'duorec:mode=both,weight=0.2' -> RecipeRun('duorec:mode=both,weight=0.2', 'duorec', {...})."""
    name, _, rest = spec.partition(":")
    params = dict(parse_override(part) for part in rest.split(",") if part)
    return RecipeRun(spec, name, params)


def experiment(base: ExperimentConfig, recipe: RecipeRun, epochs: int) -> ExperimentConfig:
    values = base.model_dump(mode="json")
    values["recipe"] = {"name": recipe.name, "params": recipe.params}
    values["train"] = {**values["train"], "epochs": epochs, "progress": False}
    return ExperimentConfig.model_validate(values)


def first_users(data: SequenceData, count: int) -> SequenceData:
    if not count or count >= data.num_users:
        return data
    return SequenceData(data.sequences[:count], data.users[:count], data.vocab, dict(data.meta))


@dataclass
class Row:
    result: TrainResult
    seconds_per_epoch: float
    test: dict[str, dict[str, float]]
    per_user_ndcg: np.ndarray
    geometry: dict[str, float]


def measure(result: TrainResult, evaluator: Evaluator) -> Row:
    model = load_run_checkpoint(result.run_dir).model
    evaluation = evaluator.evaluate_model(model, "test")
    seconds = [entry["seconds"] for entry in result.history] or [float("nan")]
    return Row(
        result=result,
        seconds_per_epoch=statistics.median(seconds),
        test=evaluation.metrics,
        per_user_ndcg=evaluation.per_user["full"]["ndcg@10"],
        geometry=representation_quality(model, evaluator.split.test),
    )


def run_all(
    args: argparse.Namespace, base: ExperimentConfig, data: SequenceData, evaluator: Evaluator
) -> dict[str, Row]:
    out = Path(args.out) / args.setting
    plain = RecipeRun(PLAIN, base.model.backbone, {})
    runs = [plain, *(parse_recipe(spec) for spec in args.recipes)]
    for run in runs:  # fail on a bad recipe name or parameter before hours of training
        experiment(base, run, args.epochs)
    rows: dict[str, Row] = {}
    init = None
    if args.setting == "finetune":
        log.info("training the base (%d epochs)", args.base_epochs)
        result = train(experiment(base, plain, args.base_epochs), data, out / "base")
        rows["base"] = measure(result, evaluator)
        init = result.run_dir
    for run in runs:
        log.info("training %s (%d epochs, %s)", run.label, args.epochs, args.setting)
        folder = out / run.label.replace(":", "_").replace(",", "_").replace("=", "-")
        result = train(experiment(base, run, args.epochs), data, folder, init=init)
        rows[run.label] = measure(result, evaluator)
    return rows


def report(rows: dict[str, Row], mostpop: dict[str, dict[str, float]]) -> str:
    plain_seconds = rows[PLAIN].seconds_per_epoch
    header = ["model", "best/ran"] + [f"{s} {m}" for s in SETTINGS for m in METRICS]
    header += ["s/epoch", "x plain", "align", "uniform"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in rows.items():
        cells = [label, f"{row.result.best_epoch}/{len(row.result.history)}"]
        cells += [f"{row.test[s][m]:.4f}" for s in SETTINGS for m in METRICS]
        cells += [
            f"{row.seconds_per_epoch:.1f}",
            f"{row.seconds_per_epoch / plain_seconds:.2f}",
            f"{row.geometry['alignment']:.3f}",
            f"{row.geometry['uniformity']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mostpop", "-"] + [f"{mostpop[s][m]:.4f}" for s in SETTINGS for m in METRICS]
    lines.append("| " + " | ".join(cells + ["-"] * 4) + " |")
    return "\n".join(lines)


def inconsistency_table(rows: dict[str, Row]) -> str:
    labels = list(rows)
    lines = [
        "| error inconsistency | " + " | ".join(labels) + " |",
        "|" + "---|" * (len(labels) + 1),
    ]
    for a in labels:
        cells = [
            f"{error_inconsistency(rows[a].per_user_ndcg, rows[b].per_user_ndcg):.4f}"
            for b in labels
        ]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    start_logging(log, args.threads)
    base = base_experiment(args, **{"model.backbone": args.backbone})
    data = first_users(load_data(Path(args.data)), args.users)
    start = time.perf_counter()
    evaluator = Evaluator(data.split(), exclude_seen=not args.no_exclude_seen)
    rows = run_all(args, base, data, evaluator)
    mostpop = evaluator.evaluate_mostpop("test")
    budget = (
        f"base {args.base_epochs} epochs, then {args.epochs} epochs per recipe"
        if args.setting == "finetune"
        else f"{args.epochs} epochs per recipe"
    )
    model = base.model
    print(
        f"\n## {Path(args.data).name}, {args.setting}: {data.num_users} users, {data.num_items} items; "
        f"{model.backbone} D={model.hidden_size} L={model.num_layers} max_len {model.max_len}; "
        f"{budget}; {torch.get_num_threads()} threads, {time.perf_counter() - start:.0f} s in all\n"
    )
    print(
        f"test split; history items {'ranked' if args.no_exclude_seen else 'excluded'} in full; "
        "s/epoch: median training seconds per epoch, x plain: its ratio to the plain objective\n"
    )
    print(report(rows, mostpop.metrics))
    print()
    print(inconsistency_table(rows))


if __name__ == "__main__":
    main()
