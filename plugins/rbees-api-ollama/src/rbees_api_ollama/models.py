"""Ollama's model endpoints over rbees-orcd's state: ``/api/version``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/pull`` and ``/api/delete``.

``/api/tags`` lists the models the pools hold (downloaded, or provided by an installed
package) and serve, by their Ollama name (:meth:`Names.to_ollama`); a catalog model no pool
holds is not listed, but a chat for it pulls it on first use, as ``/api/pull`` does.
``/api/ps`` lists the live workers (one line per worker: a model served twice shows twice).
``/api/pull`` downloads through rbees-orcd's downloads (the service's ``pull``), joining a
download under way; its progress is Ollama's ``{status, digest, total, completed}`` lines.
``/api/delete`` deletes the downloaded copies from every pool that holds them. What rbees does
not know at the orchestrator (a GGUF's architecture, its chat template) is not invented:
``family`` is the name's first part and ``template`` is empty (docs/protocols.md).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbees_api_ollama.common import (
    OllamaError,
    boolean,
    facade,
    from_rbees,
    model_name,
    names,
    ndjson,
    rbees_model,
    read_request,
    timestamp,
)
from rbees_core import __version__
from rbees_core.catalog import CatalogEntry
from rbees_core.errors import RbeesError

#: The version of Ollama's API these routes follow, which ``/api/version`` reports (clients
#: check it before using ``format`` schemas, ``tools`` or ``think``).
OLLAMA_VERSION = "0.12.0"
#: ``expires_at`` of a worker kept loaded until something else stops it (keep_alive -1)
FOREVER = 253402300799.0  # 9999-12-31T23:59:59Z
_SIZE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([MBT])\b", re.IGNORECASE)


def _not_found(name: str) -> OllamaError:
    return OllamaError(404, f"model '{name}' not found")


def details(model: str, entry: CatalogEntry | None) -> dict[str, Any]:
    """Ollama's ``details`` of a model, from what the catalog says of it."""
    family = getattr(entry, "family", None) if entry is not None else None
    if not family:
        base = (entry.id if entry is not None else model).split(":", 1)[0].split("/")[-1]
        family = re.sub(r"[^a-z0-9.]+", "", base.lower()) or "unknown"
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": _parameter_size(entry),
            "quantization_level": (entry.quantization or "") if entry is not None else ""}


def _parameter_size(entry: CatalogEntry | None) -> str:
    """``135M``, ``7.6B``: the catalog's ``parameters_b``, else read from its name."""
    if entry is None:
        return ""
    billions = getattr(entry, "parameters_b", None)
    if isinstance(billions, int | float):
        return f"{round(billions * 1000)}M" if billions < 1 else f"{billions:g}B"
    size = _SIZE.search(entry.name)
    return f"{size.group(1)}{size.group(2).upper()}" if size else ""


def capabilities(entry: CatalogEntry | None) -> list[str]:
    """Ollama's ``capabilities``: ``embedding`` for an embedding model, else
    ``completion`` and ``tools`` (and ``thinking`` for a reasoning model)."""
    if entry is not None and getattr(entry, "kind", "chat") == "embedding":
        return ["embedding"]
    tags = getattr(entry, "tags", None) or ()
    return ["completion", "tools", *(["thinking"] if "thinking" in tags else [])]


def _digest(model: str, sha256: Any) -> str:
    if isinstance(sha256, str) and sha256:
        return sha256
    return hashlib.sha256(model.encode()).hexdigest()


def _held(request: Request) -> dict[str, dict[str, Any]]:
    """rbees model (catalog id or reference) -> {size, sha256, since} of what the pools
    hold or serve now."""
    mapping = names(request)
    out: dict[str, dict[str, Any]] = {}

    def add(ref: str, size: Any, sha256: Any, since: Any) -> None:
        entry = mapping.catalog.get(ref) or mapping.catalog.by_source(ref)
        key = entry.id if entry is not None else ref
        row = out.setdefault(key, {"size": 0, "sha256": None, "since": since})
        if isinstance(size, int) and size > row["size"]:
            row["size"] = size
        if row["size"] == 0 and entry is not None:
            row["size"] = entry.size_bytes or 0
        row["sha256"] = row["sha256"] or sha256 or (entry.sha256 if entry else None)

    for pool in facade(request).pool_records():
        since = pool.get("registered_at")
        for m in pool.get("models") or ():
            ref = m.get("id") or m.get("ref")
            if ref:
                add(str(ref), m.get("size_bytes"), m.get("sha256"), since)
        for w in pool.get("workers") or ():
            if w.get("model_ref"):
                add(str(w["model_ref"]), None, None, since)
    return out


async def version(request: Request) -> Response:
    """``GET /api/version``: the Ollama API version followed, and rbees' own."""
    return JSONResponse({"version": OLLAMA_VERSION, "rbees_version": __version__})


async def tags(request: Request) -> Response:
    """``GET /api/tags``: the models the pools hold or serve."""
    mapping = names(request)
    models = []
    for model, row in sorted(_held(request).items()):
        entry = mapping.catalog.get(model)
        name = mapping.to_ollama(model)
        since = row["since"]
        models.append({"name": name, "model": name,
                       "modified_at": timestamp(since if isinstance(since, float) else None),
                       "size": row["size"], "digest": _digest(model, row["sha256"]),
                       "details": details(model, entry)})
    return JSONResponse({"models": models})


