"""Helpers for the serving tests: publish bundles into an artifact root, run a real server."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import onnx
import uvicorn
from onnx import TensorProto, helper

from serving.server import server_config
from serving.settings import Settings

API_KEY = "test-key"
AUTH = {"X-API-Key": API_KEY}
ADMIN_KEY = "test-admin-key"
ADMIN = {"X-Admin-Key": ADMIN_KEY}


def server_settings(root: Path, **overrides: Any) -> Settings:
    """Settings for a test server: any free loopback port, fast polling, an API key."""
    values: dict[str, Any] = {
        "artifacts": root,
        "host": "127.0.0.1",
        "port": 0,
        "api_key": API_KEY,
        "admin_key": ADMIN_KEY,
        "reload_interval_s": 0.1,
        "max_k": 1000,
        "max_body_bytes": 64 * 1024,
        "intra_op_threads": 1,
        "log_json": False,
        "shutdown_timeout_s": 10,
    }
    values.update(overrides)
    return Settings(**values)


def publish(root: Path, source: Path, run_id: str, latest: bool = True) -> Path:
    """Copy the bundle `source` to root/runs/<run_id>/ (complete or absent), then point LATEST at it.

    The manifest's run_id is rewritten; manifest.json is not among the checksummed files.
    """
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    staging = runs / f".{run_id}.staging"
    shutil.copytree(source, staging)
    manifest = json.loads((staging / "manifest.json").read_text())
    manifest["run_id"] = run_id
    (staging / "manifest.json").write_text(json.dumps(manifest))
    os.replace(staging, runs / run_id)
    if latest:
        point_latest(root, run_id)
    return runs / run_id


def point_latest(root: Path, run_id: str) -> None:
    (root / "LATEST.tmp").write_text(run_id + "\n")
    os.replace(root / "LATEST.tmp", root / "LATEST")


def corrupt(folder: Path, name: str = "model.onnx") -> None:
    """Flip one byte in the middle of a bundle file (its sha256 no longer matches)."""
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / name).write_bytes(bytes(data))


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class LiveServer:
    """The real app under uvicorn on a loopback port, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = uvicorn.Server(server_config(settings, log_level="WARNING"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def app(self) -> Any:
        return self.server.config.app

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started, what="the server to start")
        (sock,) = self.server.servers[0].sockets
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def write_foreign_model(path: Path) -> Path:
    """A valid ONNX graph that is not the bundle contract: one float input, no top-k outputs."""
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


@contextlib.contextmanager
def ready_server(
    settings: Settings, ready: Callable[[httpx.Client], bool] | None = None
) -> Iterator[LiveServer]:
    """A LiveServer that has answered `ready` (default: /readyz 200) before it is used."""
    check = ready or (lambda client: client.get("/readyz").status_code == 200)
    with LiveServer(settings) as live:
        with httpx.Client(base_url=live.url, headers=AUTH) as client:
            wait_for(lambda: check(client), what="readiness")
        yield live


def ready_version(client: httpx.Client) -> str | None:
    response = client.get("/readyz")
    return response.json()["model_version"] if response.status_code == 200 else None


def metric(client: httpx.Client, name: str) -> float:
    """The value of one sample line of /metrics (0 when absent)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
