"""Errors as JSON: every non-2xx answer is {error, message, request_id[, details]}.

`ApiError` is what routes raise; the handlers turn validation errors, limits,
overload, a failed model process and shutdown into the same shape (and the
statuses the OpenAPI schema documents in `ERRORS`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.batcher import BatcherClosed, QueueFull
from serving.logs import request_id
from serving.model_process import ModelProcessError
from serving.recommend import LimitExceeded
from serving.schemas import ErrorResponse


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


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(LimitExceeded, on_limit)
    app.add_exception_handler(QueueFull, on_queue_full)
    app.add_exception_handler(BatcherClosed, on_closed)
    app.add_exception_handler(ModelProcessError, on_model_failure)
