"""Cross-cutting request handling: body-size limit, API keys, request ids, JSON logs, timeouts, metrics.

Prometheus metrics use the standard ``prometheus_client`` library with one registry per app, so several
apps in one process (tests) do not collide.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "BodyGuard",
    "RequestMiddleware",
    "Metrics",
    "install_request_middleware",
    "configure_logging",
    "PROTECTED_PREFIXES",
]

log = logging.getLogger("infotrace.access")

PROTECTED_PREFIXES = ("/v1/", "/metrics")
"""Paths that need an API key when keys are configured; health, readiness and docs stay open."""


API_KEY_COOKIE = "infotrace_api_key"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted by name in the metrics; any other is counted as ``other``."""

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""An ``X-Request-ID`` a client may choose (anything else is replaced by a fresh one)."""

MISSING_KEY = "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


class BodyGuard:
    """Pure ASGI middleware: a request body over ``max_bytes`` gets 413 (by its header or while it streams),
    one that has not fully arrived ``timeout_s`` seconds after the app started reading it gets 408 (a slow
    client, or one whose Content-Length promises more than it sends), one that declares both Content-Length
    and Transfer-Encoding gets 400. Either way the app is told the client is gone, and the connection is
    closed after the answer.

    Args:
        app: the wrapped ASGI app.
        max_bytes: the size limit, in bytes.
        timeout_s: the time limit for receiving the whole body, in seconds.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and b"transfer-encoding" in headers:
            # two framings: proxies and servers may disagree on where the body ends (request smuggling)
            detail = "request has both Content-Length and Transfer-Encoding; send one of them"
            await self._refuse(scope, receive, send, 400, detail)
            return
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, self._too_large())
            return
        seen = 0
        deadline: float | None = None
        started = refused = finished = False

        async def guarded_receive() -> Message:
            nonlocal seen, refused, deadline, finished
            if refused:
                return {"type": "http.disconnect"}
            if finished:  # the body is complete: anything further is the client going away
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline if deadline is not None else loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.0))
            except TimeoutError:
                refused = True
                if not started:
                    promised = (
                        "send the whole body that Content-Length announces"
                        if declared is not None
                        else "send every chunk and the final zero-length chunk"
                    )
                    detail = (
                        f"request body not received within {self.timeout_s} s (INFOTRACE_BODY_TIMEOUT_S); "
                        + promised
                    )
                    await self._refuse(scope, receive, send, 408, detail)
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                finished = not message.get("more_body", False)
                if seen > self.max_bytes:
                    # answer now, and tell the app the client is gone so that it stops reading
                    refused = True
                    if not started:
                        await self._refuse(scope, receive, send, 413, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 or 408 has been sent; drop whatever the app answers to the disconnect
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)

    def _too_large(self) -> str:
        return f"request body exceeds {self.max_bytes} bytes (INFOTRACE_MAX_BODY_BYTES)"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, code: int, detail: str) -> None:
        headers = {"Connection": "close"}
        await JSONResponse({"detail": detail}, status_code=code, headers=headers)(scope, receive, send)


