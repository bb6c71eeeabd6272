"""Subcommands of the merging package: fisher, merge, export, pipeline, demo.

Registration must stay import-light (argparse only): heavy imports happen inside
each command function.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merging.methods import METHODS, MergeConfig
from serving.bundle import RETRIEVAL_MIN_ITEMS
from training.flags import add_config_flags, add_override_flags, collect_overrides

# MergeConfig fields that `fishrec merge` takes as flags of the same name (--fisher-floor):
# type, default and help come from the config, so the two cannot drift apart.
MERGE_FLAGS = (
    "coefficients",
    "search",
    "fisher_floor",
    "normalize_fishers",
    "seed",
    "task_scale",
    "ties_density",
    "regmean_alpha",
    "align",
    "finetune_epochs",
)


def register(commands: argparse._SubParsersAction) -> None:
    """Add every merging subcommand to the `fishrec` parser."""
    register_fisher(commands)
    register_merge(commands)
    register_export(commands)
    register_pipeline(commands)
    register_demo(commands)


# ---- fisher / merge -------------------------------------------------------------------


def cmd_fisher(args: argparse.Namespace) -> None:
    from merging.fisher import FisherConfig, checkpoint_fisher
    from merging.fisher_file import save_fisher
    from training.config import DataSpec
    from training.sources import load_source

    config = FisherConfig(
        estimator=args.estimator,
        num_sequences=args.num_sequences,
        seed=args.seed,
        batch_shortcut=args.batch_shortcut,
        batch_size=args.batch_size,
        engine=args.engine,
    )
    data = load_source(DataSpec(path=args.data))
    result, metadata = checkpoint_fisher(Path(args.checkpoint), data, config, args.device)
    save_fisher(Path(args.out), result.file_tensors(), metadata)
    mass = result.mean_dropped_mass
    dropped = f", dropped eigenvalue mass {mass:.3g}" if mass else ""
    print(f"{args.out}: Fisher {result.estimator} over {result.count} sequences{dropped}")


def register_fisher(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "fisher",
        help="diagonal Fisher information of a checkpoint (next-item distribution)",
        description="Estimate the diagonal Fisher of p(next item | history) over training sequences, "
        "in eval mode, whatever recipe trained the model. Estimators: exact[:r] (all items in D "
        "VJPs; r keeps the top r eigenpairs), full (brute force), random:n, topk:n, sample:n, "
        "target, empirical. Writes safetensors keyed by parameter name.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    parser.add_argument(
        "--data", required=True, help="the data the model was trained on (folder, file, synthetic)"
    )
    parser.add_argument("--estimator", default="exact", help="name or name:n (default: exact)")
    parser.add_argument(
        "--num-sequences", type=int, default=None, help="seeded subset of training sequences"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and the draws")
    parser.add_argument(
        "--batch-shortcut",
        action="store_true",
        help="APPROXIMATE: square batch-summed gradients instead of per-sequence ones",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="sequences per batch (batch shortcut only)"
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "structured", "autograd"],
        default="auto",
        help="per-sequence gradient engine (auto: the estimator's default)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--out", required=True, help="Fisher file to write (.safetensors)")
    parser.set_defaults(func=cmd_fisher)


def cmd_merge(args: argparse.Namespace) -> None:
    from merging.merge import merge_checkpoints
    from training.cli_evaluate import print_metrics
    from training.config import DataSpec
    from training.sources import load_source

    config = MergeConfig(
        method=args.method,
        **{field: getattr(args, field) for field in MERGE_FLAGS},
        group_coefficients=dict(parse_group_coefficients(text) for text in args.group_coefficients),
        finetune_overrides=collect_overrides(args, {}),
    )
    data = load_source(DataSpec(path=args.data)) if args.data else None
    fishers = [Path(p) for p in args.fishers] if args.fishers else None
    result = merge_checkpoints(
        [Path(p) for p in args.checkpoints],
        Path(args.out),
        config,
        fishers,
        data,
        base=Path(args.base) if args.base else None,
    )
    merge = result.info["merge"]
    coefficients = [round(c, 4) for c in merge["coefficients"]]
    print(f"{result.path}: {merge['method']} merge, λ = {coefficients}")
    if result.metrics:
        print_metrics({"merged": result.metrics["model"]})


def parse_group_coefficients(text: str) -> tuple[str, list[float]]:
    """'items=0.7,0.3' -> ('items', [0.7, 0.3])."""
    group, sep, values = text.partition("=")
    try:
        if not sep or not group:
            raise ValueError
        return group, [float(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--group-coefficients {text!r} is not GROUP=λ1,λ2,... (e.g. items=0.7,0.3)"
        ) from None


def register_merge(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge",
        help="merge checkpoints: soups, Fisher-weighted, RegMean, task arithmetic, TIES",
        description="Merge checkpoints of one architecture by parameter name into a checkpoint "
        "folder. greedy, --search and --finetune-epochs need --data; fisher, fisher_grouped and "
        "regmean need --fishers (one per checkpoint, same order); task_arithmetic and ties need "
        "--base (the checkpoint the inputs were fine-tuned from).",
    )
    defaults = {name: field.default for name, field in MergeConfig.model_fields.items()}
    methods = "; ".join(f"{name}: {spec.summary}" for name, spec in METHODS.items())
    parser.add_argument("--method", choices=list(METHODS), default=defaults["method"], help=methods)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint or run folders")
    parser.add_argument("--fishers", nargs="+", default=None, help="Fisher files, one per input")
    parser.add_argument(
        "--data", default=None, help="training data: validation for greedy/search, fine-tune"
    )
    parser.add_argument(
        "--base", default=None, help="task_arithmetic, ties: the shared base checkpoint"
    )
    add_config_flags(parser, MergeConfig, MERGE_FLAGS)
    parser.add_argument(
        "--group-coefficients",
        action="append",
        default=[],
        metavar="GROUP=λ1,λ2",
        help="fisher_grouped: λ of one parameter group (items, positions, block0, ..., other)",
    )
    add_override_flags(parser, "train.lr=1e-4", "a fine-tune config field")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.set_defaults(func=cmd_merge)


# ---- export ---------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> None:
    from merging.export import export_bundle
    from training.config import DataSpec
    from training.sources import load_source

    fields = {"run_id": args.run_id} if args.run_id else {}
    manifest = export_bundle(
        Path(args.checkpoint),
        Path(args.out),
        load_source(DataSpec(path=args.data)),
        quantize=args.quantize,
        full_scores=args.full_scores,
        manifest_fields=fields,
        parity_sequences=args.parity_sequences,
        checkpoint_copy=args.with_checkpoint,
        retrieval_min_items=None if args.retrieval_min_items == 0 else args.retrieval_min_items,
    )
    parity = manifest["onnx"]["parity"]
    print(
        f"{args.out}: run {manifest['run_id']}, opset {manifest['onnx']['opset']}, parity on "
        f"{parity['sequences']} sequences: max abs diff {parity['max_abs_diff']:.2e}, "
        f"top-k agreement {parity['topk_agreement']:.3f}"
    )
    if manifest["quantized"]:
        print(f"int8 graph: NDCG@10 change {manifest['quantized']['ndcg@10_change']:+.4f}")


def register_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="export a checkpoint to ONNX as a model bundle (parity-checked against torch)",
        description="Write model.onnx (inference path, history exclusion and top-k in the graph), "
        "vocab.json, popular.json and manifest.json into a bundle folder. The export fails when "
        "the graph's scores or top-k differ from torch on real histories of the data.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    parser.add_argument("--out", required=True, help="bundle folder (replaced as a whole)")
    parser.add_argument(
        "--data", required=True, help="the data the model was trained on (folder, file, synthetic)"
    )
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="also write model.int8.onnx (dynamic int8), with its parity and NDCG@10 change",
    )
    parser.add_argument(
        "--full-scores",
        action="store_true",
        help="add the all_scores output (every item's score) to the graph",
    )
    parser.add_argument(
        "--retrieval-min-items",
        type=int,
        default=RETRIEVAL_MIN_ITEMS,
        help="from this catalogue size, also an ANN index and a user encoder (retrieval/; "
        "0: never)",
    )
    parser.add_argument(
        "--run-id", default=None, help="run id in the manifest (default: the name of --out)"
    )
    parser.add_argument(
        "--parity-sequences",
        type=int,
        default=256,
        help="how many real histories the parity check runs on",
    )
    parser.add_argument(
        "--with-checkpoint",
        action="store_true",
        help="also copy the weights and config into checkpoint/ (what `fishrec warm-start` reads)",
    )
    parser.set_defaults(func=cmd_export)


# ---- pipeline -------------------------------------------------------------------------


def cmd_pipeline(args: argparse.Namespace) -> None:
    from merging.pipeline.job import load_pipeline_config, run_pipeline

    config = load_pipeline_config(Path(args.config) if args.config else None, args.overrides)
    result = run_pipeline(
        config,
        args.artifacts,
        address=args.address,
        run_id=args.run_id,
        force_publish=args.force_publish,
    )
    print(f"published run {result.run_id}: {args.artifacts}/{result.bundle}")


def add_pipeline_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument(
        "--artifacts", default="artifacts", help="artifact root: a path or an fsspec URI (s3://...)"
    )
    parser.add_argument("--run-id", default=None, help="resume this run (default: a new id)")
    add_override_flags(parser, "recipe_epochs=5", "a pipeline config field")


def register_pipeline(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pipeline",
        help="the merge job on Ray: train, Fisher, merge, evaluate, export, publish",
        description="Train a base model and the recipes in parallel Ray tasks, compute their Fisher "
        "information over user shards, merge, evaluate every model, export the chosen merged model to "
        "ONNX and publish it as a bundle (then LATEST). Rerunning with the same --run-id skips the "
        "stages that finished and verify.",
    )
    add_pipeline_arguments(parser, "pipeline YAML (see configs/pipeline-*.yaml)")
    parser.add_argument(
        "--force-publish",
        action="store_true",
        help="publish even if the quality gate refuses the new model (recorded in the manifest)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else a local instance)",
    )
    parser.set_defaults(func=cmd_pipeline)


# ---- demo -------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> None:
    from merging.pipeline.demo import default_demo_config, run_demo
    from merging.pipeline.job import load_pipeline_config

    path = Path(args.config) if args.config else default_demo_config()
    config = load_pipeline_config(path, args.overrides)
    run_demo(config, args.artifacts, args.run_id, args.host, args.port, serve=not args.no_serve)


def register_demo(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="the merge job on the embedded synthetic data, then the HTTP service",
        description="Run the whole merge job (the packaged demo config, configs/pipeline-demo.yaml in a checkout: synthetic data, a base "
        "model, four recipes in parallel on a local Ray, exact Fisher, merges, export, report), "
        "publish the bundle under --artifacts, print the metrics and an example request, then serve "
        "the bundle until Ctrl-C.",
    )
    add_pipeline_arguments(parser, "pipeline YAML (default: the demo config shipped with fishrec)")
    parser.add_argument("--host", default="127.0.0.1", help="address the service listens on")
    parser.add_argument("--port", type=int, default=8000, help="port of the service")
    parser.add_argument("--no-serve", action="store_true", help="stop after publishing")
    parser.set_defaults(func=cmd_demo)
