"""onnxruntime in a child process, so that the event loop's Python never holds up the model.

In one process the event loop and the thread that runs onnxruntime share the
GIL: after every onnxruntime run the thread waits for the GIL while the loop is
busy parsing and answering requests, and the loop waits while the thread
prepares the next run. Under load the two took turns instead of working side by
side (about one of two cores busy). In a child process the model has a GIL of
its own, and the server's loop only writes a batch to a socket and reads the
answer when it is there.

The child (`python -m serving.model_process --fd N --spec JSON`) opens the
model, warms it up (a bundle that answers nonsense is refused before it
serves), says it is ready and then answers batches until its socket closes.
Frames are a kind byte, a payload length and the payload: JSON for ready and
errors, raw little-endian arrays for batches and answers (no pickle). The child
ignores SIGINT and SIGTERM: it lives exactly as long as its socket, so a
signal to the whole process group lets the server drain before the model goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import struct
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle import BundleError
from serving.runtime import NO_IDS, OnnxModel, Ranked, RankingModel, Row

log = logging.getLogger(__name__)

HEADER = struct.Struct("<cQ")  # kind, payload length
READY, ANSWER, ERROR, BATCH = b"R", b"A", b"E", b"B"
INT, FLOAT = np.dtype("<i8"), np.dtype("<f4")


class ModelProcessError(RuntimeError):
    """The model process failed a batch or exited; the batch's requests get the error."""


@dataclass(frozen=True)
class ModelSpec:
    """What the child needs to open and warm up a bundle's model."""

    path: str
    num_items: int
    intra_op_threads: int
    inter_op_threads: int
    max_history: int
    warm_batch: int
    warm_history: int
    # ANN retrieval (serving/retrieval.py): the bundle folder with retrieval/, else None
    retrieval_folder: str | None = None
    ann_shortlist: int = 100
    ann_ef_search: int = 128

    def open(self) -> RankingModel:
        model: RankingModel
        if self.retrieval_folder is not None:
            from serving.retrieval import RetrievalModel

            model = RetrievalModel(
                Path(self.retrieval_folder),
                self.num_items,
                self.intra_op_threads,
                self.inter_op_threads,
                self.max_history,
                self.ann_shortlist,
                self.ann_ef_search,
            )
        else:
            model = OnnxModel(
                Path(self.path),
                self.num_items,
                self.intra_op_threads,
                self.inter_op_threads,
                self.max_history,
            )
        model.warm_up(self.warm_batch, self.warm_history)
        return model


# ---- frames ---------------------------------------------------------------------------------


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def json_frame(kind: bytes, content: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(content).encode())


def encode_rows(rows: list[Row], blocked: np.ndarray) -> bytes:
    """All int64: [n, lengths.., ks.., exclude_seen.., exclude lengths.., candidate lengths..
    (-1: no candidates), blocked length], then every history, exclusion, candidate list and
    the blocked ids."""
    head = [len(rows)]
    head += [len(row.history) for row in rows]
    head += [row.k for row in rows]
    head += [int(row.exclude_seen) for row in rows]
    head += [len(row.exclude) for row in rows]
    head += [-1 if row.candidates is None else len(row.candidates) for row in rows]
    head += [len(blocked)]
    arrays = [np.asarray(row.history, dtype=INT) for row in rows]
    arrays += [np.asarray(row.exclude, dtype=INT) for row in rows if len(row.exclude)]
    arrays += [np.asarray(row.candidates, dtype=INT) for row in rows if row.candidates is not None]
    return np.concatenate([np.asarray(head, dtype=INT), *arrays, blocked.astype(INT)]).tobytes()


