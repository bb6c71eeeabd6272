"""Command-line pieces every `fishrec` subcommand shares: `--set` overrides and user errors.

Import-light (argparse only) by contract: the serving image runs `fishrec serve`
without torch, and every package registers its subcommands through this module.
"""

from __future__ import annotations

import argparse
from typing import Any


class CommandError(Exception):
    """An error whose message is the whole story: printed without a traceback."""


def add_override_flags(
    parser: argparse.ArgumentParser, example: str = "train.lr=3e-4", what: str = "any config field"
) -> None:
    """`--set KEY=VALUE` (repeatable), collected in `args.overrides` as raw strings."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what} by dotted path, e.g. --set {example} (repeatable)",
    )


def collect_overrides(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """Dotted-path overrides from --set and from named flags ({attribute: dotted path})."""
    from training.config import parse_override

    values = dict(parse_override(text) for text in args.overrides)
    for attribute, dotted in flags.items():
        value = getattr(args, attribute, None)
        if value is not None:
            values[dotted] = value
    return values


def is_user_error(err: Exception) -> bool:
    """Bad input of every kind (files, configs, checkpoints, arguments); bugs keep their traceback."""
    return isinstance(
        err, CommandError | ValueError | FileNotFoundError | PermissionError | OSError | KeyError
    )
