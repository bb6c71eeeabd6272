"""Serving throughput and latency: fishrec vs its in-process limit, a naive torch endpoint, Ray Serve.

    python benchmarks/serve_load.py --data ../shared/data/ml-1m/ml-1m_5core_iclrec_format.txt \
        --duration 20 --concurrency 1,8,32,64 --out /tmp/serve_load.json

One model for everything: --checkpoint (a run or checkpoint folder trained on
--data), or, without it, a freshly initialised model of the given shape (the
cost of a forward pass does not depend on the weights). It is exported once
with merging.export.export_bundle; then, in the same run:

- in-process limit: OnnxModel.run without HTTP on batches of 1 and of the max batch size,
  with 1 and --threads threads; measured before the servers and again right after
  fishrec (this machine's speed drifts by up to 40% over minutes), the best
  configuration's mean is the limit;
- fishrec: `fishrec serve` (FastAPI + onnxruntime in its model process + micro-batching);
- fishrec-thread: the same with FISHREC_MODEL_PROCESS=false (onnxruntime on a thread of
  the server process, sharing its GIL): what the model process buys;
- torch: a naive FastAPI endpoint running the torch model eagerly, one request at a time;
- ray: Ray Serve (`ray[serve]`, the `bench` extra) with the same onnxruntime model,
  `@serve.batch` with the same batch size and wait, the same request handling.

Load comes from a separate process (an asyncio HTTP/1.1 keep-alive client):
closed loop at each concurrency for --duration seconds (after a 1 s warm-up),
then an open loop against fishrec at half its best throughput for the p99
target. Histories are real users' sequences (external ids), k = 10. Every
server and the client share this machine's cores, as they would a node's.
Prints the table, the ratios against the targets of the serving issue, and
writes everything to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle import load_bundle
from serving.cpus import usable_cpus
from serving.recommend import plan, popular, respond
from serving.runtime import NO_IDS, OnnxModel, Ranked, Row
from serving.schemas import RecommendationRequest, RecommendationResponse

log = logging.getLogger("serve_load")

SCRIPT = Path(__file__).resolve()
ROUTE = "/v1/recommendations"
WARMUP_S = 1.0
K = 10
TRANSPORT_ERROR = 599  # the status recorded when a connection fails (refused, reset)
LIMIT_SECONDS = 10.0  # per configuration of the in-process limit

# ---- the load generator (runs in its own process: --role client) ---------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection sending pre-encoded requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> int:
        """The status of one request; TRANSPORT_ERROR when the connection fails (then closed)."""
        try:
            return await self._request(raw)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            self.closed = True
            return TRANSPORT_ERROR

    async def _request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        if re.search(rb"(?i)\r\nconnection:\s*close", head):
            self.closed = True  # the server ends this connection after the response
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if length:
            await self.reader.readexactly(int(length.group(1)))
        elif re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    def close(self) -> None:
        self.writer.close()


def encode_requests(
    host: str, port: int, bodies: list[bytes], headers: dict[str, str], route: str = ROUTE
) -> list[bytes]:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return [
        (
            f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        ).encode()
        + body
        for body in bodies
    ]


def summarise(latencies: list[float], statuses: list[int], seconds: float) -> dict[str, Any]:
    ok = [lat for lat, status in zip(latencies, statuses, strict=True) if status == 200]
    ms = np.array(ok) * 1000 if ok else np.array([np.nan])
    failed = Counter(str(status) for status in statuses if status != 200)
    return {
        "requests": len(statuses),
        "errors": len(statuses) - len(ok),
        "errors_by_status": dict(failed),  # 599: the connection failed
        "rps": len(ok) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


async def closed_loop(
    host: str, port: int, raw: list[bytes], concurrency: int, duration: float
) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request as soon as the last is answered."""
    start = time.perf_counter()
    measure_from, end = start + WARMUP_S, start + WARMUP_S + duration
    latencies: list[float] = []
    statuses: list[int] = []

    async def client(i: int) -> None:
        connection = await Connection.open(host, port)
        j = i
        while (now := time.perf_counter()) < end:
            if connection.closed:
                connection.close()
                connection = await Connection.open(host, port)
            status = await connection.request(raw[j % len(raw)])
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)
                statuses.append(status)
            j += concurrency
        connection.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return summarise(latencies, statuses, time.perf_counter() - measure_from)


