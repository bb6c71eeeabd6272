"""`fishrec train` and `fishrec warm-start`: the commands that produce a model's weights.

`train` runs one experiment into a run folder; `warm-start` writes the
checkpoint a later `train --init` continues from. Registration imports nothing
heavy (training/cli.py says why).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli_evaluate import print_metrics
from training.flags import add_override_flags, collect_overrides

TRAIN_FLAGS = {
    "data": "data.path",
    "backbone": "model.backbone",
    "recipe": "recipe.name",
    "epochs": "train.epochs",
    "seed": "train.seed",
    "device": "train.device",
    "workers": "train.workers",
    "features": "data.features",
    "item_representation": "model.item_representation",
}


def cmd_train(args: argparse.Namespace) -> None:
    from training.config import ExperimentConfig, load_config
    from training.run import train
    from training.sources import load_source
    from training.transfer import Transfer

    overrides = collect_overrides(args, TRAIN_FLAGS)
    if args.no_progress:
        overrides["train.progress"] = False
    config = load_config(ExperimentConfig, Path(args.config) if args.config else None, overrides)
    data = load_source(config.data)
    result = train(
        config,
        data,
        Path(args.out),
        init=Path(args.init) if args.init else None,
        resume=args.resume,
        transfer=Transfer(Path(args.transfer_from), args.adaptation)
        if args.transfer_from
        else None,
    )
    print_metrics({"model": result.metrics["model"], "mostpop": result.metrics["mostpop"]})
    print(f"best epoch {result.best_epoch}; run folder {result.run_dir}")


def register_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train",
        help="train one model with one recipe",
        description="Train a BERT4Rec/SASRec model with a recipe; early-stops on validation NDCG@10 "
        "and writes best/, last/, history.json and metrics.json into the run folder.",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="'synthetic' (default), a prepared data folder or a raw log file",
    )
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--config", default=None, help="experiment YAML (see configs/)")
    parser.add_argument(
        "--backbone", choices=["bert4rec", "sasrec"], default=None, help="model variant"
    )
    parser.add_argument(
        "--recipe", default=None, help="training objective (default: the backbone's plain one)"
    )
    parser.add_argument(
        "--init", default=None, help="start from this checkpoint or run folder (fine-tune setting)"
    )
    parser.add_argument(
        "--transfer-from",
        default=None,
        help="start from a model of another catalogue whose items have text (id+text or text); "
        "the architecture is the source's, the items and features this data's (see --adaptation)",
    )
    parser.add_argument(
        "--adaptation",
        choices=["finetune", "relearn"],
        default="relearn",
        help="with --transfer-from: finetune every weight, or relearn (freeze the transformer "
        "blocks, re-initialise positions and the text adaptor)",
    )
    parser.add_argument(
        "--item-representation",
        choices=["id", "id+text", "text"],
        default=None,
        help="how items are represented (id+text and text need item features)",
    )
    parser.add_argument(
        "--features", default=None, help="item feature file (default: DATA/features.safetensors)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-parallel Ray Train workers (train.workers; threads each: train.num_threads)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last epoch"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (log lines only)"
    )
    add_override_flags(parser)
    parser.set_defaults(func=cmd_train)


def cmd_warm_start(args: argparse.Namespace) -> None:
    from training.prepare import load_data
    from training.warm_start import load_bundle_source, write_warm_start

    data = load_data(Path(args.data))
    source, vocab = load_bundle_source(Path(args.source))
    change = write_warm_start(source, vocab, data, Path(args.out), seed=args.seed)
    print(f"{args.out}: {change.describe()}; continue it with fishrec train --init {args.out}")


def register_warm_start(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "warm-start",
        help="carry a published model over to new data (item rows matched by external id)",
        description="Write a checkpoint of --data that starts from the model a bundle carries: "
        "every non-item weight copied, kept items' rows and output bias copied by external id, "
        "new items freshly initialised, vanished items dropped. Train it with --init.",
    )
    parser.add_argument(
        "--from", dest="source", required=True, help="a bundle folder with checkpoint/"
    )
    parser.add_argument("--data", required=True, help="the new data (folder or raw file)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new items' rows")
    parser.set_defaults(func=cmd_warm_start)
