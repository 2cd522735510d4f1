"""Ollama's ``/api/embed`` and the older ``/api/embeddings`` over rbees' embedding jobs.

An embedding request is one job of rbees-orcd's queue, as OpenAI's ``/v1/embeddings`` makes
it: its texts are the job's ``input``, an embedding worker of the model runs it (started when
there is none) and the vectors come back in the job's ``end`` event. The vectors are the
worker's: mean-pooled and L2-normalized. ``dimensions`` keeps the first N numbers of each
and normalizes them again (as Ollama does for models trained for it); ``truncate`` and
``options`` are ignored; ``keep_alive`` is the worker's, as on chat.
"""

from __future__ import annotations

import math
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbees_api_ollama.common import (
    OllamaError,
    facade,
    invalid,
    model_name,
    rbees_model,
    read_request,
)
from rbees_core import protocols as p
from rbees_core.api.common import MAX_EMBED_INPUTS
from rbees_core.embedder import unpack


def _texts(raw: Any, field: str) -> list[str]:
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid(f"{field} must be a string or a non-empty array of strings")
    if len(texts) > MAX_EMBED_INPUTS:
        raise invalid(f"{field} must hold at most {MAX_EMBED_INPUTS} texts")
    for i, text in enumerate(texts):
        if not text:
            raise invalid(f"{field}[{i}] is empty; every input must be a non-empty string")
    return list(texts)


def shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """The first ``dimensions`` numbers of a vector, normalized again (all when None)."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm > 0 else head


async def _vectors(request: Request, name: str, texts: list[str],
                   keep_alive: Any) -> tuple[list[list[float]], dict[str, Any]]:
    """The vectors of ``texts`` and the job's ``end`` data, through the protocols' layer
    (the job is cancelled when the client goes); :class:`OllamaError` when the job is
    refused or fails."""
    orc = facade(request)
    fields: dict[str, Any] = {"model": rbees_model(request, name), "input": texts}
    if keep_alive is not None:
        fields["keep_alive"] = keep_alive
    try:
        job_ids = await p.submit(orc, p.job_task(orc, fields))
    except p.RequestError as exc:
        raise _refused(exc, name) from exc
    ended: dict[str, Any] = {}

    def feed(index: int, event: str, data: dict[str, Any]) -> None:
        if event == "end":
            ended.update(data)

    error = await p.collect(request, p.Jobs(orc, job_ids), feed)
    if error is not None:
        raise _refused(p.job_error(error), name)
    if not isinstance(ended.get("embeddings"), list):
        raise OllamaError(502, "the job ended without its vectors")
    return [unpack(v) for v in ended["embeddings"]], ended


def _refused(exc: p.RequestError, name: str) -> OllamaError:
    if exc.status == 404 and exc.field == "model":
        return OllamaError(404, f"model '{name}' not found")
    field = "input" if str(exc.field or "").startswith("input") else exc.field
    if exc.status == 400 and field and field not in exc.message:
        return OllamaError(400, f"{field}: {exc.message}")
    return OllamaError(exc.status, exc.message)


async def embed(request: Request) -> Response:
    """``POST /api/embed``: ``{model, embeddings, total_duration, load_duration,
    prompt_eval_count}``."""
    started = time.monotonic()
    try:
        body = await read_request(request)
        name = model_name(body)
        texts = _texts(body.get("input"), "input")
        dimensions = body.get("dimensions")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(
                dimensions, int) or dimensions < 1):
            raise invalid("dimensions must be a positive integer")
        vectors, data = await _vectors(request, name, texts, body.get("keep_alive"))
    except OllamaError as exc:
        return exc.response()
    return JSONResponse({
        "model": name, "embeddings": [shorten(v, dimensions) for v in vectors],
        "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
        "prompt_eval_count": int(data.get("tokens_in") or 0)})


async def embeddings(request: Request) -> Response:
    """``POST /api/embeddings`` (Ollama's older endpoint): ``{embedding}`` of ``prompt``."""
    try:
        body = await read_request(request)
        name = model_name(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise invalid("prompt must be a non-empty string")
        vectors, _ = await _vectors(request, name, [prompt], body.get("keep_alive"))
    except OllamaError as exc:
        return exc.response()
    return JSONResponse({"embedding": vectors[0]})


__all__ = ["embed", "embeddings", "shorten"]
