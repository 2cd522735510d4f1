"""Ollama's ``/api/chat`` and ``/api/generate`` over the shared protocol layer.

Each request is one job of rbees-orcd's queue, built and followed by
:mod:`rbees_core.protocols` as OpenAI's chat is (interactive lane, cancelled when the client
goes, tool calls parsed by the worker, structured output through ``json_schema``, reasoning
apart from content): this module only reads Ollama's fields and writes Ollama's answers.
Streamed answers are NDJSON, one object a line, the last with ``done: true`` and the
counts; a job that fails once the stream has begun ends it with ``{"error": ...}``.
Field by field: docs/protocols.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rbees_api_ollama.common import (
    NDJSON,
    OllamaError,
    boolean,
    model_name,
    ndjson_line,
    rbees_model,
    read_request,
    timestamp,
)
from rbees_core import protocols as p
from rbees_core.reasoning import EFFORTS
from rbees_core.structured import ANY_OBJECT, check_schema

#: Ollama's sampling options and the task fields they set (the rest are a worker's load
#: settings, or samplers rbees has not: ignored).
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
           "min_p": "min_p", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty", "repeat_penalty": "repetition_penalty",
           "num_predict": "max_tokens", "stop": "stop"}
#: task field -> the request field it came from, for the messages of 400s
FIELDS = {task: f"options.{option}" for option, task in OPTIONS.items()}
DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop"}


def error_body(exc: p.RequestError) -> dict[str, Any]:
    """Ollama's error shape for a :class:`~rbees_core.protocols.RequestError`."""
    field = FIELDS.get(exc.field or "", exc.field)
    if field and field not in exc.message and exc.status == 400:
        return {"error": f"{field}: {exc.message}"}
    return {"error": exc.message}


def _sampling(options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ChatRequest fields, task extras)`` of Ollama's ``options``; 400 for no object."""
    if options is None:
        return {}, {}
    if not isinstance(options, Mapping):
        raise OllamaError(400, "options must be an object")
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for option, task in OPTIONS.items():
        value = options.get(option)
        if value is None:
            continue
        if option == "num_predict" and isinstance(value, int) and not isinstance(
                value, bool) and value <= 0:
            continue  # -1: no limit, -2: fill the context; the worker's limit is ours
        if option == "stop":
            value = [value] if isinstance(value, str) else value
        if task in ("temperature", "top_p", "top_k", "seed", "stop", "max_tokens"):
            fields[task] = value
        else:
            extra[task] = value
    return fields, extra


def _schema(fmt: Any) -> dict[str, Any] | None:
    """The JSON schema of Ollama's ``format``: ``"json"`` any object, a schema itself."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return dict(ANY_OBJECT)
    if isinstance(fmt, Mapping):
        try:
            check_schema(fmt, field="format")
        except Exception as exc:  # InvalidParamsError: its message names the problem
            raise OllamaError(400, f"format: {getattr(exc, 'message', exc)}") from exc
        return dict(fmt)
    raise OllamaError(400, 'format must be "json" or a JSON schema')


def _think(body: dict[str, Any]) -> tuple[bool | None, dict[str, Any]]:
    """``(ChatRequest.think, extras)`` of Ollama's ``think``: true, false, or an effort."""
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return think, {}
    if isinstance(think, str) and think in EFFORTS and think != "none":
        return None, {"reasoning_effort": think}
    raise OllamaError(400, "think must be true, false, \"low\", \"medium\" or \"high\"")


