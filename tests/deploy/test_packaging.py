"""What each install brings: the extras resolved by pip itself (a dry run against the index)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "ray", "transformers", "sentence-transformers"}


# pip resolves every extra against the index: outside the inner loop (pytest -m "not slow").
pytestmark = pytest.mark.slow


def resolved(target: str, tmp_path: Path) -> set[str]:
    """Distribution names pip would install for `target` into an empty environment."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    command += ["--quiet", "-c", str(REPO / "deploy" / "constraints.txt")]
    command += ["--report", str(report), target]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "No matching distribution" in done.stderr:
        pytest.skip(f"the package index is not reachable: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-") for item in installs}


def test_the_base_install_pulls_neither_torch_nor_ray(tmp_path: Path) -> None:
    names = resolved(".", tmp_path)
    assert "fishrec" in names and "pydantic" in names
    assert not names & (HEAVY | {"fastapi", "onnxruntime"})


def test_the_serve_extra_pulls_no_training_stack(tmp_path: Path) -> None:
    names = resolved(".[serve]", tmp_path)
    assert {"fastapi", "onnxruntime", "uvicorn"} <= names
    assert not names & HEAVY


def test_item_text_encoders_come_only_with_the_text_extra(tmp_path: Path) -> None:
    train = resolved(".[train]", tmp_path)
    assert {"torch", "ray", "onnx"} <= train
    assert not train & {"transformers", "sentence-transformers"}


def test_the_cli_reports_its_version() -> None:
    fishrec = Path(sys.executable).parent / "fishrec"
    done = subprocess.run([str(fishrec), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    name, version = done.stdout.split()
    assert name == "fishrec" and version[0].isdigit()
