"""Subcommands of the merging package: fisher, merge, export, pipeline, demo.

Registration must stay import-light (argparse only): heavy imports happen inside
each command function.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    """Add every merging subcommand to the `fishrec` parser."""
    register_export(commands)
    register_pipeline(commands)


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
        "--run-id", default=None, help="run id in the manifest (default: the name of --out)"
    )
    parser.add_argument(
        "--parity-sequences",
        type=int,
        default=256,
        help="how many real histories the parity check runs on",
    )
    parser.set_defaults(func=cmd_export)


# ---- pipeline -------------------------------------------------------------------------


def cmd_pipeline(args: argparse.Namespace) -> None:
    from merging.job import load_pipeline_config, run_pipeline

    config = load_pipeline_config(Path(args.config) if args.config else None, args.overrides)
    result = run_pipeline(config, args.artifacts, address=args.address, run_id=args.run_id)
    print(f"published run {result.run_id}: {args.artifacts}/{result.bundle}")


def register_pipeline(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "pipeline",
        help="the merge job on Ray: train, Fisher, merge, evaluate, export, publish",
        description="Train a base model and the recipes in parallel Ray tasks, compute their Fisher "
        "information over user shards, merge, evaluate every model, export the chosen merged model to "
        "ONNX and publish it as a bundle (then LATEST). Rerunning with the same --run-id skips the "
        "stages that finished and verify.",
    )
    parser.add_argument("--config", default=None, help="pipeline YAML (see configs/pipeline-*.yaml)")
    parser.add_argument("--artifacts", default="artifacts", help="artifact root: a path or an fsspec URI (s3://...)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--run-id", default=None, help="resume this run (default: a new id)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted path, e.g. --set recipe_epochs=5")
    parser.set_defaults(func=cmd_pipeline)
