"""Model lifecycle of the service: readiness, hot reload under load, refusals, overload, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving_support import (
    ADMIN,
    AUTH,
    LiveServer,
    corrupt,
    metric,
    point_latest,
    publish,
    ready_version,
    server_settings,
    wait_for,
)


@contextlib.contextmanager
def serving_r1(
    root: Path, bundle: Path, **settings: Any
) -> Iterator[tuple[LiveServer, httpx.Client]]:
    """A server on `bundle` published as r1, ready, and a client with the API key."""
    publish(root, bundle, "r1")
    with (
        LiveServer(server_settings(root, **settings)) as live,
        httpx.Client(base_url=live.url, headers=AUTH) as client,
    ):
        wait_for(lambda: ready_version(client) == "r1", what="r1")
        yield live, client


def test_not_ready_until_a_bundle_is_published(tmp_path: Path, serving_bundle: Path) -> None:
    with (
        LiveServer(server_settings(tmp_path)) as live,
        httpx.Client(base_url=live.url, headers=AUTH) as client,
    ):
        assert client.get("/healthz").status_code == 200
        readiness = client.get("/readyz")
        assert readiness.status_code == 503 and readiness.json()["ready"] is False
        assert "LATEST" in readiness.json()["reason"]
        early = client.post("/v1/recommendations", json={"items": []})
        assert early.status_code == 503 and early.json()["error"] == "not_ready"
        assert early.headers["retry-after"]

        publish(tmp_path, serving_bundle, "r1")
        wait_for(lambda: ready_version(client) == "r1", what="the first bundle")
        assert client.post("/v1/recommendations", json={"items": []}).status_code == 200


async def load(url: str, stop: asyncio.Event, workers: int) -> list[tuple[int, str | None]]:
    """Requests from `workers` concurrent clients until `stop`: (status, model_version) each."""
    outcomes: list[tuple[int, str | None]] = []

    async def worker(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=10) as client:
            while not stop.is_set():
                if i % 2:
                    body = {"requests": [{"items": ["i3", "i7"], "k": 5}, {"items": ["i9"]}]}
                    response = await client.post("/v1/recommendations:batch", json=body)
                    versions = {r["model_version"] for r in response.json().get("results", [])}
                    if response.status_code == 200:
                        assert versions == {response.json()["model_version"]}  # one model per batch
                else:
                    response = await client.post(
                        "/v1/recommendations", json={"items": ["i3", "i7"]}
                    )
                outcomes.append((response.status_code, response.json().get("model_version")))

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return outcomes


def test_hot_reload_under_load_fails_no_request(tmp_path: Path, serving_bundle: Path) -> None:
    publish(tmp_path, serving_bundle, "r1")
    settings = server_settings(tmp_path, max_wait_ms=5.0)  # requests sit in the queue during swaps
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, headers=AUTH) as client:
        wait_for(lambda: ready_version(client) == "r1", what="r1")

        async def scenario() -> list[tuple[int, str | None]]:
            stop = asyncio.Event()
            traffic = asyncio.create_task(load(live.url, stop, workers=8))
            await asyncio.sleep(0.3)
            publish(tmp_path, serving_bundle, "r2")  # picked up by the watcher
            await asyncio.to_thread(wait_for, lambda: ready_version(client) == "r2", 10.0, "r2")
            await asyncio.sleep(0.3)
            publish(tmp_path, serving_bundle, "r3", latest=False)  # loaded on request
            reload = await asyncio.to_thread(
                client.post, "/v1/admin/reload", json={"run_id": "r3"}, headers=ADMIN
            )
            assert reload.json() == {
                "changed": True,
                "model_version": "r3",
                "previous_version": "r2",
            }
            await asyncio.sleep(0.3)
            stop.set()
            return await traffic

        outcomes = asyncio.run(scenario())
        failures = [outcome for outcome in outcomes if outcome[0] != 200]
        assert not failures and len(outcomes) > 50
        assert {version for _, version in outcomes} == {"r1", "r2", "r3"}
        assert metric(client, 'fishrec_model_reloads_total{result="success"}') == 3
        assert metric(client, 'fishrec_model_info{version="r3"}') == 1
        assert 'fishrec_model_info{version="r1"}' not in client.get("/metrics").text
        # The watcher is edge-triggered: LATEST still names r2, but the rollout to r3 stays.
        time.sleep(0.3)
        assert ready_version(client) == "r3"


def test_bad_bundles_are_refused_and_the_old_one_keeps_serving(
    tmp_path: Path, serving_bundle: Path
) -> None:
    with serving_r1(tmp_path, serving_bundle) as (_, client):
        corrupt(publish(tmp_path, serving_bundle, "r2", latest=False))
        point_latest(tmp_path, "r2")
        failures = 'fishrec_model_reloads_total{result="failure"}'
        wait_for(lambda: metric(client, failures) >= 1, what="the watcher to refuse r2")
        assert ready_version(client) == "r1"
        answer = client.post("/v1/recommendations", json={"items": ["i3"]})
        assert answer.status_code == 200 and answer.json()["model_version"] == "r1"

        refused = client.post("/v1/admin/reload", headers=ADMIN)
        assert refused.status_code == 409 and "sha256 mismatch" in refused.json()["message"]

        newer = publish(tmp_path, serving_bundle, "r3", latest=False)
        manifest = json.loads((newer / "manifest.json").read_text())
        (newer / "manifest.json").write_text(json.dumps({**manifest, "schema": "fishrec.bundle/2"}))
        incompatible = client.post("/v1/admin/reload", json={"run_id": "r3"}, headers=ADMIN)
        assert (
            incompatible.status_code == 409 and "major version 2" in incompatible.json()["message"]
        )
        assert ready_version(client) == "r1"

        publish(tmp_path, serving_bundle, "r4")
        wait_for(lambda: ready_version(client) == "r4", what="a good bundle after bad ones")


def test_overload_gets_a_fast_503_and_recovers(tmp_path: Path, serving_bundle: Path) -> None:
    # Rows wait up to 300 ms for a batch of 64: the first 4 fill the queue, the rest overflow it.
    overload = {"max_queue": 4, "max_batch_size": 64, "max_wait_ms": 300.0}
    with serving_r1(tmp_path, serving_bundle, **overload) as (_, client):

        def timed_request(_: int) -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            response = client.post("/v1/recommendations", json={"items": ["i3"]})
            return response, time.perf_counter() - started

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(timed_request, range(16)))
        accepted = [seconds for response, seconds in results if response.status_code == 200]
        rejected = [(r, seconds) for r, seconds in results if r.status_code == 503]
        assert len(accepted) + len(rejected) == 16 and 1 <= len(accepted) <= 4 + 4
        assert len(rejected) >= 8
        for response, seconds in rejected:
            assert (
                response.json()["error"] == "overloaded" and response.headers["retry-after"] == "1"
            )
            assert seconds < 0.25  # refused at once, not after waiting in the queue
        assert metric(client, "fishrec_overload_rejections_total") == len(rejected)
        # Recovery: the queue drained, requests are served again.
        for _ in range(3):
            assert client.post("/v1/recommendations", json={"items": ["i3"]}).status_code == 200


def test_cli_server_drains_in_flight_requests_on_sigterm(
    tmp_path: Path, serving_bundle: Path
) -> None:
    publish(tmp_path, serving_bundle, "r1")
    env = {
        **os.environ,
        "FISHREC_API_KEY": "cli-key",
        "FISHREC_MAX_WAIT_MS": "1000",  # in-flight requests wait in the batcher when SIGTERM comes
        "FISHREC_INTRA_OP_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "merging.main",
        "serve",
        "--artifacts",
        str(tmp_path),
        "--port",
        "0",
    ]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = server_url(process)
        headers = {"X-API-Key": "cli-key"}
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, what="the CLI server")
        refused = httpx.post(f"{url}/v1/recommendations", json={"items": []})  # no key: 401

        def request(_: int) -> httpx.Response:
            return httpx.post(f"{url}/v1/recommendations", json={"items": ["i3"]}, headers=headers)

        with ThreadPoolExecutor(6) as pool, httpx.Client(base_url=url) as probe:
            pending = [pool.submit(request, i) for i in range(6)]
            queued = lambda: metric(probe, "fishrec_queue_depth") == 6  # noqa: E731
            wait_for(queued, what="six requests in the queue")
            process.send_signal(signal.SIGTERM)
            responses = [future.result(timeout=20) for future in pending]
        assert [r.status_code for r in responses] == [200] * 6
        # uvicorn re-raises the signal once shutdown is complete: killed by SIGTERM, after draining.
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
        logs = [
            json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")
        ]
        # Structured logs: by default only failed requests, each with the id sent back to the client.
        access = [
            entry
            for entry in logs
            if entry["logger"] == "fishrec.access" and entry["route"] == "/v1/recommendations"
        ]
        assert [(e["status"], e["request_id"]) for e in access] == [
            (401, refused.headers["x-request-id"])
        ]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def server_url(process: subprocess.Popen[Any]) -> str:
    """The address the server logs once it listens (it was started on port 0)."""
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        match = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        if match:
            return match.group(1)
        if not line and process.poll() is not None:
            break
    raise AssertionError(f"the server did not start ({process.poll()}):\n" + "".join(lines[-20:]))


def test_a_killed_model_process_is_replaced_and_no_request_fails(
    tmp_path: Path, serving_bundle: Path
) -> None:
    with serving_r1(tmp_path, serving_bundle) as (live, client):
        runner = live.app.state.manager.current.runner
        before = client.post("/v1/recommendations", json={"items": ["i3", "i5"]}).json()
        killed = runner.pid
        os.kill(killed, signal.SIGKILL)  # e.g. the kernel's OOM killer
        wait_for(lambda: runner.exited, what="the model process to be reaped")
        statuses = [
            client.post("/v1/recommendations", json={"items": ["i3", "i5"]}).status_code
            for _ in range(5)
        ]
        assert statuses == [200] * 5
        assert runner.pid != killed
        after = client.post("/v1/recommendations", json={"items": ["i3", "i5"]}).json()
        assert after == before


def test_the_model_on_a_thread_answers_like_the_model_process(
    tmp_path: Path, serving_bundle: Path
) -> None:
    histories = [["i3", "i5"], ["i7"], ["i1", "i2", "i9", "i4"], ["unknown"]]
    answers = []
    for model_process in (True, False):
        root = tmp_path / f"model-process-{model_process}"
        with serving_r1(root, serving_bundle, model_process=model_process) as (_, client):
            responses = [
                client.post("/v1/recommendations", json={"items": h, "k": 5}) for h in histories
            ]
            assert all(r.status_code == 200 for r in responses)
            answers.append([r.json() for r in responses])
    assert answers[0] == answers[1]


def test_admin_endpoints_are_closed_without_an_admin_key(
    tmp_path: Path, serving_bundle: Path
) -> None:
    """No FISHREC_ADMIN_KEY: /v1/admin/* answers 403 whatever key comes, clients keep working."""
    publish(tmp_path, serving_bundle, "r1")
    settings = server_settings(tmp_path, admin_key=None)
    with LiveServer(settings) as live, httpx.Client(base_url=live.url, headers=AUTH) as client:
        wait_for(lambda: ready_version(client) == "r1", what="r1")
        for headers in ({}, ADMIN):
            refused = client.post("/v1/admin/reload", headers=headers)
            assert refused.status_code == 403
            assert "FISHREC_ADMIN_KEY" in refused.json()["message"]
        assert client.post("/v1/recommendations", json={"items": ["i3"]}).status_code == 200
