"""Subcommands of the training package: data, train, evaluate, compare, warm-start.

`merging/main.py` (the `fishrec` console script) registers them with the other
packages' commands. Registration imports nothing heavy, so `fishrec serve` runs
in the serving image, which has no torch; each command imports what it needs
when it runs. The commands live by group: training/cli_data.py (data),
training/cli_train.py (train, warm-start), training/cli_evaluate.py (evaluate,
compare).
"""

from __future__ import annotations

import argparse

from training.cli_data import register_data
from training.cli_evaluate import register_compare, register_evaluate
from training.cli_train import register_train, register_warm_start


def register(commands: argparse._SubParsersAction) -> None:
    """Add the training package's subcommands (data, train, evaluate, compare, warm-start)."""
    register_data(commands)
    register_train(commands)
    register_evaluate(commands)
    register_compare(commands)
    register_warm_start(commands)
