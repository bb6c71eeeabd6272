"""The artifact store on a real S3 API server: publish, LATEST, a stopped upload, retention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from merging.bundle import verify_bundle, write_manifest
from merging.pipeline.publish import publish_bundle
from merging.pipeline.retention import apply_retention
from merging.pipeline.store import ArtifactStore
from serving.bundle import BundleError, load_bundle

pytestmark = pytest.mark.slow  # a real S3 API server process


def test_text_files_and_folders_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    store = ArtifactStore(f"{s3_bucket}/fishrec")
    assert not store.local and not store.exists("LATEST")
    store.write_text("work/r1/stages/data.json", '{"done": true}')
    assert json.loads(store.read_text("work/r1/stages/data.json")) == {"done": True}

    source = tmp_path / "folder"
    (source / "nested").mkdir(parents=True)
    (source / "a.txt").write_text("a")
    (source / "nested" / "b.bin").write_bytes(b"\x00\x01")
    store.upload_folder(source, "work/r1/bundle")
    assert store.listdir("work/r1/bundle") == ["a.txt", "nested"]
    copy = store.download_folder("work/r1/bundle", tmp_path / "copy")
    assert (copy / "a.txt").read_text() == "a"
    assert (copy / "nested" / "b.bin").read_bytes() == b"\x00\x01"

    # A second upload replaces the folder: nothing of the first stays behind.
    (source / "a.txt").unlink()
    store.upload_folder(source, "work/r1/bundle")
    assert store.listdir("work/r1/bundle") == ["nested"]
    store.remove("work/r1")
    assert not store.exists("work/r1/stages/data.json")


def stage_for_publish(store: ArtifactStore, bundle: Path, run_id: str, scratch: Path) -> str:
    """What the job's export and report stages leave in work/<run_id>/ before publishing."""
    exported = scratch / f"exported-{run_id}"
    shutil.copytree(bundle, exported)
    manifest = json.loads((exported / "manifest.json").read_text())
    write_manifest(
        exported,
        {k: v for k, v in manifest.items() if k not in ("schema", "files")} | {"run_id": run_id},
    )
    work = f"work/{run_id}"
    store.upload_folder(exported, f"{work}/bundle")
    store.write_text(f"{work}/report/report.md", "# run\n")
    store.write_text(f"{work}/metrics.json", json.dumps({"merged": {"test": 0.1}}))
    return work


def test_publish_to_s3_then_latest(s3_bucket: str, serving_bundle: Path, tmp_path: Path) -> None:
    store = ArtifactStore(f"{s3_bucket}/fishrec")
    work = stage_for_publish(store, serving_bundle, "run-1", tmp_path)
    published = publish_bundle(store, work, "run-1", tmp_path / "scratch")
    assert published == "runs/run-1"
    assert store.read_text("LATEST").strip() == "run-1"
    local = store.download_folder("runs/run-1", tmp_path / "served")
    assert load_bundle(local).run_id == "run-1"
    assert (local / "report.md").read_text().startswith("# run")


def test_an_upload_that_stops_half_way_is_never_taken(
    s3_bucket: str, serving_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(f"{s3_bucket}/fishrec")
    publish_bundle(
        store, stage_for_publish(store, serving_bundle, "good", tmp_path), "good", tmp_path / "s1"
    )
    broken = stage_for_publish(store, serving_bundle, "broken", tmp_path)

    # The connection drops before the last file of the bundle goes up.
    files = sum(p.is_file() for p in serving_bundle.rglob("*")) + 2  # + report.md, metrics.json
    real_put = store.fs.put_file
    sent: list[str] = []

    def put_file(local: str, remote: str, **kwargs: object) -> None:
        if "/runs/broken/" in remote and len(sent) == files - 1:
            raise ConnectionError("upload interrupted")
        if "/runs/broken/" in remote:
            sent.append(Path(remote).name)
        real_put(local, remote, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", put_file)
    with pytest.raises(ConnectionError):
        publish_bundle(store, broken, "broken", tmp_path / "s2")
    # The manifest goes last, so it is not among what arrived; LATEST never moved.
    assert len(sent) == files - 1 and "manifest.json" not in sent
    assert store.exists("runs/broken/model.onnx")
    assert store.read_text("LATEST").strip() == "good"
    with pytest.raises(BundleError, match="manifest"):
        load_bundle(store.download_folder("runs/broken", tmp_path / "half"))


def test_retention_on_the_bucket(s3_bucket: str, serving_bundle: Path, tmp_path: Path) -> None:
    store = ArtifactStore(f"{s3_bucket}/fishrec")
    for n in range(1, 5):
        run_id = f"night-{n}"
        work = stage_for_publish(store, serving_bundle, run_id, tmp_path)
        publish_bundle(store, work, run_id, tmp_path / f"scratch-{n}")
    result = apply_retention(store, keep_runs=2, current="night-4")
    assert result.kept_runs == ["night-3", "night-4"]
    assert sorted(store.listdir("runs")) == ["night-3", "night-4"]
    assert store.read_text("LATEST").strip() == "night-4"
    verify_bundle(store.download_folder("runs/night-4", tmp_path / "kept"))


def test_data_on_the_bucket_loads_as_the_local_folder(
    s3_bucket: str, small_data_dir: Path, tmp_path: Path
) -> None:
    """data.path may be an s3:// URL: a prepared folder (or a raw file) is downloaded, then read."""
    from training.config import DataSpec
    from training.data_error import DataError
    from training.prepare import load_data
    from training.sources import load_source

    ArtifactStore(s3_bucket).upload_folder(small_data_dir, "data/small")
    remote = load_source(DataSpec(path=f"{s3_bucket}/data/small"), tmp_path / "cache")
    assert remote.fingerprint == load_data(small_data_dir).fingerprint
    assert (tmp_path / "cache" / "path").is_dir()  # the download, kept where the caller said

    raw = tmp_path / "log.tsv"
    rows = "".join(f"u{u}\ti{(u + k) % 7}\t{k}\n" for u in range(12) for k in range(5))
    raw.write_text("user\titem\ttimestamp\n" + rows)
    ArtifactStore(s3_bucket).upload_file(raw, "data/raw/log.tsv")
    from_bucket = load_source(DataSpec(path=f"{s3_bucket}/data/raw/log.tsv"))
    assert from_bucket.fingerprint == load_source(DataSpec(path=str(raw))).fingerprint

    with pytest.raises(DataError, match="no such file or folder"):
        load_source(DataSpec(path=f"{s3_bucket}/data/missing"))
