"""The outermost layer of every request: request id, API key, body size limit, metrics, access log.

The body limit is enforced on the stream: the body is read here chunk by chunk
and refused with 413 as soon as it passes the limit, whatever Content-Length
says (or when there is none, as with chunked transfer encoding). Bodies are
small, so the checked body is handed on in one piece. An exception that escapes
the application becomes a JSON 500 without a stack trace; the trace goes to the log.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.logs import request_id
from serving.metrics import Metrics

log = logging.getLogger("fishrec.access")
errors = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
API_KEY_HEADER = "X-API-Key"
PROTECTED_PREFIX = "/v1/"  # paths that need the API key when one is configured
ADMIN_KEY_HEADER = "X-Admin-Key"
ADMIN_PREFIX = "/v1/admin/"  # operator paths: their own key, refused when none is configured
MAX_REQUEST_ID = 128
# Request ids: a random prefix per process and a counter; uuid4 per request costs a
# getrandom() system call, a visible share of a request's CPU time at a few thousand per second.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


class BodyTooLarge(Exception):
    """The body passed max_body_bytes; `complete`: its last part has been read already."""

    def __init__(self, complete: bool = False) -> None:
        super().__init__("request body too large")
        self.complete = complete


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        api_key: str | None = None,
        admin_key: str | None = None,
        log_requests: bool = False,
        paths: frozenset[str] = frozenset(),
        max_drain_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.max_drain_bytes = max_drain_bytes
        self.api_key = None if api_key is None else api_key.encode()
        self.admin_key = None if admin_key is None else admin_key.encode()
        self.log_requests = log_requests
        self.paths = paths  # the app's route paths: labels for requests refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_request_id(scope) or new_request_id()
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", []))
                headers.append((REQUEST_ID_HEADER, rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            refusal = self.check_api_key(scope)
            if refusal is not None:
                await self.send_error(send_with_id, *refusal, rid)
                return
            try:
                body = await self.read_body(scope, receive)
            except BodyTooLarge as refused:
                # Read and discard the rest first: a server that answers and closes while
                # the client is still sending resets the connection, and the client never
                # sees the 413 (it gets ECONNRESET). Past max_drain_bytes it is closed anyway.
                if not refused.complete:
                    await self.drain(scope, receive)
                await self.send_error(send_with_id, 413, "payload_too_large", self.too_large(), rid)
                return
            await self.app(scope, replay(body, receive), send_with_id)
        except Exception:
            errors.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not response_started:
                message = "internal error; the request id identifies it in the service's log"
                await self.send_error(send_with_id, 500, "internal", message, rid)
        finally:
            self.record(scope, status, time.perf_counter() - started)
            request_id.reset(token)

    def check_api_key(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, error, message) when a /v1/ request lacks the right key, else None.

        /v1/admin/ takes the admin key instead of the client key (a client must not
        swap the model), and is closed when no admin key is configured.
        """
        path = scope["path"]
        if path.startswith(ADMIN_PREFIX):
            if self.admin_key is None:
                return (
                    403,
                    "forbidden",
                    "admin endpoints are off: set FISHREC_ADMIN_KEY to use them",
                )
            return self._compare(scope, ADMIN_KEY_HEADER, self.admin_key, "admin key")
        if self.api_key is None or not path.startswith(PROTECTED_PREFIX):
            return None
        return self._compare(scope, API_KEY_HEADER, self.api_key, "API key")

    @staticmethod
    def _compare(
        scope: Scope, name: str, expected: bytes, what: str
    ) -> tuple[int, str, str] | None:
        given = header(scope, name.lower().encode())
        if given is None:
            return 401, "unauthorized", f"missing {name} header"
        if not hmac.compare_digest(given.encode("latin-1"), expected):
            return 403, "forbidden", f"wrong {what}"
        return None

    def too_large(self) -> str:
        return f"request body is larger than the limit of {self.max_body_bytes} bytes"

    async def read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, or BodyTooLarge as soon as it passes the limit."""
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone: the app sees the disconnect
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge(complete=not message.get("more_body", False))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def drain(self, scope: Scope, receive: Receive) -> None:
        """Discard the rest of a refused body, up to max_drain_bytes in all."""
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_drain_bytes:
            return  # too much to wait for: the connection closes under the client
        drained = 0
        while drained <= self.max_drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def send_error(self, send: Send, status: int, error: str, message: str, rid: str) -> None:
        body = json.dumps({"error": error, "message": message, "request_id": rid}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 413:
            headers.append((b"connection", b"close"))  # what was not drained is never read
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def record(self, scope: Scope, status: int, seconds: float) -> None:
        # Route templates, never raw paths: unknown paths would grow the label set without bound.
        template = getattr(scope.get("route"), "path", None)
        if template is None:  # refused here (key, size) before routing, or no route matched
            template = scope["path"] if scope["path"] in self.paths else "unmatched"
        self.metrics.observe_request(template, scope["method"], status, seconds)
        if self.log_requests or status >= 400:
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "route": template,
                    "request_id": request_id.get(),
                },
            )


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def incoming_request_id(scope: Scope) -> str | None:
    """A caller's X-Request-ID when it is short and printable (it ends up in logs)."""
    value = header(scope, REQUEST_ID_HEADER)
    if value and len(value) <= MAX_REQUEST_ID and value.isprintable() and value.isascii():
        return value
    return None


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the already-read body once, then defers to the real one."""
    sent = False

    async def wrapped() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped
