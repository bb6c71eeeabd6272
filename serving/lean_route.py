"""A FastAPI route for JSON hot paths: documented like any route, handled without FastAPI's per-request layers.

For every request FastAPI resolves the endpoint's dependencies, parses the body
with `json.loads`, validates the resulting dict again in Python mode and wraps
the call in several layers. On the recommendation routes that was about half of
the event loop's CPU per request, and the event loop shares the GIL with the
thread that runs onnxruntime: every microsecond it holds the GIL delays the model.

`LeanJsonRoute` keeps what FastAPI derives from the endpoint's signature (the
OpenAPI schema, the route's name and methods) and replaces the request handling:
the body is validated by pydantic-core straight from the bytes
(`model_validate_json`) and the endpoint is awaited with the model and the
Request. The outcome is what FastAPI's handler gives: a body that is not JSON
raises `RequestValidationError` of type `json_invalid`, a body against the
schema one with the errors located under "body", a non-JSON Content-Type one
that the app's handler answers with 415; exceptions go to the app's handlers.

The endpoint must be `async def endpoint(body: Model, request: Request) -> Response`.
"""

from __future__ import annotations

import email.message
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

Endpoint = Callable[[Any, Request], Awaitable[Response]]


class LeanJsonRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.body_model = body_model(endpoint)
        self.lean_endpoint: Endpoint = endpoint
        self.app = self.handle_request  # replaces FastAPI's request handler, keeps the docs

    async def handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        response = await self.lean_endpoint(self.parse(request, body), request)
        await response(scope, receive, send)

    def parse(self, request: Request, body: bytes) -> BaseModel:
        if not body:
            raise RequestValidationError(
                [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
            )
        if not is_json(request.headers.get("content-type")):
            # FastAPI validates the raw bytes against the model here, which always fails;
            # the app's handler turns a failure with a non-JSON Content-Type into 415.
            raise RequestValidationError(
                [{"type": "model_type", "loc": ("body",), "msg": "not JSON", "input": None}]
            )
        try:
            return self.body_model.model_validate_json(body)
        except ValidationError as err:
            raise RequestValidationError(located_in_body(err)) from None


def body_model(endpoint: Callable[..., Any]) -> type[BaseModel]:
    hints = typing.get_type_hints(endpoint)
    model = hints.get("body")
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{endpoint.__name__}: LeanJsonRoute needs a `body: <pydantic model>`")
    return model


def is_json(content_type: str | None) -> bool:
    """FastAPI's rule: no Content-Type (with strict_content_type off), application/json or */*+json."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def located_in_body(err: ValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as FastAPI reports them: locations start with "body"."""
    return [
        {
            "type": e["type"],
            "loc": ("body", *e["loc"]),
            "msg": e["msg"],
            "input": e.get("input"),
        }
        for e in err.errors(include_url=False)
    ]
