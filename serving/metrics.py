"""Prometheus metrics of the service, in a registry of its own (one per app instance)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from serving.batcher import BatchObserver

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        labels = ["route", "method", "status"]
        self.requests = Counter(
            "fishrec_http_requests",
            "HTTP requests by route template, method and status",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "fishrec_http_request_duration_seconds",
            "HTTP request latency by route template, method and status",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fishrec_batch_size",
            "histories per onnxruntime run",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_duration = Histogram(
            "fishrec_batch_duration_seconds",
            "time of one batched onnxruntime run",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "fishrec_queue_depth", "histories waiting for a batch", registry=self.registry
        )
        self.rejected = Counter(
            "fishrec_overload_rejections",
            "requests answered 503 because the queue was full",
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "fishrec_fallbacks",
            "histories answered with the popularity fallback",
            registry=self.registry,
        )
        self.unknown_items = Counter(
            "fishrec_unknown_items",
            "request item ids not in the vocabulary",
            registry=self.registry,
        )
        self.model_info = Gauge(
            "fishrec_model_info",
            "1 for the bundle run id being served",
            ["version"],
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "fishrec_model_loaded_timestamp_seconds",
            "when the serving bundle was swapped in",
            registry=self.registry,
        )
        self.model_created = Gauge(
            "fishrec_model_created_timestamp_seconds",
            "when the serving bundle was created by the merge job (its manifest's `created`)",
            registry=self.registry,
        )
        # The age is computed at scrape time, so it grows while the bundle stays.
        self._created: float | None = None
        self.model_age = Gauge(
            "fishrec_model_age_seconds",
            "seconds since the serving bundle was created (what a stale-model alert watches)",
            registry=self.registry,
        )
        self.model_age.set_function(
            lambda: time.time() - self._created if self._created is not None else float("nan")
        )
        self.answers = Counter(
            "fishrec_answers",
            "histories answered, by the model version that answered (canary rollouts)",
            ["version"],
            registry=self.registry,
        )
        self.unavailable_items = Gauge(
            "fishrec_unavailable_items",
            "items of the availability file that are never returned",
            registry=self.registry,
        )
        self.availability_reloads = Counter(
            "fishrec_availability_reloads",
            "reads of a changed availability file by result (success, failure)",
            ["result"],
            registry=self.registry,
        )
        self.filtered_requests = Counter(
            "fishrec_filtered_requests",
            "histories answered with exclude_items or candidates, by rule",
            ["rule"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "fishrec_model_reloads",
            "bundle loads by result (success, failure)",
            ["result"],
            registry=self.registry,
        )

    def observer(self) -> BatchObserver:
        def batch(size: int, seconds: float) -> None:
            self.batch_size.observe(size)
            self.batch_duration.observe(seconds)

        return BatchObserver(batch=batch, queue_depth=self.queue_depth.set)

    def set_model(self, version: str, previous: str | None, created: str | None = None) -> None:
        if previous is not None and previous != version:
            self.model_info.remove(previous)
        self.model_info.labels(version=version).set(1)
        self.model_loaded.set_to_current_time()
        self._created = _seconds(created)
        self.model_created.set(float("nan") if self._created is None else self._created)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method, str(status)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _seconds(created: str | None) -> float | None:
    """A manifest's ISO-8601 `created` as Unix seconds (None when absent or unreadable)."""
    if not created:
        return None
    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
