"""The FastAPI application: routes, errors as JSON, API key, lifespan (docs/serving.md).

`create_app(settings)` builds an independent app (its own metrics registry and
model manager), so tests can run several side by side. The model is loaded in
the lifespan, in the background: the server answers /healthz at once and
/readyz only once a verified bundle has answered its warm-up. The routes are in
serving/routes.py, the JSON errors in serving/errors.py.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from serving.errors import add_error_handlers
from serving.metrics import Metrics
from serving.middleware import (
    ADMIN_KEY_HEADER,
    ADMIN_PREFIX,
    API_KEY_HEADER,
    PROTECTED_PREFIX,
    RequestContextMiddleware,
)
from serving.model_manager import ModelManager
from serving.routes import router
from serving.settings import Settings


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
    add_error_handlers(app)
    app.include_router(router)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        max_drain_bytes=settings.max_drain_bytes,
        api_key=settings.api_key_value(),
        admin_key=settings.admin_key_value(),
        log_requests=settings.log_requests,
        # The router's own routes: FastAPI keeps an included router as one entry.
        paths=frozenset(getattr(r, "path", "") for r in [*app.routes, *router.routes]) - {""},
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
            schemes["AdminKeyHeader"] = {"type": "apiKey", "in": "header", "name": ADMIN_KEY_HEADER}
            for path, operations in schema["paths"].items():
                scheme = "AdminKeyHeader" if path.startswith(ADMIN_PREFIX) else "APIKeyHeader"
                if path.startswith(PROTECTED_PREFIX):
                    for operation in operations.values():
                        operation["security"] = [{scheme: []}]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def without_telemetry() -> dict[str, Any]:
    """FastAPI's built-in OpenTelemetry hooks off: they look up the global providers on
    every request (a visible share of the CPU per request); /metrics is the service's telemetry.
    Only FastAPI versions that have the hooks take the argument."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
