"""The `fishrec` console script: every package's subcommands under one parser.

It lives at the top of the dependency order (merging may import training and
serving; neither imports merging), so no package below imports upward. Each
package registers its own commands (`training/cli.py`, `merging/cli.py`,
`serving/cli.py`); registration is import-light by contract, so `fishrec serve`
runs in the serving image, which has no torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from merging.cli import register as register_merging
from serving.cli import register as register_serving
from training.cli import register as register_training
from training.flags import is_user_error

DESCRIPTION = """\
fishrec: train SASRec/BERT4Rec-style recommenders with several objectives, merge
them by Fisher-weighted averaging, export the merged model to ONNX and serve it.

Stages:  data -> train -> evaluate/compare -> fisher -> merge -> export -> serve
The pipeline command runs them all on Ray; demo runs it on the embedded data.
Run `fishrec COMMAND --help` for the flags of a stage."""


def package_version() -> str:
    """The installed package's version (from the git tag it was built at, setuptools-scm)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fishrec")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fishrec",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fishrec {package_version()}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (register_training, register_merging, register_serving):
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure becomes one clear line unless --debug
        if args.debug or not is_user_error(err):
            raise
        print(f"fishrec {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