def _tools(raw: Any) -> list[dict[str, Any]] | None:
    if raw is None or raw == []:  # the ollama package sends [] for no tools
        return None
    if not isinstance(raw, list):
        raise OllamaError(400, "tools must be an array")
    out = []
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise OllamaError(400, f"tools[{i}] must be {{type: function, function: {{name, "
                              "parameters}}}")
        params = function.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise OllamaError(400, f"tools[{i}].function.parameters must be an object")
        description = function.get("description")
        out.append(p.tool(function["name"], params,
                          description if isinstance(description, str) else None))
    return out


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama's messages in the task's form. Ollama's tool calls carry no id: each gets
    one, and a ``tool`` message answers the first open call of its ``tool_name`` (else the
    first open call)."""
    if not isinstance(raw, list):
        raise OllamaError(400, "messages must be an array")
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) not answered yet
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise OllamaError(400, f"messages[{i}].role must be system, user, assistant or "
                              "tool")
        assert isinstance(m, Mapping)
        if m.get("images"):
            raise OllamaError(400, f"messages[{i}].images: images are not supported")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise OllamaError(400, f"messages[{i}].content must be a string")
        if role == "tool":
            name = m.get("tool_name", m.get("name"))
            match = next((c for c in open_calls if c[1] == name), None) or (
                open_calls[0] if open_calls else None)
            if match is not None:
                open_calls.remove(match)
            call_id = match[0] if match is not None else p.call_id()
            out.append(p.tool_result(call_id, content, name if isinstance(name, str)
                                     else (match[1] if match else None)))
            continue
        calls = m.get("tool_calls") if role == "assistant" else None
        built = []
        for j, call in enumerate(calls or ()):
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise OllamaError(400, f"messages[{i}].tool_calls[{j}] must be {{function: "
                                  "{name, arguments}}")
            arguments = function.get("arguments") or {}
            if not isinstance(arguments, Mapping | str):
                raise OllamaError(400, f"messages[{i}].tool_calls[{j}].function.arguments "
                                  "must be an object")
            ident = call.get("id") if isinstance(call.get("id"), str) else p.call_id()
            built.append(p.tool_call(ident, function["name"], arguments))
            open_calls.append((ident, function["name"]))
        if built:
            p.check_calls(built, f"messages[{i}].tool_calls")
        thinking = m.get("thinking") if role == "assistant" else None
        out.append(p.message(role, content or (None if built else ""), tool_calls=built or None,
                             reasoning=thinking if isinstance(thinking, str) else None))
    return out


def _request(body: dict[str, Any], model: str, *, chat: bool) -> p.ChatRequest | None:
    """The request as rbees runs it; None for Ollama's "load" request (no messages, or an
    empty prompt), which loads nothing and is answered at once."""
    fields, extra = _sampling(body.get("options"))
    think, more = _think(body)
    extra.update(more)
    for key in ("keep_alive", "logprobs", "top_logprobs"):
        if body.get(key) is not None:
            extra[key] = body[key]
    if body.get("images"):
        raise OllamaError(400, "images are not supported")
    schema = _schema(body.get("format"))
    tools = _tools(body.get("tools")) if chat else None
    choice = body.get("tool_choice")  # not Ollama's: as OpenAI's, to force a call
    if choice is not None and not tools:
        raise OllamaError(400, "tool_choice needs tools")
    if chat:
        messages = _messages(body.get("messages") or [])
        if not messages:
            return None
        return p.ChatRequest(model=model, messages=messages, tools=tools, tool_choice=choice,
                             json_schema=schema, think=think, extra=extra, **fields)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise OllamaError(400, "prompt must be a string")
    if body.get("suffix"):
        raise OllamaError(400, "suffix is not supported (no fill-in-the-middle)")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise OllamaError(400, "system must be a string")
    if not prompt:
        return None
    if boolean(body, "raw", False):
        return p.ChatRequest(model=model, prompt=prompt, json_schema=schema, think=think,
                             extra=extra, **fields)
    messages = [p.message("system", system)] if system else []
    messages.append(p.message("user", prompt))
    return p.ChatRequest(model=model, messages=messages, json_schema=schema, think=think,
                         extra=extra, **fields)


def _logprobs(entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"token": e.get("token"), "logprob": e.get("logprob"),
             "top_logprobs": [{"token": t.get("token"), "logprob": t.get("logprob")}
                              for t in e.get("top_logprobs") or ()]} for e in entries or ()]


def _calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls as Ollama writes them: arguments an object."""
    out = []
    for i, call in enumerate(calls):
        name = call["function"]["name"] if "function" in call else call["name"]
        text = call["function"]["arguments"] if "function" in call else call["arguments"]
        try:
            arguments = json.loads(text) if isinstance(text, str) else text
        except ValueError:
            arguments = {}
        out.append({"id": call.get("id"), "function": {"index": i, "name": name,
                                                       "arguments": arguments}})
    return out


class _Timing:
    """Ollama's durations, in nanoseconds, as rbees-orcd sees them."""

    def __init__(self) -> None:
        self.start = time.monotonic_ns()
        self.first: int | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.monotonic_ns()

    def counts(self, usage: p.Usage) -> dict[str, Any]:
        end = time.monotonic_ns()
        first = self.first or end
        return {"total_duration": end - self.start, "load_duration": 0,
                "prompt_eval_count": usage.tokens_in,
                "prompt_eval_duration": first - self.start,
                "eval_count": usage.tokens_out, "eval_duration": end - first}


