"""A daemon's ASGI app (CONTRACT section 1): routes, middleware, lifespan, SSE responses.

The app is built by :func:`build_app` from routes; middleware adds the correlation id, the
bearer-token check and the error envelope. :func:`daemon_routes` and
:func:`daemon_lifespan` add what every daemon shares (``/health``, ``/openapi.json``, the
plugins' routes and start-up hooks).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import attrs
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbees_core import sse
from rbees_core.api.common import CORRELATION_ID_PATTERN, MAX_BODY_BYTES
from rbees_core.errors import (
    InvalidParamsError,
    PayloadTooLargeError,
    RateLimitedError,
    RbeesError,
    UnavailableError,
    envelope,
)
from rbees_core.log import correlation_id
from rbees_core.schema import from_mapping

T = TypeVar("T")
#: Paths answered without a token; "/" and OPEN_PREFIX are rbees-orcd's web UI, which must
#: load before it can ask for the token.
OPEN_PATHS = frozenset({"/health", "/metrics", "/"})
OPEN_PREFIX = "/ui/"
_CID = re.compile(CORRELATION_ID_PATTERN)
#: One ``request`` line per answered request, at debug level (``--log-level debug``).
_REQUESTS = logging.getLogger("rbees.request")


#: Path prefix of the OpenAI-compatible routes: their errors take OpenAI's shape, those the
#: middleware and the router answer (401, 404, 405, 500) included (CONTRACT section 1).
OPENAI_PREFIX = "/v1/"
_OPENAI_KINDS = {401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 429: "rate_limit_error"}


def is_openai_path(path: str) -> bool:
    """Whether errors on ``path`` take OpenAI's shape: under :data:`OPENAI_PREFIX`, or
    ``/v1`` itself (where ``/v1/models/..`` lands once a client normalizes it)."""
    return path.startswith(OPENAI_PREFIX) or path == OPENAI_PREFIX.rstrip("/")


def openai_error_body(status: int, message: str, *, code: str | None = None,
                      param: str | None = None) -> dict[str, Any]:
    """OpenAI's error envelope ``{"error": {message, type, param, code}}`` for a ``status``;
    used for every error answer under :data:`OPENAI_PREFIX` (rbees-orcd's /v1 routes)."""
    kind = _OPENAI_KINDS.get(status, "server_error" if status >= 500
                             else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


#: A client protocol's error body: ``(status, message, rbees code, request field or None)``
#: -> the JSON object it answers (OpenAI's ``{"error": {...}}``, Ollama's ``{"error": "..."}``).
ErrorShape = Callable[[int, str, str, str | None], dict[str, Any]]


def _openai_shape(status: int, message: str, code: str, field: str | None) -> dict[str, Any]:
    return openai_error_body(status, message, code=code.lower(), param=field)


#: Path prefix -> the error shape of the protocol served under it; the longest match wins.
_ERROR_SHAPES: dict[str, ErrorShape] = {OPENAI_PREFIX: _openai_shape}


def register_error_shape(prefix: str, shape: ErrorShape) -> None:
    """Answer every error on a path under ``prefix`` in ``shape``: those its routes raise
    (:class:`RbeesError`) and those no route makes (the token check's 401, the router's
    404 and 405, a crash's 500), so that a client of that protocol can read them all.

    Called by client-protocol plugins (``/api/`` for Ollama's API) from their
    ``rbees_register_routes`` hook, before the app serves; registering a prefix again
    replaces its shape. ``prefix`` must start and end with ``/``; raises ValueError
    otherwise."""
    if not (prefix.startswith("/") and prefix.endswith("/")) or prefix == "/":
        raise ValueError(f"an error-shape prefix is a path room such as /api/ (got {prefix!r})")
    _ERROR_SHAPES[prefix] = shape


def error_shape(path: str) -> ErrorShape | None:
    """The error shape of the protocol that serves ``path`` (the longest registered prefix
    that holds it, or is it without its final ``/``; OpenAI's for ``/v1`` itself), or None
    for rbees' own envelope."""
    if is_openai_path(path) and not path.startswith(OPENAI_PREFIX):
        return _openai_shape
    best = ""
    for prefix in _ERROR_SHAPES:  # /v1/messages/ serves /v1/messages too
        if (path.startswith(prefix) or path == prefix[:-1]) and len(prefix) > len(best):
            best = prefix
    return _ERROR_SHAPES.get(best) if best else None


def error_response(exc: RbeesError, path: str = "") -> JSONResponse:
    """The answer for ``exc``: rbees' envelope, or the shape of the protocol that serves
    ``path`` (the request's; :func:`error_shape`: OpenAI's under :data:`OPENAI_PREFIX`);
    with ``Retry-After`` on 429/503 and ``WWW-Authenticate`` on 401."""
    headers = {"X-Correlation-Id": correlation_id.get()}
    if isinstance(exc, UnavailableError):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    shape = error_shape(path)
    if shape is not None:
        body = shape(exc.status, exc.message, exc.code, exc.details.get("field"))
    else:
        body = exc.envelope(correlation_id.get())
    return JSONResponse(body, status_code=exc.status, headers=headers)


class CorrelationMiddleware:
    """Accepts a well-formed ``X-Correlation-Id`` or makes one; echoes it on every answer.
    At debug level it logs one ``request`` line per request (method, path, status,
    duration_ms) with that correlation id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cid = ""
        for name, value in scope["headers"]:
            if name == b"x-correlation-id":
                cid = value.decode("latin-1")
        if not _CID.fullmatch(cid):
            cid = str(uuid.uuid4())
        token = correlation_id.set(cid)
        raw = cid.encode()
        status = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-correlation-id"]
                message["headers"] = [*headers, (b"x-correlation-id", raw)]
                status[0] = message["status"]
            await send(message)

        started = time.monotonic()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if _REQUESTS.isEnabledFor(logging.DEBUG):
                _REQUESTS.debug("%s %s %s", scope["method"], scope["path"], status[0], extra={
                    "event": "request", "fields": {
                        "method": scope["method"], "path": scope["path"], "status": status[0],
                        "duration_ms": round((time.monotonic() - started) * 1000, 3)}})
            correlation_id.reset(token)


class BearerAuthMiddleware:
    """401 ``UNAUTHENTICATED`` unless the request carries the token: ``Authorization:
    Bearer TOKEN`` (rbees' own clients, OpenAI's, Ollama's) or ``x-api-key: TOKEN``
    (Anthropic's clients); /health, /metrics and the web UI's static files are open
    (:data:`OPEN_PATHS`). Kept for embedders; the
    daemons use :class:`rbees_core.http.auth.AuthMiddleware` (scopes, keys) instead."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.key = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            await self.app(scope, receive, send)
            return
        given = key = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
            elif name == b"x-api-key":
                key = value
        if not (hmac.compare_digest(given, self.expected)
                or (key and hmac.compare_digest(key, self.key))):
            from rbees_core.errors import UnauthenticatedError

            response = error_response(UnauthenticatedError("missing or wrong bearer token"),
                                      path)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _rbees_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RbeesError)
    return error_response(exc, request.url.path)


def _plain_error(request: Request, status: int, code: str, message: str) -> Response:
    """An error no RbeesError carries (the router's 404/405, a crash's 500) in the envelope
    of the request's path."""
    shape = error_shape(request.url.path)
    if shape is not None:
        body = shape(status, message, code, None)
    else:
        body = envelope(code, message, correlation_id=correlation_id.get())
    return JSONResponse(body, status_code=status,
                        headers={"X-Correlation-Id": correlation_id.get()})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    return _plain_error(request, exc.status_code, code, str(exc.detail))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _plain_error(request, 500, "INTERNAL", f"internal error: {type(exc).__name__}")


def build_app(
    routes: Sequence[BaseRoute],
    *,
    token: str | None,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    operations: Sequence[Any] | None = None,
    resolver: Callable[[str], Any] | None = None,
) -> ASGIApp:
    """A starlette app with the envelope handlers, wrapped in auth and correlation ids.

    With a ``token`` (or a ``resolver``: credential -> :class:`~rbees_core.auth.Principal`,
    rbees-orcd's, which also knows API keys and join tokens), every route but the open
    ones needs a credential granting the scope its Operation in ``operations`` declares
    (:mod:`rbees_core.http.auth`); without either, the daemon is open (loopback only)."""
    app = Starlette(
        routes=list(routes),
        lifespan=lifespan,
        exception_handlers={
            RbeesError: _rbees_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    asgi: ASGIApp = app
    if resolver is None and token:
        from rbees_core.http.auth import token_resolver

        resolver = token_resolver(token)
    if resolver is not None:
        from rbees_core.auth import RoutePolicy
        from rbees_core.http.auth import AuthMiddleware

        policy = RoutePolicy(operations or (), routes, open_paths=OPEN_PATHS,
                             open_prefixes=(OPEN_PREFIX,))
        asgi = AuthMiddleware(asgi, resolver, policy, error_response)
    return CorrelationMiddleware(asgi)


async def read_body(request: Request, limit: int = MAX_BODY_BYTES, *,
                    what: str = "body") -> bytes:
    """The request body, refusing more than ``limit`` bytes (1 MiB) with 413 before reading
    it all; ``what`` names it in the refusal (an ``upload``)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLargeError(f"{what} is {length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"{what} exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


#: Deepest nesting of arrays and objects a request body may have; no wire type needs 8.
MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Python's json reads NaN, Infinity and 1e400 as floats no JSON answer can carry back (a pool
#: state holding one made every later GET /v2/pools a 500); none passes parse_json.
_NOT_FINITE = "must be a finite number (NaN, Infinity and 1e400 are none)"


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, or :class:`InvalidParamsError` (field ``body``) when it is not
    JSON, nests deeper than :data:`MAX_JSON_DEPTH`, holds an unpaired surrogate
    (``"\\ud800"`` parses, but no UTF-8 text can carry it) or a number that is not finite
    (``NaN``, ``Infinity``, ``1e400``; the field is the key that holds it). Called by every
    daemon's body reader (:func:`read_json`) and the OpenAI routes, so each refuses these
    with a 400."""
    try:
        data = json.loads(raw)
    except RecursionError as exc:
        raise InvalidParamsError("body", f"nested deeper than {MAX_JSON_DEPTH} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParamsError("body", f"not valid JSON: {exc}") from exc
    if isinstance(data, (dict, list)):
        _check_tree(data)
    elif isinstance(data, str) and _SURROGATE.search(data):
        raise InvalidParamsError("body", "a string holds an unpaired UTF-16 surrogate")
    elif isinstance(data, float) and not math.isfinite(data):
        raise InvalidParamsError("body", _NOT_FINITE)
    return data


def _check_tree(root: dict[str, Any] | list[Any]) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidParamsError("body", f"nested deeper than {MAX_JSON_DEPTH} levels")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, str):
                if _SURROGATE.search(value):
                    raise InvalidParamsError(
                        str(key) if isinstance(key, str) else "body",
                        "a string holds an unpaired UTF-16 surrogate")
            elif isinstance(value, (dict, list)):
                stack.append((value, depth + 1))
            elif isinstance(value, float) and not math.isfinite(value):
                raise InvalidParamsError(str(key) if isinstance(key, str) else "body",
                                         _NOT_FINITE)
            if isinstance(key, str) and _SURROGATE.search(key):
                raise InvalidParamsError("body", "a key holds an unpaired UTF-16 surrogate")


async def read_json(request: Request, cls: type[T]) -> T:
    """Parse and validate a JSON body into ``cls`` (400 ``INVALID_PARAMS`` on any fault)."""
    return from_mapping(cls, parse_json(await read_body(request)))


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> JSONResponse:
    body = attrs.asdict(obj) if attrs.has(type(obj)) else obj
    return JSONResponse(body, status_code=status, headers=headers)


def health_endpoint(version: str, started: float) -> Callable[[Request], Awaitable[Response]]:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": version,
                             "uptime_s": round(time.monotonic() - started, 3)})
    return health


class EventStreamResponse:
    """Streams one job's events as SSE frames with increasing ids.

    Events arrive on ``events`` as ``(event, data)`` tuples and the stream ends after
    ``end`` or ``error``. Frames already waiting are written together. When the client goes
    away, ``on_disconnect`` runs at once (the worker cancels the job there).
    """

    TERMINAL = frozenset({"end", "error"})

    def __init__(self, events: asyncio.Queue[tuple[str, dict[str, Any]]],
                 on_disconnect: Callable[[], object], first_id: int = 1,
                 on_close: Callable[[], object] | None = None) -> None:
        self.events = events
        self.on_disconnect = on_disconnect
        self.on_close = on_close  # runs once the stream is over, however it ended
        self.next_id = first_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({
            "type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")],
        })
        gone = False

        async def watch() -> None:
            nonlocal gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    self.on_disconnect()
                    return

        watcher = asyncio.create_task(watch())
        try:
            done = False
            while not done:
                event, data = await self.events.get()
                frames = []
                while True:
                    frames.append(sse.json_frame(self.next_id, event, data))
                    self.next_id += 1
                    if event in self.TERMINAL:
                        done = True
                        break
                    try:
                        event, data = self.events.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                if not gone:
                    await send({"type": "http.response.body",
                                "body": "".join(frames).encode(), "more_body": True})
            if not gone:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (OSError, asyncio.CancelledError):
            self.on_disconnect()
            raise
        finally:
            watcher.cancel()
            if self.on_close is not None:
                self.on_close()


def daemon_routes(program: str, pm: Any, *, started: float, operations: list[Any],
                  routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """A daemon's routes: ``/health`` and ``/openapi.json`` (generated from ``operations``),
    its own ``routes``, then those its plugins add (``rbees_register_routes``)."""
    from starlette.routing import Route

    from rbees_core import __version__
    from rbees_core.api import openapi

    doc = openapi.document(program, __version__, operations)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(doc)

    builtin: list[BaseRoute] = [
        Route("/health", health_endpoint(__version__, started), methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        *routes,
    ]
    return builtin + [r for batch in pm.hook.rbees_register_routes(program=program)
                      for r in batch]


def daemon_lifespan(program: str, state: Any, *, attr: str,
                    start: Callable[[], Awaitable[None]] | None = None,
                    stop: Callable[[], Awaitable[None]] | None = None,
                    ) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """The lifespan every daemon shares: ``app.state.<attr> = state``, ``start``, the
    ``rbees_startup`` hook; on exit the ``rbees_shutdown`` hook (its errors are logged, never
    raised) and ``stop``. ``state`` carries ``pm`` and ``log``."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        setattr(app.state, attr, state)
        if start is not None:
            await start()
        state.pm.hook.rbees_startup(program=program, state=state)
        try:
            yield
        finally:
            try:
                state.pm.hook.rbees_shutdown(program=program, state=state)
            except Exception as exc:
                state.log.error("shutdown_hook_failed", error=str(exc))
            if stop is not None:
                await stop()

    return lifespan
