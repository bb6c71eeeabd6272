"""Service settings, read from FISHREC_* environment variables (CLI flags override them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Run ids become folder names under <artifacts>/runs/: one plain path component.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Upper bounds baked into the OpenAPI schema; the configured limits must stay below them.
SCHEMA_MAX_K = 1000
SCHEMA_MAX_HISTORY = 10_000
SCHEMA_MAX_BATCH = 1000
SCHEMA_MAX_EXCLUDE = 10_000
SCHEMA_MAX_CANDIDATES = 100_000


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(
            f"run id {run_id!r} is not a plain folder name (letters, digits, '.', '_', '-')"
        )
    return run_id


class Settings(BaseSettings):
    """Everything `fishrec serve` can be told; each field is also FISHREC_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="FISHREC_", extra="ignore", frozen=True)

    artifacts: Path = Field(
        Path("artifacts"),
        description="artifact root (a local path or mount): runs/<run_id>/ bundles and LATEST",
    )
    source: str | None = Field(
        None,
        description="a remote artifact root to follow (fsspec URL, e.g. s3://bucket/fishrec; "
        "needs the s3 extra): bundles are downloaded into `artifacts` as a cache, verified, "
        "then served; credentials and endpoint from the store's usual environment variables",
    )
    bundle: str | None = Field(
        None,
        description="serve this run id and ignore LATEST (no background reload); default: LATEST",
    )
    canary_bundle: str | None = Field(
        None,
        description="a second run id served to canary_share of the requests (sticky per "
        "user_id / X-User-Id); promote it by publishing it as LATEST",
    )
    canary_share: float = Field(
        0.05, ge=0.0, le=1.0, description="share of requests the canary bundle answers"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")

    cpus: float | None = Field(
        None,
        gt=0,
        le=1024,
        description="CPUs this service may use (Kubernetes: limits.cpu); default: the "
        "container's CPU quota (cgroup), else the CPUs the process may run on",
    )
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="onnxruntime threads inside one operator; default: cpus less one core for "
        "the event loop (at least 1)",
    )
    inter_op_threads: int = Field(
        1, ge=1, le=64, description="onnxruntime threads across operators (1: sequential graph)"
    )
    quantized: bool = Field(
        False, description="serve model.int8.onnx when the bundle has one (else model.onnx)"
    )
    retrieval: Literal["auto", "exact"] = Field(
        "auto",
        description="auto: a bundle with retrieval/ (large catalogues) answers from its ANN "
        "shortlist, re-ranked exactly; exact: always score every item with model.onnx",
    )
    ann_shortlist: int = Field(
        100, ge=10, le=10_000, description="items the ANN index returns per request, at least"
    )
    ann_ef_search: int = Field(
        128, ge=16, le=10_000, description="HNSW search depth (recall against time)"
    )
    model_process: bool = Field(
        True,
        description="run onnxruntime in a child process (else on a thread of the server): "
        "the model then never waits for the GIL while the event loop handles requests",
    )

    max_batch_size: int = Field(
        64, ge=1, le=4096, description="most histories coalesced into one onnxruntime run"
    )
    # 0 by default: rows that arrive while a batch runs form the next batch anyway, so
    # waiting only adds latency. Measured (ML-1M model, 2 cores): 1 ms of wait cut
    # throughput at 1 client from 609 to 256 req/s and did not help at 8-64 clients.
    max_wait_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="longest a history waits for others to join its batch (0: run what is queued)",
    )
    batches_in_flight: int = Field(
        2,
        ge=1,
        le=8,
        description="batches handed to the model before the previous one is answered "
        "(2: the model does not wait for the busy event loop between batches)",
    )
    max_queue: int = Field(
        1024, ge=1, description="most histories waiting for a batch; beyond it requests get 503"
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a 503 answer")

    api_key: SecretStr | None = Field(
        None, description="when set, /v1/* requires the header X-API-Key with this value"
    )
    admin_key: SecretStr | None = Field(
        None,
        description="when set, /v1/admin/* requires the header X-Admin-Key with this value; "
        "unset, the admin endpoints answer 403 (the client key never opens them)",
    )
    max_body_bytes: int = Field(
        256 * 1024, ge=1024, description="largest request body, counted on the stream"
    )
    max_drain_bytes: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="a body over max_body_bytes is read and discarded up to this size before "
        "the 413 goes out, so that an ordinary client reads it instead of a reset connection",
    )
    max_history: int = Field(
        1000,
        ge=1,
        le=SCHEMA_MAX_HISTORY,
        description="most item ids accepted in one history (the model itself reads the newest ones)",
    )
    max_k: int = Field(
        100, ge=1, le=SCHEMA_MAX_K, description="largest k (also capped by the catalogue size)"
    )
    max_exclude_items: int = Field(
        1000, ge=0, le=SCHEMA_MAX_EXCLUDE, description="most ids in one request's exclude_items"
    )
    max_candidates: int = Field(
        10_000, ge=0, le=SCHEMA_MAX_CANDIDATES, description="most ids in one request's candidates"
    )
    availability_file: Path | None = Field(
        None,
        description="external ids never to return, one per line, re-read when it changes "
        "(default: <artifacts>/unavailable.txt; a missing file means all are available)",
    )
    max_batch_requests: int = Field(
        256, ge=1, le=SCHEMA_MAX_BATCH, description="most histories in one batch request"
    )

    reload_interval_s: float = Field(
        30.0, ge=0.0, description="how often LATEST is checked for a new bundle (0: never)"
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0.0, description="longest a graceful shutdown waits for in-flight requests"
    )
    log_json: bool = Field(True, description="log one JSON object per line (else plain text)")
    log_requests: bool = Field(
        False,
        description="log every request; by default only those answered 4xx/5xx are logged "
        "(each log line costs about as much CPU as the rest of a request; /metrics counts all)",
    )

    @field_validator("bundle", "canary_bundle")
    @classmethod
    def _plain_run_id(cls, value: str | None) -> str | None:
        return None if value is None else check_run_id(value)

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # FISHREC_API_KEY= (set but empty, as compose files do) means no key, not the empty key.
        return None if value in ("", None) else value

    def api_key_value(self) -> str | None:
        return None if self.api_key is None else self.api_key.get_secret_value()

    def admin_key_value(self) -> str | None:
        return None if self.admin_key is None else self.admin_key.get_secret_value()