class _Answer:
    """How one answer is written: chat's ``message`` or generate's ``response``."""

    def __init__(self, name: str, *, chat: bool, thinking: bool) -> None:
        self.name, self.chat, self.thinking = name, chat, thinking

    def line(self, text: str = "", *, thought: str = "", calls: list[dict[str, Any]] | None
             = None, done: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.name, "created_at": timestamp()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thought and self.thinking:
                message["thinking"] = thought
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        else:
            out["response"] = text
            if thought and self.thinking:
                out["thinking"] = thought
        out["done"] = done
        return out


class _Stream(p.JobStream):
    """NDJSON lines of one job: its text and thoughts as they come, its tool calls when it
    ends, then the ``done`` line with the counts."""

    media_type = NDJSON.encode()
    ping = None

    def __init__(self, jobs: p.Jobs, answer: _Answer, *, tools: bool, timing: _Timing,
                 logprobs: bool) -> None:
        super().__init__(jobs, ping_s=0)
        self.answer, self.timing, self.logprobs = answer, timing, logprobs
        self.turn = p.Turn(tools=tools)

    def event(self, index: int, event: str, data: dict[str, Any]) -> bytes:
        out = b""
        calls: list[dict[str, Any]] = []
        for delta in self.turn.feed(event, data):
            if (delta.kind == "text" and delta.text) or (
                    delta.kind == "reasoning" and self.answer.thinking):
                self.timing.token()
                line = self.answer.line(delta.text if delta.kind == "text" else "",
                                        thought=delta.text if delta.kind == "reasoning"
                                        else "")
                if self.logprobs and delta.logprobs:
                    line["logprobs"] = _logprobs(delta.logprobs)
                out += ndjson_line(line)
            elif delta.kind == "tool_call" and delta.call is not None:
                calls.append(delta.call)
            elif delta.kind == "end":
                if calls:
                    out += ndjson_line(self.answer.line(calls=_calls(calls)))
                last = self.answer.line(done=True)
                last["done_reason"] = DONE_REASON.get(delta.finish or "stop", "stop")
                last.update(self.timing.counts(self.turn.usage))
                out += ndjson_line(last)
            elif delta.kind == "error" and delta.error is not None:
                out += ndjson_line(error_body(p.job_error(delta.error)))
        return out


async def chat(request: Request) -> Response:
    """``POST /api/chat``."""
    return await _answer(request, chat=True)


async def generate(request: Request) -> Response:
    """``POST /api/generate``."""
    return await _answer(request, chat=False)


async def _answer(request: Request, *, chat: bool) -> Response:
    timing = _Timing()
    try:
        body = await read_request(request)
        name = model_name(body)
        stream = boolean(body, "stream", True)
        req = _request(body, rbees_model(request, name), chat=chat)
        answer = _Answer(name, chat=chat, thinking=body.get("think") is not False)
        if req is None:  # Ollama's "load" request
            line = answer.line(done=True)
            line["done_reason"] = "load"
            return JSONResponse(line)
        orc = p.orchestrator(request)
        job_ids = await p.submit(orc, p.job_task(orc, req.task()))
    except OllamaError as exc:
        return exc.response()
    except p.RequestError as exc:
        if exc.code == "MODEL_NOT_FOUND":  # as Ollama words it, naming the name sent
            return OllamaError(404, f"model '{name}' not found").response()
        return exc.response(error_body)
    jobs = p.Jobs(orc, job_ids)
    logprobs = bool(body.get("logprobs"))
    if stream:
        return _Stream(jobs, answer, tools=req.tooled, timing=timing,  # type: ignore[return-value]
                       logprobs=logprobs)
    turn = p.Turn(tools=req.tooled)

    def feed(index: int, event: str, data: dict[str, Any]) -> None:
        if event == "token":
            timing.token()
        turn.feed(event, data)

    error = await p.collect(request, jobs, feed)
    if error is not None:
        return p.job_error(error).response(error_body)
    line = answer.line(turn.content or "", thought=turn.reasoning,
                       calls=_calls(turn.calls) if turn.calls else None, done=True)
    line["done_reason"] = DONE_REASON.get(turn.finish or "stop", "stop")
    if logprobs:
        line["logprobs"] = _logprobs(turn.entries)
    line.update(timing.counts(turn.usage))
    return JSONResponse(line)


__all__ = ["chat", "error_body", "generate"]