async def open_loop(
    host: str, port: int, raw: list[bytes], rate: float, duration: float
) -> dict[str, Any]:
    """Requests at a fixed rate; latency counts from the scheduled send time (no coordinated omission)."""
    idle: list[Connection] = []
    latencies: list[float] = []
    statuses: list[int] = []
    start = time.perf_counter() + 0.05
    total = int(rate * (WARMUP_S + duration))

    def reusable() -> Connection | None:
        # As HTTP client pools do: skip connections the server closed while they sat idle
        # (uvicorn ends keep-alive connections after 5 s without a request).
        while idle:
            connection = idle.pop()
            if not connection.reader.at_eof():
                return connection
            connection.close()
        return None

    async def one(i: int, scheduled: float) -> None:
        try:
            connection = reusable() or await Connection.open(host, port)
        except OSError:
            if scheduled >= start + WARMUP_S:
                latencies.append(time.perf_counter() - scheduled)
                statuses.append(TRANSPORT_ERROR)
            return
        status = await connection.request(raw[i % len(raw)])
        if scheduled >= start + WARMUP_S:
            latencies.append(time.perf_counter() - scheduled)
            statuses.append(status)
        if connection.closed:
            connection.close()
        else:
            idle.append(connection)

    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    for connection in idle:
        connection.close()
    return {**summarise(latencies, statuses, duration), "target_rps": rate}


def run_client(spec: dict[str, Any]) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    bodies = [line.encode() for line in Path(spec["payloads"]).read_text().splitlines()]
    headers = spec.get("headers", {})
    raw = encode_requests(spec["host"], spec["port"], bodies, headers, spec.get("route", ROUTE))
    if spec.get("rate"):
        coroutine = open_loop(spec["host"], spec["port"], raw, spec["rate"], spec["duration"])
    else:
        coroutine = closed_loop(
            spec["host"], spec["port"], raw, spec["concurrency"], spec["duration"]
        )
    print(json.dumps(asyncio.run(coroutine)))


# ---- the naive torch endpoint (--role torch) ---------------------------------------------------


def run_torch_server(spec: dict[str, Any]) -> None:
    """FastAPI + torch eager, one request at a time: what a first prototype looks like."""
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI

    from training.run_folder import load_run_checkpoint

    torch.set_num_threads(spec["threads"])
    bundle = load_bundle(Path(spec["bundle"]))
    model = load_run_checkpoint(Path(spec["checkpoint"])).model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.post(ROUTE, response_model=RecommendationResponse)
    def recommend(body: RecommendationRequest) -> dict[str, Any]:
        p = plan(body, bundle)
        if p.row is None:
            return respond(bundle, popular(bundle, body.k, p, NO_IDS), p)
        with lock, torch.no_grad():
            logits = model.logits(torch.from_numpy(p.row.history)[None])[0]  # (N,)
            if body.exclude_seen:
                logits[torch.from_numpy(p.row.history) - 1] = float("-inf")
            scores, columns = torch.topk(logits, body.k)
        ranked = Ranked(ids=(columns + 1).numpy(), scores=scores.numpy())
        return respond(bundle, ranked, p)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=spec["port"], log_level="warning", access_log=False)


# ---- Ray Serve with the same onnxruntime model (--role ray) -------------------------------------


def run_ray_server(spec: dict[str, Any]) -> None:
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})

    @serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    class Recommender:
        def __init__(self, folder: str, threads: int) -> None:
            self.bundle = load_bundle(Path(folder))
            self.model = OnnxModel(
                self.bundle.model_file(False),
                self.bundle.num_items,
                threads,
                1,
                self.bundle.max_history,
            )

        @serve.batch(
            max_batch_size=spec["max_batch_size"], batch_wait_timeout_s=spec["max_wait_ms"] / 1000
        )
        async def rank(self, rows: list[Any]) -> list[Any]:
            return self.model.run(rows)

        async def __call__(self, request: Any) -> dict[str, Any]:
            body = RecommendationRequest.model_validate_json(await request.body())
            p = plan(body, self.bundle)
            fallback = popular(self.bundle, body.k, p, NO_IDS) if p.row is None else None
            ranked = fallback or await self.rank(p.row)
            return respond(self.bundle, ranked, p)

    serve.run(Recommender.bind(spec["bundle"], spec["threads"]), route_prefix=ROUTE, name="fishrec")

    def stop(*_: object) -> None:
        serve.shutdown()
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(3600)


