"""Micro-batching: concurrent requests share one onnxruntime run.

Rows wait in a bounded queue. A worker task takes the oldest row, lets others
join until the batch is full or the oldest row has waited `max_wait_s`, and
awaits `run(batch)` (the model process or a thread: the event loop keeps
accepting requests meanwhile). Rows that arrive during a run are
already past their wait when it ends, so under load batches form without any
added delay. A full queue is refused at once (`QueueFull`, answered with 503 and
Retry-After) instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class QueueFull(Exception):
    """The queue has no room for the rows of this request."""


class BatcherClosed(Exception):
    """The batcher is shutting down and accepts no new rows."""


@dataclass
class BatchObserver:
    """Callbacks for metrics: batch sizes, run times and queue depth."""

    batch: Callable[[int, float], None] = lambda size, seconds: None
    queue_depth: Callable[[int], None] = lambda depth: None


@dataclass
class _Pending(Generic[In, Out]):
    row: In
    future: asyncio.Future[Out]
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[In, Out]):
    """Coalesce rows submitted from the event loop into calls of `await run(rows) -> answers`.

    Up to `max_in_flight` runs at once. The model process answers batches in
    turn; a second batch sent while the first computes saves the model the
    round trip through the busy event loop between two batches.
    """

    def __init__(
        self,
        run: Callable[[list[In]], Awaitable[Sequence[Out]]],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        observer: BatchObserver | None = None,
        name: str = "batcher",
        max_in_flight: int = 1,
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.observer = observer or BatchObserver()
        self.name = name
        self._pending: deque[_Pending[In, Out]] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name=self.name)

    async def submit(self, rows: Sequence[In]) -> list[Out]:
        """Answers for `rows`, in order; all rows are queued or none (QueueFull)."""
        if self._closing:
            raise BatcherClosed(f"{self.name} is shutting down")
        if len(self._pending) + len(rows) > self.max_queue:
            raise QueueFull(
                f"{len(self._pending)} histories are waiting (limit {self.max_queue}); "
                f"this request adds {len(rows)}"
            )
        loop = asyncio.get_running_loop()
        futures = []
        for row in rows:
            pending = _Pending(row, loop.create_future())
            self._pending.append(pending)
            futures.append(pending.future)
        self.observer.queue_depth(len(self._pending))
        self._wakeup.set()
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        """Stop accepting rows, answer every queued row, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        await asyncio.gather(*self._in_flight)

    async def _work(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather()
            await self._slots.acquire()  # rows keep joining the batch while every slot is busy
            batch = self._take()
            self.observer.queue_depth(len(self._pending))
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._answer(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _answer(self, batch: list[_Pending[In, Out]]) -> None:
        started = time.perf_counter()
        try:
            answers = await self._run([p.row for p in batch])
        except Exception as err:  # the batch's requests get the error, the worker goes on
            log.exception("%s: batch of %d failed", self.name, len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(err)
            return
        finally:
            self._slots.release()
        self.observer.batch(len(batch), time.perf_counter() - started)
        for pending, answer in zip(batch, answers, strict=True):
            if not pending.future.done():
                pending.future.set_result(answer)

    async def _gather(self) -> None:
        """Wait until the batch is full or the oldest row has waited max_wait_s."""
        deadline = self._pending[0].enqueued + self.max_wait_s
        while len(self._pending) < self.max_batch_size and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending[In, Out]]:
        """Up to max_batch_size queued rows whose requests are still waiting."""
        batch: list[_Pending[In, Out]] = []
        while self._pending and len(batch) < self.max_batch_size:
            pending = self._pending.popleft()
            if not pending.future.done():  # a cancelled request (client gone) is skipped
                batch.append(pending)
        return batch