async def show(request: Request) -> Response:
    """``POST /api/show``: what rbees knows of one model (``verbose`` is ignored)."""
    try:
        body = await read_request(request)
        name = model_name(body)
        model = rbees_model(request, name)
        mapping = names(request)
        entry = mapping.catalog.get(model) or mapping.catalog.by_source(model)
        held = _held(request)
        if entry is None and model not in held:
            raise _not_found(name)
    except OllamaError as exc:
        return exc.response()
    info = details(model, entry)
    family = info["family"]
    model_info: dict[str, Any] = {"general.architecture": family,
                                  "general.basename": model}
    if entry is not None:
        model_info[f"{family}.context_length"] = entry.context_length
        model_info["general.license"] = entry.license
    ref = entry.sources[0] if entry is not None else model
    since = held.get(entry.id if entry is not None else model, {}).get("since")
    return JSONResponse({
        "license": entry.license if entry is not None else "",
        "modelfile": f"# rbees model {model}\nFROM {ref}\n",
        "parameters": "", "template": "", "details": info, "model_info": model_info,
        "capabilities": capabilities(entry),
        "modified_at": timestamp(since if isinstance(since, float) else None),
    })


async def ps(request: Request) -> Response:
    """``GET /api/ps``: the live workers, each with when its keep-alive ends."""
    svc = facade(request)
    mapping = names(request)
    models = []
    for pool in svc.pool_records():
        for w in pool.get("workers") or ():
            if w.get("state") not in ("ready", "busy") or not w.get("model_ref"):
                continue
            ref = str(w["model_ref"])
            entry = mapping.catalog.get(ref) or mapping.catalog.by_source(ref)
            model = entry.id if entry is not None else ref
            name = mapping.to_ollama(model)
            memory = int(w.get("memory_bytes") or 0)
            expires = svc.worker_expiry(str(pool.get("pool_id")), str(w.get("worker_id")))
            models.append({
                "name": name, "model": name, "size": memory,
                "size_vram": 0 if str(w.get("device", "cpu")).startswith("cpu") else memory,
                "digest": _digest(model, entry.sha256 if entry is not None else None),
                "details": details(model, entry),
                "expires_at": timestamp(FOREVER if math.isinf(expires) else expires),
                "context_length": entry.context_length if entry is not None else 0,
                "pool_id": pool.get("pool_id"), "worker_id": w.get("worker_id")})
    return JSONResponse({"models": models})


async def pull(request: Request) -> Response:
    """``POST /api/pull``: download a model to a pool; streamed progress unless
    ``stream`` is false (``insecure`` is ignored)."""
    try:
        body = await read_request(request)
        name = model_name(body)
        stream = boolean(body, "stream", True)
        model = rbees_model(request, name)
        progress = facade(request).pull(model)
        try:
            first = await progress.__anext__()  # refusals before any line: a status
        except RbeesError as exc:
            raise from_rbees(exc) from exc
    except OllamaError as exc:
        return exc.response()
    if not stream:
        try:
            async for _ in progress:
                pass
        except RbeesError as exc:
            return OllamaError(502 if exc.status < 500 else exc.status,
                               exc.message).response()
        return JSONResponse({"status": "success"})
    return ndjson(_pull_lines(model, first, progress))


async def _pull_lines(model: str, first: dict[str, Any],
                      progress: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Ollama's pull lines: ``pulling manifest``, ``pulling <digest>`` with ``total`` and
    ``completed`` as the pool reports them, then ``verifying sha256 digest``, ``writing
    manifest`` and ``success``; a failed download ends with ``{"error": ...}``."""
    digest = "sha256:" + hashlib.sha256(model.encode()).hexdigest()
    yield {"status": "pulling manifest"}
    item: dict[str, Any] = first
    total = 0
    try:
        while True:
            total = int(item.get("total") or total or item.get("bytes") or 0)
            if item.get("stage", "download") == "download" or item.get("done"):
                yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total,
                       "completed": total if item.get("done") else int(item.get("bytes") or 0)}
            if item.get("done"):
                break
            item = await progress.__anext__()
    except StopAsyncIteration:
        pass
    except RbeesError as exc:
        yield {"error": exc.message}
        return
    for status in ("verifying sha256 digest", "writing manifest", "success"):
        yield {"status": status}


async def delete(request: Request) -> Response:
    """``DELETE /api/delete``: delete the downloaded copies of a model from its pools."""
    try:
        body = await read_request(request)
        name = model_name(body)
        model = rbees_model(request, name)
        try:
            await facade(request).remove_model(model)
        except RbeesError as exc:
            if exc.code == "MODEL_NOT_FOUND":
                raise _not_found(name) from exc
            raise from_rbees(exc) from exc
    except OllamaError as exc:
        return exc.response()
    return Response(status_code=200)


__all__ = ["OLLAMA_VERSION", "delete", "details", "ps", "pull", "show", "tags", "version"]
