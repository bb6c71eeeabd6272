"""The FastAPI application: routes, errors as JSON, API key, lifespan (DESIGN §8).

`create_app(settings)` builds an independent app (its own metrics registry and
model manager), so tests can run several side by side. The model is loaded in
the lifespan, in the background: the server answers /healthz at once and
/readyz only once a verified bundle has answered its warm-up.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batcher import BatcherClosed, QueueFull
from serving.lean_route import Endpoint, LeanJsonRoute
from serving.logs import request_id
from serving.metrics import Metrics
from serving.middleware import API_KEY_HEADER, PROTECTED_PREFIX, RequestContextMiddleware
from serving.model_process import ModelProcessError
from serving.recommend import LimitExceeded, check_limits, recommend
from serving.reload import ModelManager, ReloadError, ServingModel
from serving.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    Health,
    ModelInfo,
    Readiness,
    RecommendationRequest,
    RecommendationResponse,
    ReloadRequest,
    ReloadResponse,
)
from serving.settings import Settings

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 2xx, with a JSON body {error, message, request_id}."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.headers = headers
        self.details = details


def error_response(err: ApiError) -> JSONResponse:
    body = ErrorResponse(
        error=err.error, message=err.message, request_id=request_id.get(), details=err.details
    )
    return JSONResponse(body.model_dump(exclude_none=True), err.status, headers=err.headers)


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "the body is not JSON",
        401: "X-API-Key missing",
        403: "X-API-Key wrong",
        413: "body over the size limit",
        415: "Content-Type is not application/json",
        422: "the request breaks the schema or a configured limit",
        503: "no model yet, overloaded, model process failed (see Retry-After) or shutting down",
    }.items()
}


# ---- the serving model ------------------------------------------------------------------
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


def json_response(content: Any) -> Response:
    # Serialised by pydantic-core in one step; FastAPI would validate it against the model first.
    return Response(pydantic_core.to_json(content), media_type="application/json")


# ---- error handlers ----------------------------------------------------------------------


def describe(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A one-line message and JSON-safe details from pydantic's validation errors."""
    details = [
        {
            "loc": [str(part) for part in e.get("loc", ())],
            "msg": e.get("msg", ""),
            "type": e.get("type", ""),
        }
        for e in errors
    ]
    shown = "; ".join(f"{'.'.join(d['loc']) or 'body'}: {d['msg']}" for d in details[:5])
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return f"invalid request: {shown}{more}", details


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if request.method == "POST" and not content_type.lower().endswith("json"):
        message = f"the body must be JSON: Content-Type is {content_type!r}, not application/json"
        return error_response(ApiError(415, "unsupported_media_type", message))
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(ApiError(400, "invalid_json", "the request body is not valid JSON"))
    message, details = describe(errors)
    return error_response(ApiError(422, "invalid_request", message, details=details))


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    headers = dict(exc.headers) if exc.headers else None
    return error_response(ApiError(exc.status_code, kind, str(exc.detail), headers))


async def on_limit(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LimitExceeded)
    detail = {"loc": ["body", *map(str, exc.loc)], "msg": str(exc), "type": "limit"}
    return error_response(
        ApiError(422, "invalid_request", f"invalid request: {exc}", details=[detail])
    )


async def on_queue_full(request: Request, exc: Exception) -> JSONResponse:
    request.app.state.metrics.rejected.inc()
    retry = str(request.app.state.settings.retry_after_s)
    message = f"overloaded, retry later: {exc}"
    return error_response(ApiError(503, "overloaded", message, {"Retry-After": retry}))


async def on_model_failure(request: Request, exc: Exception) -> JSONResponse:
    # The model process died under this batch; the next batch starts a new one.
    message = f"the model failed this request, retry: {exc}"
    return error_response(ApiError(503, "model_unavailable", message, {"Retry-After": "1"}))


async def on_closed(request: Request, exc: Exception) -> JSONResponse:
    return error_response(ApiError(503, "shutting_down", str(exc), {"Retry-After": "1"}))


