"""The routes of OpenAI's Responses API: ``POST /v1/responses`` and
``POST /v1/responses/input_tokens``, stateless, over the shared layer
(:mod:`rbees_core.protocols`)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rbees_api_responses.request import chat_request, envelope, finish, output, render
from rbees_api_responses.stream import ResponseStream
from rbees_core import protocols as p
from rbees_core.protocols import RequestError

PATH = "/v1/responses"


def response_id(job_id: str) -> str:
    """The response's id, made of its job's."""
    return "resp_" + job_id.removeprefix("job-").replace("-", "")


async def create_response(request: Request) -> Response:
    """``POST /v1/responses``: one job; the response object, or its event stream."""
    try:
        body = await p.read_object(request)
        chat = chat_request(body)
        orc = p.orchestrator(request)
        job_ids = await p.submit(orc, p.job_task(orc, chat.task()))
    except RequestError as exc:
        return exc.response(render)
    jobs = p.Jobs(orc, job_ids)
    ident, created = response_id(job_ids[0]), int(time.time())
    if body.get("stream"):
        return ResponseStream(jobs, chat, body, ident=ident,  # type: ignore[return-value]
                              created=created, ping_s=orc.settings.sse_ping_interval_s)
    turn = p.Turn(tools=chat.tooled)
    error = await p.collect(request, jobs, lambda i, e, d: turn.feed(e, d))
    if error is not None:
        return p.job_error(error).response(render)
    answer = envelope(ident, chat, body, created, "completed")
    answer["output"] = output(ident, turn)
    return JSONResponse(finish(answer, turn))


async def count_input_tokens(request: Request) -> Response:
    """``POST /v1/responses/input_tokens``: the prompt's tokens as the model's template
    renders it (instructions and tools included), counted by a one-token job on a worker
    of the model: ``{"object": "response.input_tokens", "input_tokens": n}``."""
    try:
        chat = chat_request(await p.read_object(request))
        chat.max_tokens, chat.temperature, chat.json_schema = 1, 0, None
        orc = p.orchestrator(request)
        job_ids = await p.submit(orc, p.job_task(orc, chat.task()))
    except RequestError as exc:
        return exc.response(render)
    turn = p.Turn(tools=chat.tooled)
    error = await p.collect(request, p.Jobs(orc, job_ids), lambda i, e, d: turn.feed(e, d))
    if error is not None:
        return p.job_error(error).response(render)
    return JSONResponse({"object": "response.input_tokens",
                         "input_tokens": turn.usage.tokens_in})


def routes() -> list[BaseRoute]:
    """The routes this plugin adds to rbees-orcd."""
    return [Route(PATH, create_response, methods=["POST"]),
            Route(f"{PATH}/input_tokens", count_input_tokens, methods=["POST"])]


__all__ = ["PATH", "count_input_tokens", "create_response", "response_id", "routes"]
