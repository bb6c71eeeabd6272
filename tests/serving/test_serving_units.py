"""Serving parts on their own: bundle verification, CPU quota, the batcher, settings, imports."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.batcher import BatchObserver, MicroBatcher, QueueFull
from serving.bundle import BundleError, load_bundle, read_latest
from serving.cpus import cpu_quota, default_threads, serving_threads
from serving.metrics import Metrics
from serving.model_manager import ModelManager
from serving.runtime import OnnxModel, Row, length_groups
from serving.settings import Settings
from tests.serving_support import corrupt, write_foreign_model

# ---- bundles -------------------------------------------------------------------------------


def test_a_published_bundle_loads(serving_bundle: Path) -> None:
    bundle = load_bundle(serving_bundle)
    assert bundle.num_items == 200 and bundle.vocab.num_items == 200
    assert bundle.max_history == bundle.manifest["model"]["max_len"]
    assert sorted(bundle.popular.tolist()) == list(range(1, 201))
    assert bundle.popular_scores[0] >= bundle.popular_scores[-1]
    assert bundle.model_file(quantized=True).name == "model.onnx"  # none in this bundle
    with_int8 = dataclasses.replace(
        bundle, manifest={**bundle.manifest, "quantized": {"file": "model.int8.onnx"}}
    )
    assert with_int8.model_file(quantized=True).name == "model.int8.onnx"
    assert with_int8.model_file(quantized=False).name == "model.onnx"
    known, unknown = bundle.vocab.encode([bundle.vocab.items[4], "zzz"])
    assert known == [5] and unknown == ["zzz"]


def edit_json(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        document = json.loads((folder / name).read_text())
        change(document)
        (folder / name).write_text(json.dumps(document))

    return edit


def rewrite(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """Edit a checksummed file and fix its checksum, so only the content check can object."""

    def edit(folder: Path) -> None:
        edit_json(name, change)(folder)
        from serving.bundle import sha256_file

        edit_json("manifest.json", lambda m: m["files"].update({name: sha256_file(folder / name)}))(
            folder
        )

    return edit


BROKEN = {
    "no manifest": (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text("{"), "not valid JSON"),
    "schema 2": (
        edit_json("manifest.json", lambda m: m.update(schema="fishrec.bundle/2")),
        "major version 2",
    ),
    "other schema": (
        edit_json("manifest.json", lambda m: m.update(schema="x/1")),
        "not a fishrec bundle",
    ),
    "model corrupt": (corrupt, "sha256 mismatch"),
    "file missing": (
        lambda f: (f / "popular.json").unlink(),
        "listed in manifest.json but missing",
    ),
    "onnx unlisted": (
        edit_json("manifest.json", lambda m: m["files"].pop("model.onnx")),
        "does not list",
    ),
    "escaping name": (
        edit_json("manifest.json", lambda m: m["files"].update({"../x": "0"})),
        "points outside",
    ),
    "num_items disagree": (
        edit_json("manifest.json", lambda m: m.update(num_items=199)),
        "manifest says 199",
    ),
    "popular incomplete": (
        rewrite("popular.json", lambda p: p.update(items=p["items"][:-1], counts=p["counts"][:-1])),
        "all 200 items",
    ),
    "popular repeats": (
        rewrite("popular.json", lambda p: p["items"].__setitem__(0, p["items"][1])),
        "every internal id",
    ),
    "vocab mask id": (rewrite("vocab.json", lambda v: v.update(mask_id=7)), "mask_id"),
    "no run id": (edit_json("manifest.json", lambda m: m.pop("run_id")), "run_id"),
}


@pytest.mark.parametrize("damage,reason", BROKEN.values(), ids=BROKEN.keys())
def test_bad_bundles_are_refused_with_a_reason(
    serving_bundle: Path, tmp_path: Path, damage: Callable[[Path], None], reason: str
) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(serving_bundle, folder)
    damage(folder)
    with pytest.raises(BundleError, match=reason):
        load_bundle(folder)


def test_latest(tmp_path: Path) -> None:
    assert read_latest(tmp_path) is None
    (tmp_path / "LATEST").write_text("run-2024.01_a\n")
    assert read_latest(tmp_path) == "run-2024.01_a"
    (tmp_path / "LATEST").write_text("../../etc\n")
    with pytest.raises(BundleError, match="plain folder name"):
        read_latest(tmp_path)


def test_onnx_model_checks_the_interface(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="onnxruntime cannot load"):
        OnnxModel(tmp_path / "junk.onnx", 10, 1, 1)
    other = write_foreign_model(tmp_path / "other.onnx")
    with pytest.raises(BundleError, match="do not match the bundle contract"):
        OnnxModel(other, 10, 1, 1)


def test_onnx_model_batches_rows_of_different_length_and_k(serving_bundle: Path) -> None:
    model = OnnxModel(serving_bundle / "model.onnx", 200, 1, 1, max_history=20)
    rows = [
        Row(np.array([5, 6, 7]), 3, True),
        Row(np.array([9]), 10, False),
        Row(np.array([5, 6, 7]), 3, False),
    ]
    together = model.run(rows)
    alone = [model.run([row])[0] for row in rows]
    for a, b, row in zip(together, alone, rows, strict=True):
        assert len(a.ids) == row.k
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert not set(together[0].ids) & {5, 6, 7}
    model.warm_up(batch_size=4, history=20)


def test_length_groups_bound_the_padding() -> None:
    lengths = [200, 10, 190, 12, 100, 11, 3]
    groups = length_groups(lengths)
    assert [[lengths[i] for i in group] for group in groups] == [[3, 10, 11, 12], [100], [190, 200]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500).tolist()
    groups = length_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(500))
    for group in groups:
        real = sum(lengths[i] for i in group)
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= 1.25 * real + 4 * len(group)


# ---- CPU quota -----------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cpu_quota_from_cgroup_v2(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    write(proc, "0::/kubepods/pod1/c1\n")
    root = tmp_path / "cgroup"
    write(root / "cpu.max", "max 100000\n")
    assert cpu_quota(root, proc) is None
    write(root / "kubepods" / "pod1" / "c1" / "cpu.max", "150000 100000\n")
    assert cpu_quota(root, proc) == 1.5
    write(root / "kubepods" / "cpu.max", "100000 100000\n")  # a tighter limit further up
    assert cpu_quota(root, proc) == 1.0


def test_cpu_quota_from_cgroup_v1(tmp_path: Path) -> None:
    proc = tmp_path / "proc_cgroup"
    write(proc, "4:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n")
    root = tmp_path / "cgroup"
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(root, proc) is None
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(root, proc) == 3.0


def test_default_threads() -> None:
    assert default_threads(quota=None, cpus=64) == 64
    assert default_threads(quota=2.0, cpus=64) == 2
    assert default_threads(quota=1.5, cpus=64) == 1  # never more threads than whole CPUs
    assert default_threads(quota=0.5, cpus=64) == 1
    assert default_threads(quota=8.0, cpus=4) == 4  # the affinity mask is a limit too


def test_the_service_leaves_a_core_to_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    assert serving_threads(budget=4.0, cpus=64) == 3
    assert serving_threads(budget=2.0, cpus=64) == 1
    assert serving_threads(budget=1.0, cpus=64) == 1  # never fewer than one thread
    assert serving_threads(budget=None, cpus=8) == 7  # no quota: the CPUs it may run on
    monkeypatch.setattr("serving.cpus.available_cpus", lambda: 64)
    assert ModelManager(Settings(cpus=6), Metrics()).threads == 5
    assert ModelManager(Settings(cpus=6, intra_op_threads=2), Metrics()).threads == 2


# ---- batcher -------------------------------------------------------------------------------


def test_batcher_coalesces_concurrent_rows() -> None:
    sizes: list[int] = []

    async def scenario() -> list[int]:
        async def times_ten(rows: list[int]) -> list[int]:
            return [row * 10 for row in rows]

        batcher: MicroBatcher[int, int] = MicroBatcher(
            times_ten,
            max_batch_size=8,
            max_wait_s=0.05,
            max_queue=100,
            observer=BatchObserver(batch=lambda size, seconds: sizes.append(size)),
        )
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit([i]) for i in range(20)))
        await batcher.close()
        return [a for (a,) in answers]

    assert asyncio.run(scenario()) == [i * 10 for i in range(20)]
    assert sizes == [8, 8, 4]


async def echo(rows: list[int]) -> list[int]:
    return rows


def test_batcher_refuses_rows_beyond_the_queue_and_drains_on_close() -> None:
    async def scenario() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(
            echo, max_batch_size=100, max_wait_s=10.0, max_queue=3
        )
        batcher.start()
        waiting = asyncio.gather(batcher.submit([1, 2]), batcher.submit([3]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="limit 3"):
            await batcher.submit([4])
        await batcher.close()  # does not wait for max_wait: closing runs what is queued
        assert await waiting == [[1, 2], [3]]

    asyncio.run(asyncio.wait_for(scenario(), timeout=5))


def test_batcher_passes_errors_to_the_batch_and_goes_on() -> None:
    async def run(rows: list[int]) -> list[int]:
        if 0 in rows:
            raise RuntimeError("boom")
        return rows

    async def scenario() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, 4, 0.0, 10)
        batcher.start()
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit([0])
        assert await batcher.submit([5]) == [5]
        await batcher.close()

    asyncio.run(scenario())


def test_batcher_keeps_up_to_max_in_flight_runs_going() -> None:
    running, most = 0, 0

    async def slow(rows: list[int]) -> list[int]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        return rows

    async def scenario() -> list[list[int]]:
        batcher: MicroBatcher[int, int] = MicroBatcher(slow, 2, 0.0, 100, max_in_flight=2)
        batcher.start()
        answers = asyncio.gather(*(batcher.submit([i]) for i in range(10)))
        await asyncio.sleep(0)
        await batcher.close()  # answers every queued row and waits for the runs in flight
        assert running == 0
        return await answers

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == [[i] for i in range(10)]
    assert most == 2


# ---- settings and imports ------------------------------------------------------------------


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FISHREC_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("FISHREC_API_KEY", "s3cret")
    monkeypatch.setenv("FISHREC_INTRA_OP_THREADS", "3")
    settings = Settings(port=9000)
    assert (settings.max_batch_size, settings.intra_op_threads, settings.port) == (16, 3, 9000)
    assert settings.api_key_value() == "s3cret" and "s3cret" not in repr(settings)
    monkeypatch.setenv("FISHREC_API_KEY", "")
    assert Settings().api_key_value() is None  # an empty key means no key
    with pytest.raises(ValueError, match="plain folder name"):
        Settings(bundle="../other")
    monkeypatch.setenv("FISHREC_MAX_K", "0")
    with pytest.raises(ValueError, match="max_k"):
        Settings()


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED and name not in {allowed!r}:
            raise ImportError(f"serving must not import {{name}}")
sys.meta_path.insert(0, Blocker())
"""


