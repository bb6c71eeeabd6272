"""The service's routes: health, readiness, metrics, model info, recommendations, reload.

Handlers read what they need from `request.app.state` (settings, metrics, the
model manager), so one router serves every app `create_app` builds; the app
includes `router` (serving/app.py). The recommendation routes are plain FastAPI
routes: a leaner route class that validated bodies straight from the bytes was
measured and removed (no difference in req/s, paired ratio 1.005,
benchmarks/results/serve-lean-ab.json).
"""

from __future__ import annotations

from typing import Any

import pydantic_core
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serving.errors import ERRORS, ApiError
from serving.model_manager import ModelManager, ReloadError, ServingModel
from serving.recommend import (
    LimitExceeded,
    check_filter_limits,
    check_limits,
    encode_filters,
    recommend,
)
from serving.schemas import (
    BatchRequest,
    BatchResponse,
    CanaryInfo,
    ErrorResponse,
    Health,
    ModelInfo,
    Readiness,
    RecommendationRequest,
    RecommendationResponse,
    ReloadRequest,
    ReloadResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
)
from serving.similar import similar_items

# Every route of the service; serving/app.py includes it in each app it builds.
router = APIRouter()


# Plain functions, not FastAPI dependencies: resolving dependencies costs more per request
# than everything else FastAPI does, and the API key is checked in RequestContextMiddleware.


def manager_of(request: Request) -> ModelManager:
    return request.app.state.manager


def current_model(request: Request) -> ServingModel:
    """The model serving now, or a 503 while none is loaded or the service is stopping."""
    manager = manager_of(request)
    model = manager.current
    if model is None or manager.stopping:
        reason = "shutting down" if manager.stopping else (manager.last_error or "loading")
        raise ApiError(503, "not_ready", f"no model is serving: {reason}", {"Retry-After": "1"})
    return model


def routed_model(request: Request, user: str | None = None) -> ServingModel:
    """The model that answers this caller: the canary for its share, else the current one."""
    model = current_model(request)  # 503 while nothing serves
    manager = manager_of(request)
    if manager.canary is None:  # the common case: no header lookup, no hashing
        return model
    return manager.route(user or request.headers.get(USER_HEADER)) or model


USER_HEADER = "x-user-id"


def json_response(content: Any) -> Response:
    # Serialised by pydantic-core in one step; FastAPI would validate it against the model first.
    return Response(pydantic_core.to_json(content), media_type="application/json")


# ---- routes -------------------------------------------------------------------------------


@router.get("/healthz", response_model=Health, tags=["operations"])
async def healthz() -> Health:
    """The process is alive (says nothing about the model)."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    tags=["operations"],
)
async def readyz(request: Request) -> JSONResponse:
    """Ready once a verified bundle is loaded and warm, until shutdown starts."""
    manager = manager_of(request)
    model = manager.current
    if model is None or manager.stopping:
        reason = "shutting down" if manager.stopping else (manager.last_error or "loading")
        return JSONResponse(Readiness(ready=False, reason=reason).model_dump(), 503)
    return JSONResponse(Readiness(ready=True, model_version=model.version).model_dump())


@router.get("/metrics", tags=["operations"], response_class=Response)
async def prometheus(request: Request) -> Response:
    """Prometheus metrics."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/model", response_model=ModelInfo, responses=ERRORS, tags=["model"])
async def model_info(request: Request) -> ModelInfo:
    """The serving bundle: run id, provenance, metrics, parity of its export."""
    model = current_model(request)
    canary = manager_of(request).canary
    return ModelInfo(
        model_version=model.version,
        loaded_at=model.loaded_at.isoformat(),
        model_file=model.runner.path.name,
        bundle=model.bundle.summary(),
        canary=None
        if canary is None
        else CanaryInfo(
            model_version=canary.version,
            share=request.app.state.settings.canary_share,
            loaded_at=canary.loaded_at.isoformat(),
            bundle=canary.bundle.summary(),
        ),
    )


@router.post(
    "/v1/recommendations",
    response_model=RecommendationResponse,
    responses=ERRORS,
    tags=["recommendations"],
)
async def recommendations(body: RecommendationRequest, request: Request) -> Response:
    """Top-k next items for one history."""
    model = routed_model(request, body.user_id)
    check_limits(body, request.app.state.settings, model.bundle, [])
    (answer,) = await recommend(model, [body], request.app.state.metrics)
    return json_response(answer)


@router.post(
    "/v1/recommendations:batch",
    response_model=BatchResponse,
    responses=ERRORS,
    tags=["recommendations"],
)
async def recommendations_batch(body: BatchRequest, request: Request) -> Response:
    """Top-k next items for many histories, all from the same model version."""
    model = routed_model(request)
    if len(body.requests) > request.app.state.settings.max_batch_requests:
        raise LimitExceeded(
            ["requests"],
            f"{len(body.requests)} histories; at most {request.app.state.settings.max_batch_requests} per batch",
        )
    for i, entry in enumerate(body.requests):
        check_limits(entry, request.app.state.settings, model.bundle, ["requests", i])
    answers = await recommend(model, body.requests, request.app.state.metrics)
    return json_response({"results": answers, "model_version": model.version})


@router.post(
    "/v1/similar-items",
    response_model=SimilarItemsResponse,
    responses={**ERRORS, 404: {"model": ErrorResponse, "description": "unknown item_id"}},
    tags=["recommendations"],
)
async def similar(body: SimilarItemsRequest, request: Request) -> Response:
    """The k items most similar to one item (cosine of the model's item representations)."""
    model = routed_model(request)
    bundle = model.bundle
    check_filter_limits(body, request.app.state.settings, [])
    if bundle.item_vectors is None:
        raise ApiError(
            409,
            "unsupported",
            f"the serving bundle {bundle.run_id} was exported without item vectors; re-export it",
        )
    known, _ = bundle.vocab.encode([str(body.item_id)])
    if not known:
        raise ApiError(404, "item_not_found", f"item {body.item_id!r} is not in the vocabulary")
    filters = encode_filters(bundle, body.exclude_items, body.candidates)
    ranked = similar_items(
        bundle.item_vectors, known[0], body.k, filters.exclude, filters.candidates, model.blocked()
    )
    external = bundle.vocab.external
    items = [
        {"item_id": external(i), "score": s}
        for i, s in zip(ranked.ids.tolist(), ranked.scores.tolist(), strict=True)
    ]
    return json_response(
        {"items": items, "model_version": bundle.run_id, "unknown_filter_items": filters.unknown}
    )


@router.post(
    "/v1/admin/reload",
    response_model=ReloadResponse,
    responses={**ERRORS, 409: {"model": ErrorResponse, "description": "bundle refused"}},
    tags=["model"],
)
async def reload(request: Request, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load LATEST (or `run_id`) now: verified and warmed before it replaces the current model."""
    manager = manager_of(request)
    try:
        changed, previous = await manager.reload(body.run_id if body else None)
    except ReloadError as err:
        raise ApiError(409, "bundle_refused", str(err)) from err
    current = current_model(request)
    return ReloadResponse(changed=changed, model_version=current.version, previous_version=previous)
