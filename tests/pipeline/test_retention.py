"""Retention after publish: which runs and work folders stay, which go."""

from __future__ import annotations

import json
from pathlib import Path

from merging.pipeline.retention import apply_retention, published_runs
from merging.pipeline.store import ArtifactStore


def _store(root: Path, runs: list[str], latest: str, work: list[str]) -> ArtifactStore:
    store = ArtifactStore(str(root))
    for day, run_id in enumerate(runs, start=1):
        manifest = {"run_id": run_id, "created": f"2026-12-{day:02d}T03:00:00+00:00"}
        store.write_text(f"runs/{run_id}/manifest.json", json.dumps(manifest))
        store.write_text(f"runs/{run_id}/model.onnx", "bytes")
    for run_id in work:
        store.write_text(f"work/{run_id}/stages/data.json", "{}")
    store.write_text("LATEST", latest + "\n")
    return store


def test_the_newest_runs_stay_and_stale_work_folders_go(tmp_path: Path) -> None:
    # Ids that do not sort by time: the manifests' creation times decide.
    runs = ["r-c", "r-a", "r-e", "r-b", "r-d"]
    store = _store(tmp_path, runs, latest="r-d", work=[*runs, "failed-run"])
    assert published_runs(store) == runs
    result = apply_retention(store, keep_runs=2, current="r-d")
    assert result.kept_runs == ["r-b", "r-d"]
    assert sorted(result.deleted_runs) == ["r-a", "r-c", "r-e"]
    assert sorted(store.listdir("runs")) == ["r-b", "r-d"]
    assert sorted(store.listdir("work")) == ["r-b", "r-d"]
    assert sorted(result.deleted_work) == ["failed-run", "r-a", "r-c", "r-e"]
    assert store.read_text("LATEST").strip() == "r-d"


def test_a_rolled_back_latest_and_the_run_before_it_are_never_deleted(tmp_path: Path) -> None:
    runs = ["d1", "d2", "d3", "d4", "d5"]
    store = _store(tmp_path, runs, latest="d2", work=[])  # ops rolled back to d2
    result = apply_retention(store, keep_runs=2, current="d5")
    assert result.kept_runs == ["d1", "d2", "d4", "d5"]
    assert result.deleted_runs == ["d3"]


def test_keep_zero_keeps_everything(tmp_path: Path) -> None:
    store = _store(tmp_path, ["a", "b", "c"], latest="c", work=["a", "x"])
    result = apply_retention(store, keep_runs=0, current="c")
    assert result.deleted_runs == [] and result.deleted_work == []
    assert store.listdir("runs") == ["a", "b", "c"] and store.listdir("work") == ["a", "x"]