# ---- orchestration -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_bundle(args: argparse.Namespace, work: Path) -> tuple[Any, Path, Path]:
    """(data, checkpoint, artifact root): the model exported as runs/bench/ + LATEST."""
    from merging.export import export_bundle
    from training.checkpoint import write_checkpoint
    from training.config import DataSpec
    from training.model import ModelConfig, build_model
    from training.sources import load_source

    data = load_source(DataSpec(path=args.data))
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:
        config = ModelConfig(
            num_items=data.num_items,
            backbone=args.backbone,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            max_len=args.max_len,
        )
        checkpoint = work / "checkpoint"
        write_checkpoint(
            checkpoint, build_model(config, seed=0), config, {"data_fingerprint": data.fingerprint}
        )
    root = work / "artifacts"
    export_bundle(checkpoint, root / "runs" / "bench", data, parity_sequences=64)
    (root / "LATEST").write_text("bench\n")
    return data, checkpoint, root


def write_payloads(data: Any, max_history: int, path: Path, count: int = 2000) -> list[list[str]]:
    """Request bodies from real sequences: the newest items of random users, k = 10."""
    rng = np.random.default_rng(0)
    users = rng.choice(data.num_users, size=min(count, data.num_users), replace=False)
    histories = [
        [data.vocab.external(int(i)) for i in data.sequences[u][-max_history:]] for u in users
    ]
    path.write_text("\n".join(json.dumps({"items": h, "k": K}) for h in histories) + "\n")
    return histories


def in_process_limit(
    bundle_folder: Path, histories: list[list[str]], args: argparse.Namespace
) -> dict[str, float]:
    """Rows/s of OnnxModel.run without HTTP, per thread count and batch size (1 and full)."""
    bundle = load_bundle(bundle_folder)
    rows = [Row(np.asarray(bundle.vocab.encode(h)[0], dtype=np.int64), K, True) for h in histories]
    seconds = min(args.duration, LIMIT_SECONDS)
    result = {}
    for threads in sorted({1, args.threads}):
        model = OnnxModel(
            bundle.model_file(False), bundle.num_items, threads, 1, bundle.max_history
        )
        for batch_size in (1, args.max_batch_size):
            batches = [
                rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)
            ]
            done, started, i = 0, time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                model.run(batches[i % len(batches)])
                done += batch_size
                i += 1
            rate = done / (time.perf_counter() - started)
            result[f"threads_{threads}_batch_{batch_size}_rows_per_s"] = rate
    return result


def best_limit(in_process: dict[str, dict[str, float]]) -> float:
    """The best configuration, its rows/s averaged over the measurements before and after fishrec."""
    runs = list(in_process.values())
    return max(float(np.mean([run[key] for run in runs])) for key in runs[0])