class Metrics:
    """Prometheus metrics of one app.

    Attributes:
        registry: the app's own collector registry (exposed at ``/metrics``).
        requests: counter of requests by route template, method and status.
        latency: histogram of request durations in seconds by route template, method and status.
        index_examples, index_bytes, index_ready: gauges per index name.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "infotrace_requests_total", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "infotrace_request_duration_seconds",
            "HTTP request duration in seconds",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        # with several worker processes (multiprocess mode): the latest value any live worker set, and
        # ready only when every live worker serves the index
        self.index_examples = Gauge(
            "infotrace_index_examples",
            "training examples per index",
            ["index"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.index_bytes = Gauge(
            "infotrace_index_bytes",
            "bytes on disk per index",
            ["index"],
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.index_ready = Gauge(
            "infotrace_index_ready",
            "1 if the index is served",
            ["index"],
            registry=self.registry,
            multiprocess_mode="livemin",
        )


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned handler's outcome so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path is not None else "unmatched"  # never the raw path: bounded label values


def _authorized(request: Request, keys: list[bytes]) -> bool:
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:]
    if given is None:  # the dashboard's cookie (SameSite=Strict), so that <img> requests carry the key
        given = request.cookies.get(API_KEY_COOKIE)
    if given is None:
        return False
    candidate = given.strip().encode()
    # compare with every key, so the time does not reveal which key (or how much of one) matched
    matches = [hmac.compare_digest(candidate, key) for key in keys]
    return any(matches)


class RequestMiddleware:
    """Pure ASGI middleware around every HTTP request: request id, API-key check, timeout, JSON access log
    and metrics (a pure ASGI class, not Starlette's ``BaseHTTPMiddleware``, which runs each request in a
    task of its own and streams the response through memory channels: about a fifth of a small request's
    CPU, measured).

    Args:
        app: the wrapped ASGI app.
        metrics: where to count.
        keys: accepted API keys (empty: no authentication).
        timeout_s: seconds before a request is answered with 503 (its worker thread finishes on its own).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, keys: list[bytes], timeout_s: float) -> None:
        self.app = app
        self.metrics = metrics
        self.keys = keys
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given_id = request.headers.get("x-request-id", "")
        # a client's id is echoed and logged only when it is a plain token (no 60 KB ids, no control bytes)
        request_id = given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex
        started = time.perf_counter()
        status = 0
        timed_out = False

        async def send_own(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        async def send_with_id(message: Message) -> None:
            if not timed_out:  # after a 503, what the abandoned handler answers is dropped
                await send_own(message)

        path = scope["path"]
        if self.keys and path.startswith(PROTECTED_PREFIXES) and not _authorized(request, self.keys):
            response = JSONResponse(
                {"detail": MISSING_KEY}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
            await response(scope, receive, send_with_id)
        else:
            handler = asyncio.ensure_future(self.app(scope, receive, send_with_id))
            try:
                done, _ = await asyncio.wait({handler}, timeout=self.timeout_s)
                if not done and not status:
                    timed_out = True
                    handler.cancel()  # a handler in a worker thread runs to its end; its answer is dropped
                    handler.add_done_callback(_consume)
                    detail = f"request took longer than {self.timeout_s} s (INFOTRACE_REQUEST_TIMEOUT_S)"
                    await JSONResponse({"detail": detail}, status_code=503)(scope, receive, send_own)
                else:
                    await handler  # started answering before the deadline: let it finish
            except asyncio.CancelledError:
                handler.cancel()
                raise
            except Exception:  # a bug, never the client's input: logged once here, with its traceback
                method = scope["method"]
                log.exception(
                    "unhandled error in %s %s id=%s",
                    method,
                    path,
                    request_id,
                    extra={"request_id": request_id, "method": method, "path": path},
                )
                if not status:
                    detail = (
                        f"internal error; the service log has its traceback under request id {request_id}"
                    )
                    body = {"detail": detail, "request_id": request_id}
                    await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
        self._record(scope, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, elapsed: float, request_id: str) -> None:
        route = _route_template(scope)
        # a made-up method must not make new series: /metrics would grow with every one
        method = scope["method"] if scope["method"] in _METHODS else "other"
        code = str(status)
        self.metrics.requests.labels(route, method, code).inc()
        self.metrics.latency.labels(route, method, code).observe(elapsed)
        log.info(
            "%s %s %d %.1f ms id=%s",
            scope["method"],
            scope["path"],
            status,
            elapsed * 1e3,
            request_id,
            extra={
                "request_id": request_id,
                "method": scope["method"],
                "path": scope["path"],
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1e3, 3),
            },
        )


def install_request_middleware(app: FastAPI, metrics: Metrics, keys: list[bytes], timeout_s: float) -> None:
    """Add :class:`RequestMiddleware` to ``app`` (outside every middleware added before it).

    Args:
        app: the app.
        metrics: where to count.
        keys: accepted API keys (empty: no authentication).
        timeout_s: seconds before a request is answered with 503 (its worker thread finishes on its own).
    """
    app.add_middleware(RequestMiddleware, metrics=metrics, keys=keys, timeout_s=timeout_s)


def configure_logging(json_logs: bool, level: str = "INFO") -> dict[str, Any]:
    """Logging config (for ``logging.config.dictConfig`` and uvicorn's ``log_config``).

    Args:
        json_logs: one JSON object per line (python-json-logger) instead of plain text.
        level: root level.

    Returns:
        The dictConfig mapping.
    """
    formatter: dict[str, Any] = (
        {
            "()": JsonFormatter,
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time"},
            # uvicorn's ANSI-coloured duplicate of the message has no place in a JSON line
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
        }
        if json_logs
        else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": level.upper()},
            "uvicorn.access": {"level": "WARNING"},  # infotrace.access logs every request with its id
        },
    }
