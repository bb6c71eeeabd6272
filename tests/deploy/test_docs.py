"""The README stays a short front door that lists every command and links to pages
that exist, and the generated reference pages match the code (docs/generate.py)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from merging.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 250
# [text](target) links; images too. The target stops at whitespace or ')'.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[str]:
    """'data prepare', 'train', ... : every command and nested command of the parser."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = (*prefix, name)
                found.append(" ".join(path))
                found.extend(command_paths(sub, path))
    return found


def command_table() -> list[str]:
    """The first cell of every row of the README's command table."""
    lines = README.read_text().splitlines()
    start = lines.index("## Commands")
    cells = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("| `fishrec"):
            cells.append(line.split("` |")[0])
    return cells


def test_readme_is_short() -> None:
    count = len(README.read_text().splitlines())
    assert count <= MAX_README_LINES, (
        f"README.md has {count} lines (at most {MAX_README_LINES}): move details into docs/"
    )


def test_readme_lists_every_command() -> None:
    paths = command_paths(build_parser())
    assert "train" in paths and "data prepare" in paths and "warm-start" in paths
    cells = command_table()
    assert cells, "README.md has no command table under '## Commands'"
    # `fishrec data` is listed through its subcommands; every leaf has its own row.
    missing = [
        path
        for path in paths
        if not any(re.match(rf"\| `fishrec {re.escape(path)}(?:[ `]|$)", cell) for cell in cells)
    ]
    assert not missing, f"commands missing from README.md's command table: {missing}"


def test_generated_references_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        "docs/reference/ is stale; run `python docs/generate.py`\n"
        + result.stdout[-3000:]
        + result.stderr[-2000:]
    )


def test_readme_links_into_docs_resolve() -> None:
    targets = [target for target in LINK.findall(README.read_text()) if "://" not in target]
    docs_links = [t for t in targets if t.split("#")[0].startswith("docs/")]
    assert docs_links, "README.md links to no page under docs/"
    broken = [t for t in targets if t.split("#")[0] and not (ROOT / t.split("#")[0]).is_file()]
    assert not broken, f"README.md links to missing files: {broken}"
    assert all(t.split("#")[0].endswith(".md") for t in docs_links), docs_links
