"""Every benchmark starts: its imports resolve and its parser builds (`--help`).

Benchmarks are not run by the suite (they take minutes to hours), so a moved or
renamed function would otherwise break them silently.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Modules the benchmarks share, not benchmarks themselves (no command line of their own).
SHARED = {"recipes.py", "results_file.py"}
BENCHMARKS = sorted(
    p for p in (Path(__file__).parents[2] / "benchmarks").glob("*.py") if p.name not in SHARED
)


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_help(script: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parents[1],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
