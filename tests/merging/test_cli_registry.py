"""The CLI is built from the registries and configs: choices and defaults cannot drift."""

from __future__ import annotations

import argparse
import subprocess
import sys

from merging.cli import MERGE_FLAGS, register_merge
from merging.methods import METHODS, NEEDS_BASE, NEEDS_FISHERS, MergeConfig
from merging.strategies import MERGE_METHODS


def merge_parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser()
    register_merge(root.add_subparsers())
    return root


def merge_action(dest: str) -> argparse.Action:
    root = merge_parser()
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    return next(a for a in sub.choices["merge"]._actions if a.dest == dest)


def test_merge_methods_of_the_cli_are_the_registry() -> None:
    assert list(merge_action("method").choices) == list(METHODS)
    assert set(METHODS) == set(MERGE_METHODS)
    assert merge_action("method").default == MergeConfig.model_fields["method"].default
    assert {"fisher", "fisher_grouped", "regmean"} == NEEDS_FISHERS
    assert {"task_arithmetic", "ties"} == NEEDS_BASE


def test_merge_flags_take_the_config_defaults() -> None:
    for field in MERGE_FLAGS:
        assert merge_action(field).default == MergeConfig.model_fields[field].default, field
    args = merge_parser().parse_args(["merge", "--checkpoints", "a", "b", "--out", "o"])
    config = MergeConfig(method=args.method, **{f: getattr(args, f) for f in MERGE_FLAGS})
    assert config == MergeConfig()
    args = merge_parser().parse_args(
        ["merge", "--checkpoints", "a", "--out", "o", "--coefficients", "0.3", "0.7", "--align"]
    )
    assert args.coefficients == [0.3, 0.7] and args.align is True


def test_the_cli_and_the_method_catalogue_import_without_torch() -> None:
    code = "import sys, merging.cli, merging.methods; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