def run_blocked(code: str, blocked: set[str], allowed: set[str] = frozenset()) -> None:
    script = BLOCKER.format(blocked=sorted(blocked), allowed=sorted(allowed)) + textwrap.dedent(
        code
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_serving_runs_without_torch_ray_training_or_merging(
    serving_bundle: Path, tmp_path: Path
) -> None:
    """The serving image has none of them: load a bundle and answer a request with them blocked."""
    from tests.serving_support import publish

    publish(tmp_path, serving_bundle, "r1")
    code = f"""
    from fastapi.testclient import TestClient
    from serving.app import create_app
    from serving.settings import Settings
    import serving.cli, serving.server
    app = create_app(Settings(artifacts={str(tmp_path)!r}, reload_interval_s=0.05))
    with TestClient(app) as client:
        import time
        for _ in range(200):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        response = client.post("/v1/recommendations", json={{"items": ["i3", "i5"], "k": 3}})
        assert response.status_code == 200, response.text
        assert len(response.json()["items"]) == 3
    """
    run_blocked(code, {"torch", "ray", "training", "merging"})


def test_fishrec_serve_command_needs_neither_torch_nor_ray() -> None:
    code = """
    import contextlib, io
    from merging.main import build_parser
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "--artifacts" in help_text.getvalue()
    """
    # merging.methods is the torch-free catalogue the CLI builds `fishrec merge` from.
    allowed = {"merging", "merging.main", "merging.cli", "merging.methods"}
    run_blocked(code, {"torch", "ray", "merging"}, allowed=allowed)


@pytest.mark.parametrize("log_requests", [False, True])
def test_request_logging(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, log_requests: bool
) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app

    app = create_app(Settings(artifacts=tmp_path, log_requests=log_requests, reload_interval_s=0))
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="fishrec.access"):
        ok = client.get("/healthz", headers={"X-Request-ID": "caller-id-1"})
        missing = client.get("/nowhere")
    logged = [(r.status, r.request_id) for r in caplog.records if r.name == "fishrec.access"]
    assert ok.headers["x-request-id"] == "caller-id-1"  # a caller's id is kept
    expected = [(404, missing.headers["x-request-id"])]
    assert logged == ([(200, "caller-id-1"), *expected] if log_requests else expected)
