"""A chat request and its answer, protocol-neutral.

:class:`ChatRequest` is what a protocol's request means to rbees (messages with tool calls
and results, tools, a JSON schema, sampling, stop, max tokens, reasoning on or off); its
:meth:`~ChatRequest.task` is the task dict :func:`~.jobs.submit` takes. Messages are the
task's own form (:class:`~rbees_core.api.orchestrator.TaskMessage`): build them with
:func:`message`, :func:`tool_call` and :func:`tool_result`.

:class:`Turn` reads one job's events and says what they mean as :class:`Delta` s: text,
reasoning, tool calls (with tools, the calls and the content not streamed yet come when
the job ends: the worker parses them), then the end with a neutral finish reason and the
usage. It also keeps the whole answer for a non-streamed reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import attrs

from rbees_core.errors import InvalidParamsError
from rbees_core.protocols.errors import RequestError, from_invalid
from rbees_core.tools import LiveText, check_tool_calls, new_call_id

#: The worker's stop reasons as a neutral finish: ``stop`` (the model ended its turn or
#: wrote a stop sequence), ``length`` (max_tokens); ``tool_calls`` when the answer calls.
FINISH = {"stop": "stop", "eos": "stop", "max_tokens": "length"}
Finish = Literal["stop", "length", "tool_calls"]


def message(role: str, content: str | None, *, tool_calls: list[dict[str, Any]] | None = None,
            reasoning: str | None = None) -> dict[str, Any]:
    """One chat turn in the task's form: ``role`` system, user or assistant; an assistant
    turn may carry ``tool_calls`` (from :func:`tool_call`; ``content`` may then be None) and
    its ``reasoning``."""
    out: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        out["tool_calls"] = tool_calls
    if reasoning:
        out["reasoning_content"] = reasoning
    return out


def tool_call(call_id: str, name: str, arguments: str | Mapping[str, Any]) -> dict[str, Any]:
    """One call of an assistant turn; ``arguments`` a JSON text or an object."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                   ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


def tool_result(call_id: str, content: str, name: str | None = None) -> dict[str, Any]:
    """The turn answering call ``call_id`` with ``content``."""
    out = {"role": "tool", "content": content, "tool_call_id": call_id}
    if name is not None:
        out["name"] = name
    return out


def tool(name: str, parameters: Mapping[str, Any] | None, description: str | None = None
         ) -> dict[str, Any]:
    """One function a model may call, in the task's form."""
    function: dict[str, Any] = {"name": name,
                                "parameters": dict(parameters or {"type": "object"})}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def named_choice(name: str) -> dict[str, Any]:
    """A ``tool_choice`` that forces the tool ``name``."""
    return {"type": "function", "function": {"name": name}}


def check_calls(calls: Any, field: str) -> None:
    """Check tool calls built from a request; raises :class:`RequestError` (400, ``field``)."""
    try:
        check_tool_calls(calls, field=field)
    except InvalidParamsError as exc:
        raise from_invalid(exc) from exc


@attrs.define
class ChatRequest:
    """A generation request as rbees runs it; the fields left None take the task's
    defaults. Exactly one of ``messages`` and ``prompt``.

    ``tools``: from :func:`tool`; ``tool_choice``: ``"auto"``, ``"none"``, ``"required"``
    or :func:`named_choice`. ``json_schema``: the output must be JSON valid under it.
    ``think``: reasoning on or off for templates that switch it (``enable_thinking``);
    None: the template's default. ``extra``: further task fields (penalties, logprobs,
    ``chat_template_kwargs``, ``reasoning_effort``, ``keep_alive``, ``grammar`` ...)."""

    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    json_schema: dict[str, Any] | None = None
    think: bool | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    @property
    def tooled(self) -> bool:
        """Whether the answer may call tools (its calls come when the job ends)."""
        return bool(self.tools) and self.tool_choice != "none"

    def task(self) -> dict[str, Any]:
        """The ``POST /v2/tasks`` body (without lane and deadline: :func:`~.jobs.job_task`).
        Values are checked on submit (:func:`~.jobs.submit` raises a 400 naming the task's
        field)."""
        task: dict[str, Any] = {"model": self.model}
        if self.messages is not None:
            task["messages"] = self.messages
        if self.prompt is not None:
            task["prompt"] = self.prompt
        for key in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "tools",
                    "tool_choice", "parallel_tool_calls", "json_schema"):
            value = getattr(self, key)
            if value is not None:
                task[key] = value
        task.update(self.extra)
        if self.think is not None:
            kwargs = dict(task.get("chat_template_kwargs") or {})
            kwargs.setdefault("enable_thinking", self.think)
            task["chat_template_kwargs"] = kwargs
        return task


