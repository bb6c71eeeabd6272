"""The merge job on a real multi-node Ray cluster with its artifacts on an S3 API server.

Two nodes on this machine (a head and a worker: separate raylets, object stores
and resources), each with its own scratch folder (TMPDIR), so nothing can pass
through a shared local disk: every stage reads and writes the bucket. The job
is a separate driver process that joins the cluster by address, as
`fishrec pipeline --address ...` does against a KubeRay cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from merging.pipeline.store import ArtifactStore
from serving.bundle import load_bundle
from tests.support import tiny_pipeline
from training.prepare import load_data

pytestmark = pytest.mark.slow

NODE_MEMORY = {"object_store_memory": 200 * 1024**2}


@contextmanager
def two_node_cluster() -> Iterator[tuple[Any, Any, dict[str, Path]]]:
    """A head and a worker node of 1 CPU each, each with its own TMPDIR; stopped afterwards."""
    from ray.cluster_utils import Cluster

    # Short paths: Ray puts sockets under the session folder (108-byte limit).
    scratch = {name: Path(tempfile.mkdtemp(prefix=f"fr-{name}-")) for name in ("head", "worker")}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "env_vars": {"TMPDIR": str(scratch["head"])},
            **NODE_MEMORY,
        },
    )
    try:
        worker = cluster.add_node(
            num_cpus=1, env_vars={"TMPDIR": str(scratch["worker"])}, **NODE_MEMORY
        )
        cluster.wait_for_nodes()
        yield cluster, worker, scratch
    finally:
        cluster.shutdown()


def job_command(config: Path, artifacts: str, address: str, run_id: str) -> list[str]:
    fishrec = str(Path(sys.executable).parent / "fishrec")
    return [
        fishrec,
        "--log-level",
        "WARNING",
        "pipeline",
        "--config",
        str(config),
        "--artifacts",
        artifacts,
        "--address",
        address,
        "--run-id",
        run_id,
    ]


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    path = tmp_path / "pipeline.yaml"
    config = tiny_pipeline(**overrides).model_dump(mode="json", exclude_unset=True)
    path.write_text(yaml.safe_dump(config))
    return path


def worked_on(scratch: Path) -> list[str]:
    """The job's work folders a node's tasks left in its own scratch."""
    root = scratch / "fishrec-scratch"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def assert_published(store: ArtifactStore, run_id: str, tmp_path: Path) -> None:
    assert store.read_text("LATEST").strip() == run_id
    bundle = load_bundle(store.download_folder(f"runs/{run_id}", tmp_path / "bundle"))
    assert bundle.run_id == run_id
    metrics = json.loads(store.read_text(f"runs/{run_id}/metrics.json"))
    assert "merged-fisher" in metrics["models"]


def test_the_job_spreads_over_two_nodes_with_data_and_artifacts_on_s3(
    s3_bucket: str, small_data_dir: Path, tmp_path: Path
) -> None:
    """No shared disk at all: the prepared data folder and the artifact root are on the bucket.

    The bucket already holds two published runs (the newest, a fake, is LATEST) and a
    failed run's work folder: the gate cannot load the fake champion and publishes, and
    retention (keep 2) removes the oldest run and the stale work folder from the bucket.
    """
    artifacts = f"{s3_bucket}/fishrec"
    ArtifactStore(s3_bucket).upload_folder(small_data_dir, "data/small")
    store = ArtifactStore(artifacts)
    for day, old in enumerate(["old-1", "old-2"], start=1):
        manifest = {"created": f"2026-11-0{day}T03:00:00+00:00"}
        store.write_text(f"runs/{old}/manifest.json", json.dumps(manifest))
    store.write_text("LATEST", "old-2\n")
    store.write_text("work/failed-night/stages/data.json", "{}")
    config = write_config(
        tmp_path, experiment__data__path=f"{s3_bucket}/data/small", retention__keep_runs=2
    )
    with two_node_cluster() as (cluster, _, scratch):
        command = job_command(config, artifacts, cluster.address, "two-nodes")
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        # Both nodes worked on the run, each in its own scratch folder.
        assert worked_on(scratch["head"]) and worked_on(scratch["worker"]), scratch
    assert_published(store, "two-nodes", tmp_path)
    manifest = json.loads(store.read_text("runs/two-nodes/manifest.json"))
    assert manifest["data_fingerprint"] == load_data(small_data_dir).fingerprint
    outcome = json.loads(store.read_text("work/two-nodes/outcome.json"))
    assert outcome["outcome"] == "published" and outcome["gate"]["champion"] is None
    assert "old-2 is not a loadable bundle" in outcome["gate"]["note"]
    assert store.listdir("runs") == ["old-2", "two-nodes"]
    assert store.listdir("work") == ["two-nodes"]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_for_marker(store: ArtifactStore, marker: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while not store.exists(marker):
        if process.poll() is not None:
            raise AssertionError(f"the job ended before {marker}: {process.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker} after 300 s")
        time.sleep(0.2)


def test_a_worker_node_killed_mid_stage_is_survived(s3_bucket: str, tmp_path: Path) -> None:
    artifacts = f"{s3_bucket}/fishrec"
    store = ArtifactStore(artifacts)
    config = write_config(tmp_path, recipe_epochs=3, experiment__train__epochs=2)
    with two_node_cluster() as (cluster, worker, scratch):
        command = job_command(config, artifacts, cluster.address, "survivor")
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        with subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        ) as process:
            # The recipes start once the base is done: one runs on each node.
            wait_for_marker(store, "work/survivor/stages/train/base.json", process)
            wait_until(lambda: bool(worked_on(scratch["worker"])), "a task on the worker node")
            recipes = ("plain", "cl4srec", "duorec")
            done = [r for r in recipes if store.exists(f"work/survivor/stages/train/{r}.json")]
            assert len(done) < len(recipes) and worked_on(scratch["worker"]), "nothing in flight"
            cluster.remove_node(worker)  # its raylet and workers are killed
            try:
                _, stderr = process.communicate(timeout=600)
            finally:
                process.kill()
        assert process.returncode == 0, stderr[-4000:]
    assert_published(store, "survivor", tmp_path)
