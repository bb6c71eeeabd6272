"""The service following a bundle store on a real S3 API server (FISHREC_SOURCE).

No shared volume: the job side writes the bucket, the service downloads each
new bundle into its own cache, verifies it, and only then swaps.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from merging.pipeline.store import ArtifactStore
from serving.bundle import BundleError
from serving.mirror import BundleMirror
from tests.serving_support import (
    AUTH,
    corrupt,
    metric,
    publish,
    ready_server,
    ready_version,
    server_settings,
    wait_for,
)

pytestmark = pytest.mark.slow  # a real S3 API server process

FAILURES = 'fishrec_model_reloads_total{result="failure"}'


def upload(store: ArtifactStore, staging: Path, bundle: Path, run_id: str, latest: bool) -> Path:
    """Publish `bundle` as run_id to the store as the job does (folder first, LATEST last)."""
    folder = publish(staging, bundle, run_id, latest=False)
    store.upload_folder(folder, f"runs/{run_id}")
    if latest:
        store.write_text("LATEST", run_id + "\n")
    return folder


def test_the_service_follows_latest_on_s3(
    s3_bucket: str, serving_bundle: Path, tmp_path: Path
) -> None:
    source = f"{s3_bucket}/fishrec"
    store, staging, cache = ArtifactStore(source), tmp_path / "staging", tmp_path / "cache"
    upload(store, staging, serving_bundle, "r1", latest=True)
    settings = server_settings(cache, source=source)
    with ready_server(settings) as live, httpx.Client(base_url=live.url, headers=AUTH) as client:
        assert ready_version(client) == "r1"
        answer = client.post("/v1/recommendations", json={"items": ["i3"]})
        assert answer.status_code == 200 and answer.json()["model_version"] == "r1"
        assert (cache / "runs" / "r1" / "manifest.json").is_file()

        # A corrupt upload is downloaded, fails its checksum and is never cached or served.
        corrupt(upload(store, staging, serving_bundle, "r2", latest=False))
        store.upload_folder(staging / "runs" / "r2", "runs/r2")
        store.write_text("LATEST", "r2\n")
        wait_for(lambda: metric(client, FAILURES) >= 1, what="the corrupt r2 to be refused")
        assert ready_version(client) == "r1" and not (cache / "runs" / "r2").exists()

        # An upload that stopped before its manifest is refused the same way.
        half = publish(staging, serving_bundle, "r3", latest=False)
        store.upload_file(half / "model.onnx", "runs/r3/model.onnx")
        store.write_text("LATEST", "r3\n")
        wait_for(lambda: metric(client, FAILURES) >= 2, what="the half-uploaded r3 to be refused")
        assert ready_version(client) == "r1"
        assert client.post("/v1/recommendations", json={"items": ["i3"]}).status_code == 200

        # A good one is taken; the cache keeps it and the one before it only.
        upload(store, staging, serving_bundle, "r4", latest=True)
        wait_for(lambda: ready_version(client) == "r4", what="r4 from the bucket")
        assert sorted(p.name for p in (cache / "runs").iterdir()) == ["r1", "r4"]
        upload(store, staging, serving_bundle, "r5", latest=True)
        wait_for(lambda: ready_version(client) == "r5", what="r5 from the bucket")
        wait_for(
            lambda: sorted(p.name for p in (cache / "runs").iterdir()) == ["r4", "r5"],
            what="the cache to drop r1",
        )


def test_mirror_errors_are_refusals_not_crashes(s3_bucket: str, tmp_path: Path) -> None:
    mirror = BundleMirror(f"{s3_bucket}/empty", tmp_path / "cache")
    assert mirror.latest() is None  # nothing published yet
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        mirror.fetch("r1")
    with pytest.raises(BundleError, match="not a plain folder name"):
        mirror.fetch("../etc")
    ArtifactStore(f"{s3_bucket}/empty").write_text("LATEST", "../../etc\n")
    with pytest.raises(BundleError, match="LATEST: run id"):
        mirror.latest()