def decode_rows(payload: bytes) -> tuple[list[Row], np.ndarray]:
    values = np.frombuffer(payload, dtype=INT)
    n = int(values[0]) if len(values) else 0
    head = values[1 : 2 + 5 * n]
    if n < 1 or len(head) != 5 * n + 1:
        raise ValueError(f"malformed batch frame ({len(payload)} bytes)")
    lengths, ks, exclude_seen, excluded, candidates = (head[i * n : (i + 1) * n] for i in range(5))
    sizes = np.concatenate([lengths, excluded, candidates[candidates >= 0], head[-1:]])
    ids = values[2 + 5 * n :]
    if (sizes < 0).any() or int(sizes.sum()) != len(ids):
        raise ValueError(f"malformed batch frame ({len(payload)} bytes for {n} rows)")
    parts = iter(np.split(ids, np.cumsum(sizes)[:-1]))
    histories = [next(parts) for _ in range(n)]
    exclusions = [next(parts) for _ in range(n)]
    lists = [None if size < 0 else next(parts) for size in candidates]
    rows = [
        Row(history, int(k), bool(seen), exclude, cands)
        for history, k, seen, exclude, cands in zip(
            histories, ks, exclude_seen, exclusions, lists, strict=True
        )
    ]
    return rows, next(parts)


def encode_answers(answers: list[Ranked]) -> bytes:
    """[n, counts.., ids..] as int64, then every score as float32."""
    counts = [len(answer.ids) for answer in answers]
    ints = np.concatenate(
        [np.asarray([len(answers), *counts], dtype=INT), *(a.ids.astype(INT) for a in answers)]
    )
    floats = np.concatenate([np.zeros(0, FLOAT), *(a.scores.astype(FLOAT) for a in answers)])
    return ints.tobytes() + floats.tobytes()


def decode_answers(payload: bytes) -> list[Ranked]:
    n = int(np.frombuffer(payload, dtype=INT, count=1)[0])
    counts = np.frombuffer(payload, dtype=INT, count=n, offset=INT.itemsize)
    total = int(counts.sum())
    ids = np.frombuffer(payload, dtype=INT, count=total, offset=INT.itemsize * (1 + n))
    scores = np.frombuffer(payload, dtype=FLOAT, offset=INT.itemsize * (1 + n + total))
    if len(scores) != total:
        raise ModelProcessError(f"malformed answer frame ({len(payload)} bytes for {n} rows)")
    bounds = np.cumsum(counts)[:-1]
    return [
        Ranked(ids=i, scores=s)
        for i, s in zip(np.split(ids, bounds), np.split(scores, bounds), strict=True)
    ]


# ---- the parent's side ----------------------------------------------------------------------


