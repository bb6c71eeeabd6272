"""Subcommands of the merging package: fisher, merge, export, pipeline, demo.

Registration must stay import-light (argparse only): heavy imports happen inside
each command function.
"""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Add every merging subcommand to the `fishrec` parser."""
