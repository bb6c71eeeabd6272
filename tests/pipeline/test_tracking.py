"""The merge job on a real MLflow tracking server (SQLite backend) started by the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from merging.pipeline.gate import GateRefused
from merging.pipeline.job import run_pipeline
from merging.pipeline.tracking import OUTCOME_TAG, RUN_ID_TAG, model_metrics
from tests.support import tiny_pipeline

# Real Ray runs of the job: minutes, so outside the inner loop (pytest -m "not slow").
pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]
mlflow = pytest.importorskip("mlflow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a loopback port: SQLite runs and registry, artifacts served by it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the MLflow server never became healthy"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:  # gunicorn's graceful stop takes its time
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def tracked(url: str, **overrides):  # type: ignore[no-untyped-def]
    values = {
        "tracking": {"enabled": True, "uri": url, "experiment": "nightly", "alias": "champion"},
        "recipes": [{"name": "plain"}, {"name": "cl4srec"}],
        **overrides,
    }
    return tiny_pipeline(**values)


def run_of(client, run_id: str):  # type: ignore[no-untyped-def]
    experiment = client.get_experiment_by_name("nightly")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'"
    )
    return run


def test_a_published_run_is_tracked_and_its_bundle_registered(
    tracking_server: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    result = run_pipeline(tracked(tracking_server), str(tmp_path), run_id="night-1")
    client = MlflowClient(tracking_uri=tracking_server)
    run = run_of(client, "night-1")
    assert run.info.status == "FINISHED" and run.info.run_name == "night-1"
    assert run.data.tags[OUTCOME_TAG] == "published"
    assert run.data.params["setting"] == "finetune"
    assert run.data.params["experiment.model.hidden_size"] == "16"
    expected = model_metrics(result.metrics)
    assert run.data.metrics["merged-fisher/test/ndcg_at_10"] == pytest.approx(
        expected["merged-fisher/test/ndcg_at_10"]
    )
    assert any(key.startswith("stage_seconds/train/") for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/report.md" in artifacts
    bundle = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert {"bundle/manifest.json", "bundle/model.onnx"} <= bundle
    version = client.get_model_version_by_alias("fishrec", "champion")
    assert version.run_id == run.info.run_id and version.tags[RUN_ID_TAG] == "night-1"

    # A worse run is refused by the gate: tracked as refused, the alias stays.
    worse = tracked(
        tracking_server,
        experiment__train__epochs=0,
        recipe_epochs=0,
        merge__methods=["uniform"],
        merge__publish="uniform",
        merge__finetune_epochs=0,
    )
    with pytest.raises(GateRefused):
        run_pipeline(worse, str(tmp_path), run_id="night-2")
    refused = run_of(client, "night-2")
    assert refused.data.tags[OUTCOME_TAG] == "refused"
    assert client.get_model_version_by_alias("fishrec", "champion").version == version.version


def test_tracking_is_off_by_default_and_an_unreachable_server_costs_nothing() -> None:
    from merging.pipeline.tracking import MlflowTracker, Tracker, TrackingSpec, make_tracker

    assert tiny_pipeline().tracking.enabled is False
    assert type(make_tracker(TrackingSpec())) is Tracker  # records nothing
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        tracker = MlflowTracker(TrackingSpec(enabled=True, uri=f"http://127.0.0.1:{free_port()}"))
        tracker.start("offline", {"setting": "finetune"})  # logged, not raised
        tracker.stage("train/plain", 1.0)
        tracker.metrics({"models": {}})
        tracker.finish("published")
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert tracker.run_id is None
