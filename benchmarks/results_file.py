"""The JSON a benchmark leaves in benchmarks/results/: its settings, then its figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def write_results(path: Path, args: argparse.Namespace, **figures: Any) -> None:
    """Write `{"settings": every argument as text, **figures}` to `path` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) for key, value in vars(args).items()}
    path.write_text(json.dumps({"settings": settings, **figures}, indent=2) + "\n")
