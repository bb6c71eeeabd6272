"""`fishrec serve`: the HTTP service. Imports neither torch nor ray (the serving image has neither)."""

from __future__ import annotations

import argparse
from typing import Any

SERVE_FLAGS = ("artifacts", "source", "bundle", "host", "port")


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.server import run
    from serving.settings import Settings

    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name) is not None
    }
    settings = Settings(**overrides)  # flags win over FISHREC_* variables
    run(settings, log_level=args.log_level)


def register(commands: argparse._SubParsersAction) -> None:
    """Add the serve subcommand to the `fishrec` parser."""
    parser = commands.add_parser(
        "serve",
        help="serve recommendations over HTTP from a published bundle",
        description="Serve the bundle that <artifacts>/LATEST names (or --bundle) with FastAPI and "
        "onnxruntime; newer bundles are picked up while serving. Every setting can also be given as "
        "a FISHREC_* environment variable (FISHREC_API_KEY, FISHREC_CPUS, FISHREC_INTRA_OP_THREADS, "
        "FISHREC_MAX_BATCH_SIZE, FISHREC_MAX_WAIT_MS, FISHREC_MAX_QUEUE, FISHREC_MAX_BODY_BYTES, "
        "FISHREC_MAX_HISTORY, FISHREC_MAX_K, FISHREC_RELOAD_INTERVAL_S, ...; see serving/settings.py).",
    )
    parser.add_argument(
        "--artifacts",
        default=None,
        help="artifact root with runs/<id>/ and LATEST (FISHREC_ARTIFACTS); with --source, "
        "the local cache of the remote root",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="follow a remote artifact root, e.g. s3://bucket/fishrec: each new bundle is "
        "downloaded into --artifacts, verified, then served (FISHREC_SOURCE; the s3 extra)",
    )
    parser.add_argument(
        "--bundle", default=None, help="serve this run id, ignoring LATEST (FISHREC_BUNDLE)"
    )
    parser.add_argument("--host", default=None, help="address to listen on (FISHREC_HOST)")
    parser.add_argument("--port", type=int, default=None, help="port (FISHREC_PORT)")
    parser.set_defaults(func=cmd_serve)