class Server:
    """A server process under test, started in its own process group and stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str]) -> None:
        self.name, self.port = name, port
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )

    def wait_ready(self, body: bytes, headers: dict[str, str], timeout: float = 180) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.output()}")
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.port}{ROUTE}",
                data=body,
                headers={"Content-Type": "application/json", **headers},
            )
            with (
                contextlib.suppress(OSError, urllib.error.HTTPError),
                urllib.request.urlopen(request, timeout=5) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def load(
    port: int, payloads: Path, duration: float, headers: dict[str, str], **mode: Any
) -> dict[str, Any]:
    """One load run from a separate client process."""
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "payloads": str(payloads),
        "duration": duration,
        "headers": headers,
        **mode,
    }
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--role", "client", "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=duration + 120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"load client failed ({mode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def serve_command(artifacts: Path, port: int, log_level: str = "INFO") -> list[str]:
    """`fishrec serve` on an artifact root, as a child process of this interpreter."""
    command = [sys.executable, "-m", "merging.main", "--log-level", log_level, "serve"]
    return [*command, "--artifacts", str(artifacts), "--port", str(port)]


def start_server(name: str, args: argparse.Namespace, root: Path, checkpoint: Path) -> Server:
    port = free_port()
    bundle = str(root / "runs" / "bench")
    common = {"port": port, "threads": args.threads, "bundle": bundle}
    # fishrec's own thread rule (its CPU budget less a core for the event loop) unless --threads.
    threads = (
        {"FISHREC_INTRA_OP_THREADS": str(args.fishrec_threads)} if args.fishrec_threads else {}
    )
    if name.startswith("fishrec"):
        command = serve_command(root, port, args.server_log_level)
        env = {
            "FISHREC_MAX_BATCH_SIZE": str(args.max_batch_size),
            "FISHREC_MAX_WAIT_MS": str(args.max_wait_ms),
            "FISHREC_MAX_QUEUE": "4096",
            "FISHREC_RELOAD_INTERVAL_S": "0",
            "FISHREC_API_KEY": "bench",
            "FISHREC_MODEL_PROCESS": str(name == "fishrec").lower(),
            **threads,
        }
        return Server(name, command, port, env)
    spec = {
        **common,
        "checkpoint": str(checkpoint),
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
    }
    command = [sys.executable, str(SCRIPT), "--role", name, "--spec", json.dumps(spec)]
    return Server(name, command, port, {})


def measure_system(
    name: str, args: argparse.Namespace, root: Path, checkpoint: Path, payloads: Path
) -> dict[str, Any]:
    headers = {"X-API-Key": "bench"} if name.startswith("fishrec") else {}
    server = start_server(name, args, root, checkpoint)
    try:
        server.wait_ready(payloads.read_text().splitlines()[0].encode(), headers)
        levels = {}
        for concurrency in args.concurrency:
            result = load(server.port, payloads, args.duration, headers, concurrency=concurrency)
            levels[str(concurrency)] = result
            log.info("%s c=%d: %s", name, concurrency, fmt(result))
        out: dict[str, Any] = {"closed_loop": levels}
        if name == "fishrec":
            best = max(level["rps"] for level in levels.values())
            half = load(server.port, payloads, args.duration, headers, rate=best / 2)
            log.info("fishrec at half the best throughput (%.0f/s): %s", best / 2, fmt(half))
            out["half_load"] = half
            out["rules"] = measure_rules(server.port, payloads, args.duration, headers)
        return out
    finally:
        server.stop()


RULES_CONCURRENCY = 32


def rule_payloads(payloads: Path) -> dict[str, tuple[str, Path]]:
    """The same histories with 20 excluded ids, with 500 candidates; and similar-items bodies."""
    rng = np.random.default_rng(1)
    bodies = [json.loads(line) for line in payloads.read_text().splitlines()]
    catalogue = sorted({item for body in bodies for item in body["items"]})
    variants: dict[str, list[dict[str, Any]]] = {
        "exclude_items 20": [
            {**b, "exclude_items": rng.choice(catalogue, 20).tolist()} for b in bodies
        ],
        "candidates 500": [
            {**b, "candidates": rng.choice(catalogue, 500, replace=False).tolist()} for b in bodies
        ],
        "similar items": [{"item_id": b["items"][-1], "k": K} for b in bodies if b["items"]],
    }
    out = {}
    for label, entries in variants.items():
        path = payloads.with_name(label.replace(" ", "-") + ".jsonl")
        path.write_text("\n".join(json.dumps(entry) for entry in entries) + "\n")
        route = "/v1/similar-items" if label == "similar items" else ROUTE
        out[label] = (route, path)
    return out


def measure_rules(
    port: int, payloads: Path, duration: float, headers: dict[str, str]
) -> dict[str, Any]:
    """fishrec at c=32 with per-request rules and on /v1/similar-items, beside the plain route."""
    results = {}
    for label, (route, path) in rule_payloads(payloads).items():
        result = load(port, path, duration, headers, concurrency=RULES_CONCURRENCY, route=route)
        log.info("fishrec c=%d, %s: %s", RULES_CONCURRENCY, label, fmt(result))
        results[label] = result
    return results


def fmt_limit(limit: dict[str, float]) -> str:
    return ", ".join(f"{key.removesuffix('_rows_per_s')} {rate:.0f}" for key, rate in limit.items())


def fmt(result: dict[str, Any]) -> str:
    return (
        f"{result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.2f}  p95 {result['p95_ms']:6.2f}  "
        f"p99 {result['p99_ms']:6.2f} ms  errors {result['errors']}"
    )


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    for when, limit in results["in_process"].items():
        print(f"\nin-process onnxruntime limit, {when}: {fmt_limit(limit)}")
    print(
        f"\n{'system':14s} {'c':>4s} {'req/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'errors':>7s}"
    )
    for name, system in results["systems"].items():
        for concurrency, r in system["closed_loop"].items():
            print(
                f"{name:14s} {concurrency:>4s} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['p99_ms']:8.2f} {r['errors']:7d}"
            )
    systems, at = results["systems"], str(32 if 32 in args.concurrency else max(args.concurrency))
    if "fishrec" not in systems:
        return
    ours = systems["fishrec"]["closed_loop"][at]["rps"]
    limit = best_limit(results["in_process"])
    print(f"\nthe limit (best configuration, mean of the measurements): {limit:.0f} rows/s")
    ratios = {"fishrec / in-process limit": (ours / limit, 0.5)}
    if "torch" in systems:
        ratios["fishrec / naive torch"] = (ours / systems["torch"]["closed_loop"][at]["rps"], 3.0)
    if "ray" in systems:
        ratios["fishrec / Ray Serve"] = (ours / systems["ray"]["closed_loop"][at]["rps"], 2.0)
    if "fishrec-thread" in systems:
        thread = systems["fishrec-thread"]["closed_loop"][at]["rps"]
        print(f"\nmodel on a thread instead of its process: {thread / limit:.2f} of the limit")
    print(f"\nrequests/s ratios at concurrency {at} (target):")
    for label, (value, target) in ratios.items():
        print(
            f"  {label:28s} {value:6.2f}  (>= {target}: {'met' if value >= target else 'NOT met'})"
        )
    rules = systems["fishrec"].get("rules", {})
    plain = systems["fishrec"]["closed_loop"].get(str(RULES_CONCURRENCY), {}).get("rps")
    if rules and plain:
        print(f"\nfishrec at c={RULES_CONCURRENCY}, against the plain route ({plain:.0f} req/s):")
        for label, result in rules.items():
            print(
                f"  {label:18s} {result['rps']:8.0f} req/s  {result['rps'] / plain:5.2f}x  "
                f"p99 {result['p99_ms']:.2f} ms  errors {result['errors']}"
            )
    half = systems["fishrec"]["half_load"]
    verdict = "met" if half["p99_ms"] < 25 else "NOT met"
    print(
        f"  p99 at half the best throughput ({half['target_rps']:.0f} req/s): {half['p99_ms']:.2f} ms (< 25 ms: {verdict})"
    )
    results["ratios"] = {label: value for label, (value, _) in ratios.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="synthetic", help="'synthetic', a prepared data folder or a raw log file"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="run or checkpoint folder trained on --data (default: a fresh model)",
    )
    parser.add_argument(
        "--backbone", choices=["bert4rec", "sasrec"], default="sasrec", help="fresh model: backbone"
    )
    parser.add_argument("--hidden", type=int, default=64, help="fresh model: hidden size")
    parser.add_argument("--layers", type=int, default=2, help="fresh model: layers")
    parser.add_argument("--heads", type=int, default=2, help="fresh model: attention heads")
    parser.add_argument("--max-len", type=int, default=50, help="fresh model: longest input")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per level")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(c) for c in s.split(",")],
        default=[1, 8, 32, 64],
        help="comma-separated client counts",
    )
    parser.add_argument(
        "--systems",
        type=lambda s: s.split(","),
        default=["fishrec", "fishrec-thread", "torch", "ray"],
        help="comma-separated: fishrec, fishrec-thread, torch, ray",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime/torch threads of every system (default: the CPU quota; fishrec: "
        "its own rule, the quota less a core for the event loop; the in-process limit tries "
        "1 and the quota)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=64, help="micro-batch size (fishrec and Ray Serve)"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="micro-batch wait (fishrec and Ray Serve)"
    )
    parser.add_argument(
        "--server-log-level", default="INFO", help="fishrec's log level (INFO logs every request)"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--role", choices=["client", "torch", "ray"], default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.role is not None:
        {"client": run_client, "torch": run_torch_server, "ray": run_ray_server}[args.role](
            json.loads(args.spec)
        )
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.fishrec_threads = args.threads
    args.threads = args.threads or usable_cpus()
    with tempfile.TemporaryDirectory(prefix="fishrec-serve-load-") as folder:
        work = Path(folder)
        data, checkpoint, root = prepare_bundle(args, work)
        max_history = json.loads((root / "runs" / "bench" / "manifest.json").read_text())[
            "max_history"
        ]
        histories = write_payloads(data, max_history, work / "payloads.jsonl")
        results: dict[str, Any] = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("role", "spec")},
            "in_process": {},
            "systems": {},
        }

        def measure_limit(when: str) -> None:
            limit = in_process_limit(root / "runs" / "bench", histories, args)
            results["in_process"][when] = limit
            log.info("in-process limit (%s): %s", when, fmt_limit(limit))

        measure_limit("before")
        for name in args.systems:
            results["systems"][name] = measure_system(
                name, args, root, checkpoint, work / "payloads.jsonl"
            )
            if name == "fishrec":
                measure_limit("after fishrec")
    report(results, args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
