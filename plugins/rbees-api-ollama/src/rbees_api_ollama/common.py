"""What every Ollama route shares: its error shape, the request body, the model name, the
orchestrator facade, timestamps and NDJSON streams.

Ollama answers an error as ``{"error": "message"}`` with an HTTP status; so do these routes,
and so does rbees-orcd for every error under ``/api/`` (the token check's 401, the router's
404 and 405 included: :func:`rbees_core.http.register_error_shape`). In a stream that has
begun, an error is one last line ``{"error": "message"}``, as Ollama sends it.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from rbees_api_ollama.names import Names
from rbees_core import plugins
from rbees_core.catalog import configured_catalog
from rbees_core.errors import InvalidParamsError, RbeesError
from rbees_core.http import parse_json, read_body
from rbees_core.protocols import Orchestrator, orchestrator
from rbees_core.refs import split_scheme, validate_ref

NDJSON = "application/x-ndjson"


class OllamaError(Exception):
    """An error answer in Ollama's shape: ``status`` and ``message``. Raised by the routes'
    request checks; :meth:`response` is the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


def error_body(status: int, message: str, code: str, field: str | None) -> dict[str, Any]:
    """Ollama's error body, for :func:`rbees_core.http.register_error_shape`."""
    return {"error": message}


def from_rbees(exc: RbeesError) -> OllamaError:
    """An error rbees raised (admission's 404 for an unknown model, 429 for a full queue,
    400 naming a field ...), as Ollama answers it."""
    message = exc.message
    if isinstance(exc, InvalidParamsError) and exc.field and exc.field not in message:
        message = f"{exc.field}: {message}"
    return OllamaError(exc.status, message)


def invalid(message: str) -> OllamaError:
    return OllamaError(400, message)


async def read_request(request: Request) -> dict[str, Any]:
    """The JSON object a request carries; :class:`OllamaError` 400 otherwise (413 past
    1 MiB). An empty body is an empty object, as Ollama reads it."""
    try:
        raw = await read_body(request)
        body = parse_json(raw) if raw.strip() else {}
    except RbeesError as exc:
        raise from_rbees(exc) from exc
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def model_name(body: dict[str, Any]) -> str:
    """The request's model name: ``model``, or ``name`` as older clients send it."""
    name = body.get("model", body.get("name"))
    if not isinstance(name, str) or not name.strip():
        raise invalid("model is required")
    return name.strip()


def facade(request: Request) -> Orchestrator:
    """rbees-orcd's service, the facade its routes talk to (``app.state.orcd``), typed as
    the protocols' :class:`~rbees_core.protocols.Orchestrator`."""
    return orchestrator(request)


_NAMES: weakref.WeakKeyDictionary[Any, Names] = weakref.WeakKeyDictionary()


def names(request: Request) -> Names:
    """The name mapping of this rbees-orcd (its catalog, read once, as admission reads
    it; the schemes of its model sources)."""
    svc = facade(request)
    found = _NAMES.get(svc)
    if found is None:
        found = _NAMES[svc] = Names(configured_catalog(svc.pm),
                                    frozenset(plugins.model_sources(svc.pm)))
    return found


def held_models(request: Request) -> set[str]:
    """The ids and references of the models the pools hold or serve now."""
    out: set[str] = set()
    for pool in facade(request).pool_records():
        for m in pool.get("models") or ():
            out.update(str(v) for v in (m.get("id"), m.get("ref")) if v)
        for w in pool.get("workers") or ():
            if w.get("model_ref"):
                out.add(str(w["model_ref"]))
    return out


def rbees_model(request: Request, name: str) -> str:
    """The catalog id or reference an Ollama name means (:meth:`Names.to_rbees`), checked
    as a reference (its length, no ``..`` or shell syntax, and by its source when it has a
    scheme): :class:`OllamaError` 400 otherwise, before any job or download."""
    mapping = names(request)
    model = mapping.to_rbees(name)
    if model == name and not mapping.is_ref(name):  # not in the catalog: the pools?
        model = mapping.to_rbees(name, held_models(request))
    try:
        validate_ref(model)
        parts = split_scheme(model)
        sources = plugins.model_sources(facade(request).pm)
        if parts is not None and parts[0] in sources:
            sources[parts[0]].validate_ref(parts[1], "model")
    except InvalidParamsError as exc:
        raise invalid(f"model: {exc.message}") from exc
    return model


def timestamp(when: float | None = None) -> str:
    """RFC 3339 in UTC with a ``Z``, as Ollama writes ``created_at``."""
    moment = datetime.now(timezone.utc) if when is None else datetime.fromtimestamp(
        when, timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def ndjson_line(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def ndjson(lines: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """A streamed answer, one JSON object a line (``application/x-ndjson``)."""

    async def body() -> AsyncIterator[bytes]:
        async for data in lines:
            yield ndjson_line(data)

    return StreamingResponse(body(), media_type=NDJSON)


def boolean(body: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean field; 400 for any other value (``"yes"`` and ``1`` are none)."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{key} must be true or false")
    return value


__all__ = ["NDJSON", "OllamaError", "boolean", "error_body", "facade", "from_rbees",
           "held_models", "invalid", "model_name", "names", "ndjson", "ndjson_line",
           "rbees_model", "read_request", "timestamp"]