@attrs.define
class Usage:
    """Tokens of the prompt (``tokens_in``) and the answer (``tokens_out``)."""

    tokens_in: int = 0
    tokens_out: int = 0


@attrs.frozen
class Delta:
    """One piece of an answer: ``kind`` ``text`` (``text``; the token's ``logprobs``
    entries when asked), ``reasoning`` (``text``), ``tool_call`` (``call``: ``{id, name,
    arguments}``, arguments a JSON text), ``end`` (``finish``), ``error`` (``error``: the
    job's error event) or ``downloading`` (``info``: the model is being pulled first:
    ``model``, ``pool_id``, ``bytes``, ``total``)."""

    kind: Literal["text", "reasoning", "tool_call", "end", "error", "downloading"]
    text: str = ""
    call: dict[str, Any] | None = None
    finish: Finish | None = None
    logprobs: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = None
    info: dict[str, Any] | None = None


class Turn:
    """One job's answer, fed its events in order (:meth:`feed`).

    Made by a protocol's handler per job, ``tools`` = :attr:`ChatRequest.tooled`. After the
    terminal event: :attr:`content` (None when an answer that calls tools has no text),
    :attr:`reasoning`, :attr:`calls`, :attr:`finish`, :attr:`usage`, :attr:`error`,
    :attr:`entries` (the content's logprobs entries)."""

    def __init__(self, *, tools: bool = False) -> None:
        self.tools = tools
        self.live = LiveText()
        self.content: str | None = ""
        self.reasoning = ""
        self.calls: list[dict[str, Any]] = []
        self.finish: Finish | None = None
        self.stop_reason: str | None = None
        self.usage = Usage()
        self.error: dict[str, Any] | None = None
        self.entries: list[dict[str, Any]] = []

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None

    def text_only(self, data: dict[str, Any]) -> str | None:
        """A token event's text when all it adds is that text (no reasoning, no logprobs,
        no tools): taken as :meth:`feed` takes it, without a :class:`Delta` (a stream's
        fast path, per relayed token); None otherwise, and the event is left to feed."""
        if self.tools or data.get("reasoning") or data.get("logprobs"):
            return None
        text: str = data["t"]
        if self.content is not None:
            self.content += text
        return text

    def feed(self, event: str, data: dict[str, Any]) -> list[Delta]:
        """What ``event`` adds to the answer. A token's empty text with no reasoning is a
        ``text`` delta of ""; with tools, text that may be a call is held until the end."""
        if event == "token":
            out = []
            text, thought = data["t"], data.get("reasoning")
            if thought:
                self.reasoning += thought
                out.append(Delta("reasoning", thought))
            if self.content is not None:
                self.content += text
            if text or not thought:
                entries = data.get("logprobs")
                if entries:
                    self.entries.extend(entries)
                if not self.tools:
                    out.append(Delta("text", text, logprobs=entries))
                else:
                    now = self.live.feed(text)
                    if now:
                        out.append(Delta("text", now))
            return out
        if event == "end":
            return self._end(data)
        if event == "error":
            self.error = data
            return [Delta("error", error=data)]
        if event == "downloading":
            return [Delta("downloading", info=data)]
        return []

    def _end(self, data: dict[str, Any]) -> list[Delta]:
        out = []
        self.stop_reason = str(data.get("stop_reason"))
        finish: Finish = FINISH.get(self.stop_reason, "stop")  # type: ignore[assignment]
        self.usage = Usage(int(data.get("tokens_in") or 0), int(data.get("tokens_out") or 0))
        if self.tools:
            calls = data.get("tool_calls") or []
            rest = self.live.rest(data.get("content"), bool(calls))
            if rest:
                out.append(Delta("text", rest))
            self.content = data.get("content")
            for call in calls:
                self.calls.append(call)
                out.append(Delta("tool_call", call={
                    "id": call["id"], "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"]}))
            if calls:
                finish = "tool_calls"
        self.finish = finish
        out.append(Delta("end", finish=finish))
        return out


def call_id() -> str:
    """A new tool call id (9 letters and digits: the form every template accepts)."""
    return new_call_id()


def require(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str
            ) -> Any:
    """``body[key]``, which must be a ``kind``; else a 400 ``{key} must be {what}``."""
    value = body.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,))):
        raise RequestError(400, f"{key} must be {what}", field=key)
    return value


__all__ = ["FINISH", "ChatRequest", "Delta", "Finish", "Turn", "Usage", "call_id",
           "check_calls", "message", "named_choice", "require", "tool", "tool_call",
           "tool_result"]
