"""OpenAI's ``POST /v1/embeddings`` on rbees-orcd.

An embedding request is one job of the queue like any other (admission, capacity,
``rbees jobs``, ``why``), with its texts as the job's ``input``; the scheduler runs it on an
embedding worker of the model (rbees-workerd ``--embedding``), starting one when there is
none. Every input goes to the worker in that one job, and the worker embeds them in one
forward pass when they fit its batch (the ``X-Rbees-Forward-Passes`` header says how many
it took). The vectors come back in the job's ``end`` event, through its channel: the store
keeps the job's usage, not its vectors.

Fields (docs/openai.md): ``input`` a string or an array of strings (token arrays are
refused), ``encoding_format`` ``float`` or ``base64`` (little-endian float32, as OpenAI),
``dimensions`` refused (the model's own size only), ``user`` ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rbees_core.api import openapi
from rbees_core.api.common import MAX_EMBED_INPUTS
from rbees_core.api.orchestrator import TaskRequest
from rbees_core.embedder import unpack
from rbees_core.errors import InvalidParamsError, RbeesError
from rbees_core.orchestrator.channel import TERMINAL
from rbees_core.programs.openai_errors import OpenAIError, from_rbees, job_error, read_object
from rbees_core.programs.orcd_common import service
from rbees_core.schema import from_mapping


def _inputs(body: dict[str, Any]) -> list[str]:
    """The request's texts; raises :class:`OpenAIError` (400, ``input``) for anything else."""
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise OpenAIError(400, "input must be a string or a non-empty array of strings",
                          param="input")
    if any(isinstance(t, int) or (isinstance(t, list) and t and isinstance(t[0], int))
           for t in texts):
        raise OpenAIError(400, "token arrays are not supported as input; send the text",
                          param="input")
    if not all(isinstance(t, str) for t in texts):
        raise OpenAIError(400, "input must be a string or an array of strings",
                          param="input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise OpenAIError(400, f"input must hold at most {MAX_EMBED_INPUTS} texts",
                          param="input")
    for i, text in enumerate(texts):
        if not text:
            raise OpenAIError(400, f"input[{i}] is empty; every input must be a non-empty "
                              "string", param="input")
    return list(texts)


def _request(body: dict[str, Any]) -> tuple[str, list[str], str]:
    """``(model, texts, encoding_format)`` of a request body, or :class:`OpenAIError`."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "model is required", param="model")
    fmt = body.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise OpenAIError(400, "encoding_format must be float or base64",
                          param="encoding_format")
    if body.get("dimensions") is not None:
        raise OpenAIError(400, "dimensions is not supported: the vectors have the model's "
                          "own size", param="dimensions")
    return model, _inputs(body), str(fmt)


async def _wait(request: Request, job_id: str) -> tuple[str, dict[str, Any]]:
    """The job's terminal event (``end`` or ``error``) and its data, from its channel."""
    following = await service(request).follow(job_id, 0)
    try:
        for _, event, data in following.backlog:
            if event in TERMINAL:
                return event, data
        while following.live is not None:
            _, event, data = await following.live.get()
            if event in TERMINAL:
                return event, data
    finally:
        following.close()
    return "error", {"code": "NOT_FOUND", "message": "the job's events are gone"}


async def embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``."""
    try:
        body = await read_object(request)
        model, texts, fmt = _request(body)
        fields: dict[str, Any] = {"model": model, "input": texts, "priority": "interactive",
                                  "cancel_on_disconnect": True}
        if body.get("keep_alive") is not None:  # Ollama's, as on chat and completions
            fields["keep_alive"] = body["keep_alive"]
        task = from_mapping(TaskRequest, fields)
        job_id = (await service(request).submit(task, refuse_unknown=True)).job_id
    except OpenAIError as exc:
        return exc.response()
    except InvalidParamsError as exc:  # input[3] is OpenAI's input
        field = "input" if str(exc.field).startswith("input") else exc.field
        return OpenAIError(400, exc.message, param=field).response()
    except RbeesError as exc:
        return from_rbees(exc).response()
    try:
        event, data = await _wait(request, job_id)
    except asyncio.CancelledError:  # the client went away: so does its job
        with contextlib.suppress(RbeesError):
            await service(request).cancel(job_id)
        raise
    if event == "error":
        if data.get("code") == "INVALID_PARAMS" and not data.get("field"):
            data = {**data, "field": "input"}
        return job_error(data).response()
    if not isinstance(data.get("embeddings"), list):
        return OpenAIError(502, "the job ended without its vectors", code="worker_error",
                           kind="server_error").response()
    return JSONResponse(embedding_body(model, fmt, data), headers={
        "X-Rbees-Job-Id": job_id,
        "X-Rbees-Forward-Passes": str(data.get("forward_passes", ""))})


def request_of(body: dict[str, Any]) -> tuple[str, list[str], str]:
    """``(model, texts, encoding_format)`` of an embeddings request body; raises
    :class:`OpenAIError` (400). Also used by the batch runner (:mod:`.orcd_batch_runner`)."""
    return _request(body)


def embedding_body(model: str, fmt: str, data: dict[str, Any]) -> dict[str, Any]:
    """The answer (an embeddings ``list``) of a job whose ``end`` event is ``data``."""
    vectors: list[Any] = data["embeddings"]
    if fmt == "float":
        vectors = [unpack(v) for v in vectors]
    tokens = int(data.get("tokens_in") or 0)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v}
                 for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


OPERATIONS = [
    openapi.Operation("POST", "/v1/embeddings", "OpenAI embeddings (run on an embedding "
                      "worker, every input in one forward pass when they fit)",
                      scope="inference",
                      errors={"400": "invalid request (OpenAI error shape)",
                              "404": "unknown model (OpenAI error shape)"}),
]


def routes() -> list[BaseRoute]:
    return [Route("/v1/embeddings", embeddings, methods=["POST"])]
