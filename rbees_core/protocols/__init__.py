"""The shared layer of rbees-orcd's client protocols (OpenAI, Anthropic Messages, OpenAI
Responses, Ollama, ...): everything a protocol needs between its wire format and the job queue.

A client protocol is a route plugin: a package under ``plugins/`` whose module implements
``rbees_register_routes(program)`` (:mod:`rbees_core.hookspecs`) and, for
``program == "rbees-orcd"``, returns starlette routes; its ``pyproject.toml`` names the
module under the entry point group ``rbees``. It imports the kernel only (this package,
:mod:`rbees_core.api`, :mod:`rbees_core.http`, the top-level modules), never
``rbees_core.orchestrator`` or ``rbees_core.programs`` (the import contracts check it).

A handler, step by step::

    from rbees_core import protocols as p

    async def create(request):
        try:
            body = await p.read_object(request)             # 400/413 as RequestError
            chat = p.ChatRequest(model=..., messages=[p.message("user", "Hi")], ...)
            orc = p.orchestrator(request)                   # the facade: p.Orchestrator
            job_ids = await p.submit(orc, p.job_task(orc, chat.task()))
        except p.RequestError as exc:
            return exc.response(my_error_body)              # the protocol's error shape
        jobs = p.Jobs(orc, job_ids)
        if streamed:
            return MyStream(jobs, ..., ping_s=orc.settings.sse_ping_interval_s)
        turn = p.Turn(tools=chat.tooled)
        error = await p.collect(request, jobs, lambda i, e, d: turn.feed(e, d))
        if error is not None:
            return p.job_error(error).response(my_error_body)
        ... turn.content, turn.reasoning, turn.calls, turn.finish, turn.usage ...

``MyStream`` subclasses :class:`JobStream`: its ``event(index, event, data)`` feeds a
:class:`Turn` and turns each :class:`Delta` (text, reasoning, tool_call, end, error,
downloading) into the protocol's frames; ``head``/``tail`` frame the stream. The jobs are
cancelled when the client goes away, streamed (:class:`JobStream`) or not (:func:`collect`).

What the layer guarantees, so every protocol behaves as the OpenAI path does: tool calls
come parsed by the worker in the job's ``end`` event, and with tools text that may be a
call is held back until then (:class:`Turn`); structured output is ``json_schema`` (see
:func:`rbees_core.structured.response_format_schema` for OpenAI's forms); reasoning comes
apart from content (:mod:`rbees_core.reasoning`), switched by :attr:`ChatRequest.think`.
Errors: :func:`from_rbees` (admission), :func:`job_error` (a job's ``error`` event) and
every check here raise or return :class:`RequestError`; render it in the protocol's shape.
Error answers that the middleware and router make for a path (401, 404, 405, 500) take the
shape registered with :func:`rbees_core.http.register_error_shape` (``shape(status,
message, code, field)``; the prefix ends with ``/`` and serves the path without it too).
"""

from __future__ import annotations

from rbees_core.protocols.chat import (
    FINISH,
    ChatRequest,
    Delta,
    Finish,
    Turn,
    Usage,
    call_id,
    check_calls,
    message,
    named_choice,
    require,
    tool,
    tool_call,
    tool_result,
)
from rbees_core.protocols.errors import (
    ErrorBody,
    RequestError,
    from_invalid,
    from_rbees,
    invalid,
    job_error,
    openai_body,
    read_object,
)
from rbees_core.protocols.jobs import (
    PINGED,
    TERMINAL,
    Following,
    Jobs,
    JobStream,
    Orchestrator,
    Settings,
    cancel_on_disconnect,
    collect,
    job_task,
    orchestrator,
    submit,
)

__all__ = [
    "FINISH", "PINGED", "TERMINAL", "ChatRequest", "Delta", "ErrorBody", "Finish",
    "Following", "JobStream", "Jobs", "Orchestrator", "RequestError", "Settings", "Turn",
    "Usage", "call_id", "cancel_on_disconnect", "check_calls", "collect", "from_invalid",
    "from_rbees", "invalid", "job_error", "job_task", "message", "named_choice", "openai_body",
    "orchestrator", "read_object", "require", "submit", "tool", "tool_call", "tool_result",
]
