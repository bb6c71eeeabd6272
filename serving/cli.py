"""`fishrec serve`: the HTTP service. Imports neither torch nor ray (the serving image has neither)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add the serve subcommand to the `fishrec` parser."""