# ---- the app -----------------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    manager = ModelManager(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        yield
        await manager.stop()

    app = FastAPI(
        **without_telemetry(),
        title="fishrec",
        summary="Next-item recommendations from a Fisher-merged sequential recommender",
        version="1",
        lifespan=lifespan,
        strict_content_type=False,  # a body without Content-Type is read as JSON
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.manager = manager
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(LimitExceeded, on_limit)
    app.add_exception_handler(QueueFull, on_queue_full)
    app.add_exception_handler(BatcherClosed, on_closed)
    app.add_exception_handler(ModelProcessError, on_model_failure)
    add_routes(app, settings)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        api_key=settings.api_key_value(),
        log_requests=settings.log_requests,
        paths=frozenset(getattr(route, "path", "") for route in app.routes),
    )
    document_api_key(app)
    return app


def document_api_key(app: FastAPI) -> None:
    """Declare the X-API-Key scheme on /v1/* in the OpenAPI schema (the middleware enforces it)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["APIKeyHeader"] = {"type": "apiKey", "in": "header", "name": API_KEY_HEADER}
            for path, operations in schema["paths"].items():
                if path.startswith(PROTECTED_PREFIX):
                    for operation in operations.values():
                        operation["security"] = [{"APIKeyHeader": []}]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def without_telemetry() -> dict[str, Any]:
    """FastAPI's built-in OpenTelemetry hooks off: they look up the global providers on
    every request (a visible share of the CPU per request); /metrics is the service's telemetry.
    Only FastAPI versions that have the hooks take the argument."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def lean_post(app: FastAPI, path: str, **kwargs: Any) -> Callable[[Endpoint], Endpoint]:
    """`app.post` for the hot routes: the same docs, FastAPI's per-request layers skipped."""

    def register(endpoint: Endpoint) -> Endpoint:
        app.router.add_api_route(
            path, endpoint, methods=["POST"], route_class_override=LeanJsonRoute, **kwargs
        )
        return endpoint

    return register


def add_routes(app: FastAPI, settings: Settings) -> None:

    @app.get("/healthz", response_model=Health, tags=["operations"])
    async def healthz() -> Health:
        """The process is alive (says nothing about the model)."""
        return Health()

    @app.get(
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

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics."""
        body, content_type = request.app.state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/model", response_model=ModelInfo, responses=ERRORS, tags=["model"])
    async def model_info(request: Request) -> ModelInfo:
        """The serving bundle: run id, provenance, metrics, parity of its export."""
        model = current_model(request)
        return ModelInfo(
            model_version=model.version,
            loaded_at=model.loaded_at.isoformat(),
            model_file=model.runner.path.name,
            bundle=model.bundle.summary(),
        )

    @lean_post(
        app,
        "/v1/recommendations",
        response_model=RecommendationResponse,
        responses=ERRORS,
        tags=["recommendations"],
    )
    async def recommendations(body: RecommendationRequest, request: Request) -> Response:
        """Top-k next items for one history."""
        model = current_model(request)
        check_limits(body, settings, model.bundle.num_items, [])
        (answer,) = await recommend(model, [body], request.app.state.metrics)
        return json_response(answer)

    @lean_post(
        app,
        "/v1/recommendations:batch",
        response_model=BatchResponse,
        responses=ERRORS,
        tags=["recommendations"],
    )
    async def recommendations_batch(body: BatchRequest, request: Request) -> Response:
        """Top-k next items for many histories, all from the same model version."""
        model = current_model(request)
        if len(body.requests) > settings.max_batch_requests:
            raise LimitExceeded(
                ["requests"],
                f"{len(body.requests)} histories; at most {settings.max_batch_requests} per batch",
            )
        for i, entry in enumerate(body.requests):
            check_limits(entry, settings, model.bundle.num_items, ["requests", i])
        answers = await recommend(model, body.requests, request.app.state.metrics)
        return json_response({"results": answers, "model_version": model.version})

    @app.post(
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
        return ReloadResponse(
            changed=changed, model_version=current.version, previous_version=previous
        )
