"""Subcommands of the merging package: fisher, merge, export, pipeline, demo.

Registration must stay import-light (argparse only): heavy imports happen inside
each command function.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    """Add every merging subcommand to the `fishrec` parser."""
    register_pipeline(commands)


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
