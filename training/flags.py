"""Command-line pieces every `fishrec` subcommand shares: `--set` overrides and user errors.

Import-light (argparse only) by contract: the serving image runs `fishrec serve`
without torch, and every package registers its subcommands through this module.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel


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


def add_config_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], fields: Sequence[str]
) -> None:
    """A flag per pydantic field (`fisher_floor` -> --fisher-floor) with its type, default, help.

    bool: a switch (--x/--no-x when the default is True); list[float]: one or more
    values; Optional[T]: T. The parsed value lands in `args.<field>`.
    """
    for name in fields:
        info = model.model_fields[name]
        flag = "--" + name.replace("_", "-")
        kind, many = _scalar(info.annotation)
        options: dict[str, Any] = {"default": info.default, "help": info.description, "dest": name}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction if info.default else "store_true"
        else:
            options["type"] = kind
            if many:
                options["nargs"] = "+"
        parser.add_argument(flag, **options)


def _scalar(annotation: Any) -> tuple[type, bool]:
    """(element type, is a list) of int, float, bool, str, list[T], T | None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is list:
        return args[0], True
    if args and origin is not None:  # T | None
        return _scalar(args[0])
    if annotation in (int, float, bool, str):
        return annotation, False
    raise TypeError(f"no command-line form for {annotation!r}")


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
