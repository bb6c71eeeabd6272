"""Model lifecycle: load, verify, warm up and swap bundles; watch LATEST in the background.

The serving model is one reference (`ModelManager.current`), replaced in a
single assignment on the event loop once the candidate is verified and warm.
A request takes the reference once and finishes on that model even when a swap
happens meanwhile: the old model's batcher answers everything it queued before
it stops. A bundle that fails any check is refused and the current model keeps
serving; the failure is logged and counted.

The watcher is edge-triggered: it loads a bundle when LATEST changes (or while
no model is loaded), so a rollback through POST /v1/admin/reload with an older
run id is not undone by the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from serving.availability import FILE as AVAILABILITY_FILE
from serving.availability import Availability
from serving.batcher import MicroBatcher
from serving.bundle import (
    RETRIEVAL_DIR,
    USER_ENCODER,
    Bundle,
    BundleError,
    bundle_folder,
    load_bundle,
    read_latest,
)
from serving.cpus import cpu_quota, serving_threads
from serving.metrics import Metrics
from serving.mirror import BundleMirror
from serving.model_process import ModelProcess, ModelRunner, ModelSpec, ModelThread
from serving.runtime import NO_IDS, Ranked, Row
from serving.settings import Settings

log = logging.getLogger(__name__)


class ReloadError(Exception):
    """A requested reload that could not happen; the current model keeps serving."""


@dataclass
class ServingModel:
    """A verified, warm bundle with its own batcher."""

    bundle: Bundle
    runner: ModelRunner
    batcher: MicroBatcher[Row, Ranked]
    availability: Availability | None = None
    answered: Any = None  # fishrec_answers_total{version=<this run id>}, looked up once
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def version(self) -> str:
        return self.bundle.run_id

    def blocked(self) -> np.ndarray:
        """Internal ids of the unavailable items (none for a bundle without filter inputs)."""
        if self.availability is None or not self.bundle.supports_filters:
            return NO_IDS
        return self.availability.blocked_ids(self.bundle)

    async def run(self, rows: list[Row]) -> list[Ranked]:
        """One batch on the model, with the availability list as it is now."""
        return await self.runner.run(rows, self.blocked())


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.threads = settings.intra_op_threads or serving_threads(settings.cpus or cpu_quota())
        self.current: ServingModel | None = None
        self.canary: ServingModel | None = None  # FISHREC_CANARY_BUNDLE, once it loaded
        self.last_error: str | None = None
        self.stopping = False
        self._lock = asyncio.Lock()
        # FISHREC_SOURCE: `artifacts` is a local cache of a remote root (serving/mirror.py).
        self.mirror = BundleMirror(settings.source, settings.artifacts) if settings.source else None
        self.root = settings.source or str(settings.artifacts)  # where LATEST is read
        self._seen_latest: str | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.availability = Availability(
            settings.availability_file or settings.artifacts / AVAILABILITY_FILE, metrics
        )

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Load the first bundle and then watch LATEST, in the background."""
        log.info(
            "onnxruntime threads: intra-op %d, inter-op %d",
            self.threads,
            self.settings.inter_op_threads,
        )
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="watcher")

    async def stop(self) -> None:
        """Stop watching, then let the serving model answer what it has queued."""
        self.stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        async with self._lock:
            for model in (self.current, self.canary):
                if model is not None:
                    await model.batcher.close()
                    await model.runner.close()

    async def _watch(self) -> None:
        interval = self.settings.reload_interval_s
        while True:
            await self.poll()
            if interval <= 0:
                return
            await asyncio.sleep(interval)

    # ---- loading -----------------------------------------------------------------------

    def wanted(self) -> str | None:
        """The run id to serve: the pinned one, else the one LATEST names."""
        if self.settings.bundle is not None:
            return self.settings.bundle
        if self.mirror is not None:
            return self.mirror.latest()
        return read_latest(self.settings.artifacts)

    async def poll(self) -> None:
        """One look at LATEST and the availability file: load what changed; never raises."""
        await asyncio.to_thread(self.availability.poll)
        await self.poll_canary()
        try:
            wanted = self.wanted()
        except BundleError as err:
            self._failed(None, err)
            return
        if wanted is None:
            if self.current is None:
                self.last_error = f"no bundle published under {self.root} (no LATEST)"
            return
        if wanted == self._seen_latest and self.current is not None:
            return
        self._seen_latest = wanted
        # A refusal is logged and counted in load; the current model keeps serving.
        with contextlib.suppress(BundleError):
            await self.load(wanted)

    async def poll_canary(self) -> None:
        """Load FISHREC_CANARY_BUNDLE until it is serving (a refusal is retried next poll)."""
        wanted = self.settings.canary_bundle
        if wanted is None or self.canary is not None or self.stopping:
            return
        async with self._lock:
            try:
                bundle = await asyncio.to_thread(self._verified, wanted)
                runner = await self._started(bundle)
            except Exception as err:  # logged and counted; the main model is unaffected
                self._failed(wanted, err, canary=True)
                return
            self.canary = self._serving(bundle, runner)
        log.info(
            "canary bundle %s answers %.1f%% of requests",
            wanted,
            100 * self.settings.canary_share,
            extra={"model_version": wanted},
        )

    def route(self, user: str | None) -> ServingModel | None:
        """The model that answers a caller: the canary for its share (sticky per user)."""
        if self.canary is None or self.current is None:
            return self.current
        share = self.settings.canary_share
        if user is None:
            point = random.random()
        else:  # the same user always lands on the same side
            digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64
        return self.canary if point < share else self.current

    async def reload(self, run_id: str | None) -> tuple[bool, str | None]:
        """POST /v1/admin/reload: (changed, previous version); ReloadError when refused."""
        await asyncio.to_thread(self.availability.poll)
        target = run_id
        if target is None:
            try:
                target = self.wanted()
            except BundleError as err:
                raise ReloadError(str(err)) from err
            if target is None:
                raise ReloadError(f"nothing to load: no LATEST under {self.root}")
        previous = self.current.version if self.current is not None else None
        try:
            changed = await self.load(target)
        except BundleError as err:
            raise ReloadError(f"bundle {target!r} refused: {err}") from err
        return changed, previous

    async def load(self, run_id: str) -> bool:
        """Load, verify and warm `run_id`, then swap it in; False when it is already serving."""
        async with self._lock:
            if self.stopping:
                raise BundleError("the service is shutting down")
            if self.current is not None and self.current.version == run_id:
                return False
            try:
                bundle = await asyncio.to_thread(self._verified, run_id)
                runner = await self._started(bundle)
            except BundleError as err:
                self._failed(run_id, err)
                raise
            except Exception as err:  # anything unexpected in a bundle is a refusal, not a crash
                self._failed(run_id, err)
                raise BundleError(f"{type(err).__name__}: {err}") from err
            await self._swap(bundle, runner)
            return True

    def _verified(self, run_id: str) -> Bundle:
        """The bundle read and checked against its manifest (off the event loop)."""
        try:
            if self.mirror is not None:
                folder = self.mirror.fetch(run_id)
            else:
                folder = bundle_folder(self.settings.artifacts, run_id)
        except ValueError as err:
            raise BundleError(str(err)) from err
        bundle = load_bundle(folder)
        if bundle.run_id != run_id:
            raise BundleError(
                f"{folder}: manifest run_id is {bundle.run_id!r}, expected {run_id!r}"
            )
        return bundle

    async def _started(self, bundle: Bundle) -> ModelRunner:
        """The bundle's model opened and warmed up (a bundle answering nonsense is refused)."""
        settings = self.settings
        retrieval = bundle.has_retrieval and settings.retrieval == "auto"
        spec = ModelSpec(
            # The file that answers (GET /v1/model names it): the user encoder with retrieval.
            path=str(
                bundle.folder / RETRIEVAL_DIR / USER_ENCODER
                if retrieval
                else bundle.model_file(settings.quantized)
            ),
            num_items=bundle.num_items,
            intra_op_threads=self.threads,
            inter_op_threads=settings.inter_op_threads,
            max_history=bundle.max_history,
            warm_batch=settings.max_batch_size,
            warm_history=min(bundle.max_history, settings.max_history),
            retrieval_folder=str(bundle.folder) if retrieval else None,
            ann_shortlist=settings.ann_shortlist,
            ann_ef_search=settings.ann_ef_search,
        )
        runner = ModelProcess(spec) if settings.model_process else ModelThread(spec)
        await runner.start()
        return runner

    def _serving(self, bundle: Bundle, runner: ModelRunner) -> ServingModel:
        """A started runner with its own batcher."""
        settings = self.settings
        answered = self.metrics.answers.labels(bundle.run_id)
        serving = ServingModel(bundle, runner, None, self.availability, answered)  # type: ignore[arg-type]
        if not bundle.supports_filters and self.availability.items:
            log.warning(
                "bundle %s has no filter inputs: the %d unavailable items cannot be held back",
                bundle.run_id,
                len(self.availability.items),
            )
        batcher: MicroBatcher[Row, Ranked] = MicroBatcher(
            serving.run,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue,
            observer=self.metrics.observer(),
            name=f"batcher-{bundle.run_id}",
            max_in_flight=settings.batches_in_flight,
        )
        batcher.start()
        serving.batcher = batcher
        return serving

    async def _swap(self, bundle: Bundle, runner: ModelRunner) -> None:
        serving = self._serving(bundle, runner)
        previous = self.current
        self.current = serving
        self.last_error = None
        self.metrics.reloads.labels("success").inc()
        self.metrics.set_model(
            bundle.run_id,
            previous.version if previous else None,
            bundle.manifest.get("created"),
        )
        log.info(
            "serving bundle %s (%s)",
            bundle.run_id,
            runner.path.name,
            extra={"model_version": bundle.run_id},
        )
        if self.mirror is not None:  # the serving run and the one before it stay cached
            keep = {bundle.run_id} | ({previous.version} if previous else set())
            if self.canary is not None:
                keep.add(self.canary.version)
            await asyncio.to_thread(self.mirror.prune, keep)
        if previous is not None:
            await previous.batcher.close()  # in-flight rows of the old model finish on it
            await previous.runner.close()

    def _failed(self, run_id: str | None, err: Exception, canary: bool = False) -> None:
        self.metrics.reloads.labels("failure").inc()
        serving = self.current.version if self.current is not None else None
        if not canary:
            self.last_error = f"bundle {run_id!r} refused: {err}"
        log.error(
            "bundle %s refused (%s); %s",
            run_id,
            err,
            f"still serving {serving}" if serving else "no model is serving",
            extra={"model_version": serving},
        )
