"""Request and response models of the HTTP API (pydantic v2; they are the OpenAPI schema).

Requests are strict (no "10" for 10, no unknown fields) so that a typo gets a
4xx naming the field instead of a silently ignored option. The bounds written
here are the schema's hard ceilings; the configured limits (Settings.max_k,
max_history, max_batch_requests) and the catalogue size are checked per request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from serving.settings import (
    RUN_ID_PATTERN,
    SCHEMA_MAX_BATCH,
    SCHEMA_MAX_CANDIDATES,
    SCHEMA_MAX_EXCLUDE,
    SCHEMA_MAX_HISTORY,
    SCHEMA_MAX_K,
)

# External item ids are strings in the vocabulary; integer ids (MovieLens) are accepted too.
ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256, strict=True)] | StrictInt


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class RecommendationRequest(Strict):
    """One user's history and what to return."""

    items: list[ItemId] = Field(
        max_length=SCHEMA_MAX_HISTORY,
        description="external item ids, oldest first; unknown ids are ignored and reported",
        examples=[["1193", "661", "914"]],
    )
    k: int = Field(10, ge=1, le=SCHEMA_MAX_K, description="how many items to return")
    exclude_seen: bool = Field(True, description="never recommend an item of the history")
    user_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = Field(
        None,
        description="who asks (optional; the X-User-Id header does the same): keeps a caller "
        "on the same side of a canary rollout",
    )
    exclude_items: list[ItemId] = Field(
        default_factory=list,
        max_length=SCHEMA_MAX_EXCLUDE,
        description="external ids never to return (e.g. already in the basket); applied in the "
        "model graph, so k items come back whenever k eligible items exist",
        examples=[["2355"]],
    )
    candidates: list[ItemId] | None = Field(
        None,
        max_length=SCHEMA_MAX_CANDIDATES,
        description="return only among these external ids (e.g. one category or one shop's "
        "stock); none known: no item is eligible and the answer is empty",
        examples=[["1", "2", "3", "260", "1196"]],
    )


class BatchRequest(Strict):
    """Many histories answered by the same model version."""

    requests: list[RecommendationRequest] = Field(
        min_length=1, max_length=SCHEMA_MAX_BATCH, description="one entry per history"
    )


class ScoredItem(BaseModel):
    item_id: str = Field(description="external item id")
    score: float = Field(
        description="model score (higher is better); for the popular fallback, the item's share "
        "of training interactions"
    )


class RecommendationResponse(BaseModel):
    items: list[ScoredItem] = Field(description="best first; at most k")
    model_version: str = Field(description="run id of the bundle that answered")
    unknown_items: list[str] = Field(description="ids of the history not in the vocabulary")
    unknown_filter_items: list[str] = Field(
        default_factory=list,
        description="ids of exclude_items and candidates not in the vocabulary (ignored)",
    )
    fallback: Literal["popular"] | None = Field(
        description="'popular' when no known item was left and the answer is the most popular items"
    )


class SimilarItemsRequest(Strict):
    """Items like one item, by the model's item representations."""

    item_id: ItemId = Field(description="external id of the item", examples=["1193"])
    k: int = Field(10, ge=1, le=SCHEMA_MAX_K, description="how many items to return")
    exclude_items: list[ItemId] = Field(
        default_factory=list, max_length=SCHEMA_MAX_EXCLUDE, description="ids never to return"
    )
    candidates: list[ItemId] | None = Field(
        None, max_length=SCHEMA_MAX_CANDIDATES, description="return only among these ids"
    )


class SimilarItemsResponse(BaseModel):
    items: list[ScoredItem] = Field(description="most similar first (cosine); at most k")
    model_version: str = Field(description="run id of the bundle that answered")
    unknown_filter_items: list[str] = Field(
        description="ids of exclude_items and candidates not in the vocabulary (ignored)"
    )


class BatchResponse(BaseModel):
    results: list[RecommendationResponse] = Field(description="one per request, in order")
    model_version: str


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable kind, e.g. invalid_request, overloaded")
    message: str = Field(description="what went wrong, for a person")
    request_id: str | None = None
    details: list[dict[str, Any]] | None = Field(
        None, description="for invalid requests: one entry per offending field"
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    model_version: str | None = None
    reason: str | None = Field(None, description="why the service is not ready")


class CanaryInfo(BaseModel):
    model_version: str
    share: float = Field(description="share of requests it answers (sticky per user)")
    loaded_at: str
    bundle: dict[str, Any] = Field(description="the canary bundle manifest's summary")


class ModelInfo(BaseModel):
    model_version: str
    loaded_at: str = Field(description="when this bundle was swapped in (ISO-8601 UTC)")
    model_file: str = Field(description="model.onnx or model.int8.onnx")
    bundle: dict[str, Any] = Field(description="the bundle manifest's summary")
    canary: CanaryInfo | None = Field(
        None, description="the second bundle of a canary rollout (FISHREC_CANARY_BUNDLE)"
    )


class ReloadRequest(Strict):
    run_id: Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN.pattern)] | None = Field(
        None, description="load this run id instead of the one LATEST names"
    )


class ReloadResponse(BaseModel):
    changed: bool = Field(description="whether a different bundle is now serving")
    model_version: str
    previous_version: str | None
