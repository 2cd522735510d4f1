"""The routes of Anthropic's Messages API: ``POST /v1/messages`` and
``POST /v1/messages/count_tokens``, over the shared layer (:mod:`rbees_core.protocols`).

Jobs go through the same queue as ``/v1/chat/completions`` (interactive lane, cancelled when
the client goes); tool calls, structured output and reasoning are the OpenAI path's. Errors
are in Anthropic's shape ``{"type": "error", "error": {type, message}}``, the middleware's
and the router's included (:func:`rbees_core.http.register_error_shape`); the token may come
as ``x-api-key``, as Anthropic's SDKs send it. Field by field: docs/protocols.md.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rbees_api_anthropic.request import (
    chat_request,
    render,
    stop_sequence,
    tool_use,
)
from rbees_api_anthropic.stream import MessageStream
from rbees_core import protocols as p
from rbees_core.protocols import RequestError

PREFIX = "/v1/messages"


def _message_id(job_id: str) -> str:
    return "msg_" + job_id.removeprefix("job-").replace("-", "")


async def create_message(request: Request) -> Response:
    """``POST /v1/messages``: one job; the answer as a Message, or its event stream."""
    try:
        body = await p.read_object(request)
        chat = chat_request(body)
        orc = p.orchestrator(request)
        job_ids = await p.submit(orc, p.job_task(orc, chat.task()))
    except RequestError as exc:
        return exc.response(render)
    jobs = p.Jobs(orc, job_ids)
    ident = _message_id(job_ids[0])
    if body.get("stream"):
        return MessageStream(jobs, chat, ident=ident,  # type: ignore[return-value]
                             ping_s=orc.settings.sse_ping_interval_s)
    turn = p.Turn(tools=chat.tooled)
    error = await p.collect(request, jobs, lambda i, e, d: turn.feed(e, d))
    if error is not None:
        return p.job_error(error).response(render)
    content: list[dict[str, Any]] = []
    if turn.reasoning:
        content.append({"type": "thinking", "thinking": turn.reasoning, "signature": ""})
    if turn.content or not turn.calls:
        content.append({"type": "text", "text": turn.content or ""})
    content += [tool_use({"id": c["id"], "name": c["function"]["name"],
                          "arguments": c["function"]["arguments"]}) for c in turn.calls]
    reason, sequence = stop_sequence(chat, turn)
    return JSONResponse({
        "id": ident, "type": "message", "role": "assistant", "model": chat.model,
        "content": content, "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": turn.usage.tokens_in,
                  "output_tokens": turn.usage.tokens_out}})


async def count_tokens(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``: the prompt's tokens as the model's template
    renders it (tools and system included), counted by a one-token job on a worker of the
    model: ``{"input_tokens": n}``."""
    try:
        chat = chat_request(await p.read_object(request), counting=True)
        chat.temperature, chat.json_schema = 0, None
        orc = p.orchestrator(request)
        job_ids = await p.submit(orc, p.job_task(orc, chat.task()))
    except RequestError as exc:
        return exc.response(render)
    turn = p.Turn(tools=chat.tooled)
    error = await p.collect(request, p.Jobs(orc, job_ids), lambda i, e, d: turn.feed(e, d))
    if error is not None:
        return p.job_error(error).response(render)
    return JSONResponse({"input_tokens": turn.usage.tokens_in})


def routes() -> list[BaseRoute]:
    """The routes this plugin adds to rbees-orcd."""
    return [Route(PREFIX, create_message, methods=["POST"]),
            Route(f"{PREFIX}/count_tokens", count_tokens, methods=["POST"])]


__all__ = ["PREFIX", "count_tokens", "create_message", "routes"]