class ModelProcess:
    """The server's handle on one child: `await run(rows)`; batches may be sent while one computes.

    The child answers batches in the order they were sent, so answers are matched
    to waiting batches first in, first out. When the child dies, every batch it
    holds fails with ModelProcessError and the next batch starts a new child.
    """

    def __init__(self, spec: ModelSpec, start_timeout_s: float = 120.0) -> None:
        self.spec = spec
        self.path = Path(spec.path)
        self.start_timeout_s = start_timeout_s
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._answers: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[tuple[bytes, bytes]]] = deque()
        self._restarting = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def exited(self) -> bool:
        return self._process is not None and self._process.returncode is not None

    @property
    def usable(self) -> bool:
        return self._answers is not None and not self._answers.done() and not self.exited

    async def start(self) -> None:
        """Start the child and wait until the model is warm; BundleError when it refuses."""
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "serving.model_process",
                "--fd",
                str(theirs.fileno()),
                "--spec",
                json.dumps(asdict(self.spec)),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_connection(sock=ours)
        try:
            kind, payload = await asyncio.wait_for(self._read(), self.start_timeout_s)
        except (TimeoutError, ModelProcessError) as err:
            await self.close()
            raise BundleError(f"{self.path}: the model process did not start ({err})") from err
        if kind != READY:
            await self.close()
            raise BundleError(json.loads(payload)["error"])
        self._answers = asyncio.get_running_loop().create_task(self._read_answers())
        log.info("model process %d serves %s", self._process.pid, self.path.name)

    async def run(self, rows: list[Row], blocked: np.ndarray = NO_IDS) -> list[Ranked]:
        if not self.usable:
            async with self._restarting:
                if not self.usable:  # a child that died between batches costs no request
                    await self._restart()
        assert self._writer is not None
        answer: asyncio.Future[tuple[bytes, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)  # no await since `usable`: the reader cannot miss it
        self._writer.write(frame(BATCH, encode_rows(rows, blocked)))
        kind, payload = await answer
        if kind == ERROR:
            raise ModelProcessError(json.loads(payload)["error"])
        return decode_answers(payload)

    async def _read_answers(self) -> None:
        """Hand each answer to the oldest waiting batch; fail them all when the child is gone."""
        try:
            while True:
                received = await self._read()
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_result(received)
        except (ModelProcessError, ConnectionError, IndexError) as err:
            failure = ModelProcessError(f"the model process failed: {err}")
            while self._waiting:
                waiting = self._waiting.popleft()
                if not waiting.done():
                    waiting.set_exception(failure)
            if self._writer is not None:
                self._writer.close()

    async def _restart(self) -> None:
        code = self._process.returncode if self._process else None
        log.error("model process gone (exit code %s); starting a new one", code)
        await self.close()
        try:
            await self.start()
        except BundleError as err:
            raise ModelProcessError(f"the model process cannot be restarted: {err}") from err

    async def _read(self) -> tuple[bytes, bytes]:
        assert self._reader is not None
        try:
            kind, size = HEADER.unpack(await self._reader.readexactly(HEADER.size))
            return kind, await self._reader.readexactly(size)
        except asyncio.IncompleteReadError as err:
            raise ModelProcessError("the model process exited") from err

    async def close(self) -> None:
        """Close the socket (the child exits on its end of it) and reap the child."""
        if self._writer is not None:
            self._writer.close()
        if self._process is not None and self._process.returncode is None:
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._answers is not None:
            await asyncio.gather(self._answers, return_exceptions=True)


class ModelThread:
    """The model on a worker thread of the server process (FISHREC_MODEL_PROCESS=false).

    Lighter (no second process, one copy of the model) but the model shares the
    server's GIL: fine at low load, about half the throughput under load.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.path = Path(spec.path)
        self._model: RankingModel | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")

    async def start(self) -> None:
        self._model = await asyncio.to_thread(self.spec.open)

    async def run(self, rows: list[Row], blocked: np.ndarray = NO_IDS) -> list[Ranked]:
        assert self._model is not None, "start() first"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._model.run, rows, blocked)

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True)


ModelRunner = ModelProcess | ModelThread


# ---- the child ------------------------------------------------------------------------------


def send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


def receive(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """One frame, or None when the server closed the socket."""
    header = receive_exactly(sock, HEADER.size)
    if header is None:
        return None
    kind, size = HEADER.unpack(header)
    payload = receive_exactly(sock, size)
    return None if payload is None else (kind, payload)


def receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = sock.recv(min(size - len(buffer), 1 << 20))
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer)


def serve(sock: socket.socket, spec: ModelSpec) -> int:
    try:
        model = spec.open()
    except Exception as err:  # a refusal the server reports; onnxruntime raises its own types
        message = str(err) if isinstance(err, BundleError) else f"{type(err).__name__}: {err}"
        send(sock, json_frame(ERROR, {"error": message}))
        return 1
    send(sock, json_frame(READY, {}))
    while (received := receive(sock)) is not None:
        _, payload = received
        try:
            answer = frame(ANSWER, encode_answers(model.run(*decode_rows(payload))))
        except Exception as err:  # the batch fails, the model keeps serving
            log.exception("batch failed")
            answer = json_frame(ERROR, {"error": f"{type(err).__name__}: {err}"})
        send(sock, answer)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fishrec's model process (started by the server)")
    parser.add_argument(
        "--fd", type=int, required=True, help="the socket inherited from the server"
    )
    parser.add_argument("--spec", required=True, help="ModelSpec as JSON")
    args = parser.parse_args(argv)
    # The server decides when the model stops: by closing the socket, after draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="model process: %(levelname)s %(message)s")
    with socket.socket(fileno=args.fd) as sock:
        return serve(sock, ModelSpec(**json.loads(args.spec)))


if __name__ == "__main__":
    sys.exit(main())
