"""OpenAI-compatible endpoints of rbees-orcd: /v1/chat/completions and /v1/completions.

Jobs go through the same queue as /v2/tasks (interactive lane, cancelled when the client
disconnects). OpenAI's harmless fields that rbees does not support are ignored; values it
cannot honour are refused in OpenAI's error shape.
"""

from __future__ import annotations

import contextlib
import json
import time
from json.encoder import encode_basestring
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rbees_core import protocols, sse
from rbees_core.api import openapi
from rbees_core.errors import InvalidParamsError
from rbees_core.logprobs import CompletionLogprobs, LogprobsForm, chat_logprobs
from rbees_core.programs.openai_errors import OpenAIError, job_error, read_object
from rbees_core.protocols import ChatRequest, Delta, Jobs, JobStream, RequestError, Turn
from rbees_core.structured import response_format_schema
from rbees_core.tools import check_tool_calls

MAX_N = 8
#: Most alternatives per token of the legacy completions' ``logprobs`` (OpenAI's limit).
MAX_LEGACY_LOGPROBS = 5


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("echo"):
        raise OpenAIError(400, "echo is not supported", param="echo")
    if body.get("suffix"):
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if body.get("functions") or body.get("function_call"):
        raise OpenAIError(400, "functions are not supported; send tools", param="functions")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise OpenAIError(400, f"n must be an integer from 1 to {MAX_N}", param="n")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise OpenAIError(400, "stream_options must be an object", param="stream_options")
    # As on the native API: "yes" or 1 is no boolean (Python's truthiness would take it).
    flags = [("stream", body.get("stream"))]
    if opts is not None:
        flags.append(("stream_options.include_usage", opts.get("include_usage")))
    for name, value in flags:
        if value is not None and not isinstance(value, bool):
            raise OpenAIError(400, f"{name} must be true or false", param=name)


def _task(body: dict[str, Any], *, chat: bool) -> tuple[dict[str, Any], int]:
    _refuse_unsupported(body)
    if not isinstance(body.get("model"), str):
        raise OpenAIError(400, "model is required", param="model")
    req = ChatRequest(model=body["model"])
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "messages must be a non-empty array", param="messages")
        req.messages = [_message(m, i) for i, m in enumerate(messages)]
        req.max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise OpenAIError(400, "prompt must be a string", param="prompt")
        req.prompt = prompt
        req.max_tokens = body.get("max_tokens", 16)
    req.temperature, req.top_p = body.get("temperature"), body.get("top_p")
    req.top_k, req.seed = body.get("top_k"), body.get("seed")
    if body.get("keep_alive") is not None:  # Ollama's
        req.extra["keep_alive"] = body["keep_alive"]
    req.extra.update(_sampling(body, chat=chat))
    stop = body.get("stop")
    if stop is not None:
        req.stop = [stop] if isinstance(stop, str) else stop
    try:
        req.json_schema = response_format_schema(body.get("response_format"))
    except InvalidParamsError as exc:
        raise OpenAIError(400, exc.message, param=exc.field) from exc
    if body.get("grammar") is not None:  # GBNF, as llama.cpp's server takes it
        req.extra["grammar"] = body["grammar"]
    if chat and body.get("tools") is not None:
        req.tools = body["tools"]
        req.tool_choice = body.get("tool_choice")
        req.parallel_tool_calls = body.get("parallel_tool_calls")
    elif chat and body.get("tool_choice") not in (None, "none", "auto"):
        raise OpenAIError(400, "tool_choice needs tools", param="tool_choice")
    if chat:  # template variables, as llama.cpp's server takes them (rbees_core.reasoning)
        for key in ("chat_template_kwargs", "reasoning_effort"):
            if body.get(key) is not None:
                req.extra[key] = body[key]
    return req.task(), int(body.get("n", 1))


def _sampling(body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    """The task fields of the penalties, min_p, logit_bias and logprobs (their values are
    checked by :class:`TaskRequest`): chat's ``logprobs`` (a boolean) and ``top_logprobs``
    (0-20), completions' ``logprobs`` (0-5 alternatives per token)."""
    out = {key: body[key] for key in ("presence_penalty", "frequency_penalty", "min_p",
                                      "logit_bias") if body.get(key) is not None}
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if logprobs is not None and not isinstance(logprobs, bool):
            raise OpenAIError(400, "logprobs must be true or false", param="logprobs")
        if top and not logprobs:  # 0 or null without logprobs is harmless
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    elif logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not (
                0 <= logprobs <= MAX_LEGACY_LOGPROBS):
            raise OpenAIError(400, f"logprobs must be an integer from 0 to "
                              f"{MAX_LEGACY_LOGPROBS}", param="logprobs")
        logprobs, top = True, logprobs
    if logprobs:
        out["logprobs"] = True
        if top is not None:
            out["top_logprobs"] = top
    return out


def _message(m: Any, i: int) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant",
                                                         "developer", "tool"):
        raise OpenAIError(400, "each message needs a role of system, user, assistant or tool",
                          param=f"messages[{i}].role")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise OpenAIError(400, "only text content parts are supported",
                                  param=f"messages[{i}].content")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    calls = m.get("tool_calls") if m["role"] == "assistant" else None
    if not isinstance(content, str) and not (content is None and calls):
        raise OpenAIError(400, "content must be a string", param=f"messages[{i}].content")
    role = "system" if m["role"] == "developer" else m["role"]
    out: dict[str, Any] = {"role": role, "content": content}
    if calls:
        try:
            check_tool_calls(calls, field=f"messages[{i}].tool_calls")
        except InvalidParamsError as exc:
            raise OpenAIError(400, exc.message, param=exc.field) from exc
        out["tool_calls"] = [{"id": str(c.get("id", "")), "type": "function", "function": {
            "name": c["function"]["name"], "arguments": c["function"].get("arguments", "{}")}}
            for c in calls]
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                out[key] = m[key]
    if role == "assistant" and isinstance(m.get("reasoning_content"), str):
        out["reasoning_content"] = m["reasoning_content"]  # as this API answers it
    return out


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def _complete(request: Request, *, chat: bool) -> Response:
    orc = protocols.orchestrator(request)
    try:
        body = await read_object(request)
        task, n = _task(body, chat=chat)
        # not started after [orchestrator] max_queue_wait_s: DEADLINE_UNMET, a 503
        task = protocols.job_task(orc, task)
        job_ids = await protocols.submit(orc, task, n)
    except RequestError as exc:
        return OpenAIError.of(exc).response()
    jobs = Jobs(orc, job_ids)
    created = int(time.time())
    ident = ("chatcmpl-" if chat else "cmpl-") + job_ids[0].removeprefix("job-")
    model = task["model"]
    # With tools the answer is known once the job ends: the worker parses the calls out
    tooled = bool(task.get("tools")) and task.get("tool_choice") != "none"
    if body.get("stream"):
        opts = body.get("stream_options") or {}
        return _OpenAIStream(jobs, n, chat=chat, ident=ident, model=model, created=created,
                             usage=bool(opts.get("include_usage")), tools=tooled,
                             ping_s=orc.settings.sse_ping_interval_s,
                             logprobs=_logprobs_form(task, n)
                             )  # type: ignore[return-value]
    turns = [Turn(tools=tooled) for _ in range(n)]
    error = await protocols.collect(request, jobs, lambda i, e, d: turns[i].feed(e, d))
    if error is not None:
        return job_error(error).response()
    return JSONResponse(answer_body(task, turns, chat=chat, ident=ident, created=created))


def task_of(body: dict[str, Any], *, chat: bool) -> tuple[dict[str, Any], int]:
    """The ``POST /v2/tasks`` body and ``n`` of a chat (``chat``) or completions request
    body; raises :class:`OpenAIError` (400) for what it refuses. Also used by the batch
    runner (:mod:`.orcd_batch_runner`)."""
    return _task(body, chat=chat)


def answer_body(task: dict[str, Any], turns: list[Turn], *, chat: bool, ident: str,
                created: int) -> dict[str, Any]:
    """The non-streamed answer (``chat.completion`` or ``text_completion``) of ``task``'s
    jobs, one :class:`Turn` per choice, each fed to its terminal event."""
    choices = []
    forms = _logprobs_form(task, len(turns))
    usage = {"prompt_tokens": sum(t.usage.tokens_in for t in turns),
             "completion_tokens": sum(t.usage.tokens_out for t in turns)}
    for i, turn in enumerate(turns):
        logprobs = None if forms is None else forms[i](turn.entries)
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": turn.content}
            if turn.calls:
                message["tool_calls"] = turn.calls
            if turn.reasoning:
                message["reasoning_content"] = turn.reasoning
            choices.append({"index": i, "message": message, "finish_reason": turn.finish,
                            "logprobs": logprobs})
        else:
            choices.append({"index": i, "text": turn.content, "finish_reason": turn.finish,
                            "logprobs": logprobs})
    return {
        "id": ident, "object": "chat.completion" if chat else "text_completion",
        "created": created, "model": task["model"], "choices": choices,
        "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
    }


def _logprobs_form(task: dict[str, Any], n: int) -> list[LogprobsForm] | None:
    """Per choice, what makes its (or its chunk's) ``logprobs`` of the entries the token
    events carried; None when the task asked for none."""
    if not task.get("logprobs"):
        return None
    if "messages" in task:
        return [chat_logprobs] * n
    return [CompletionLogprobs(len(task["prompt"])).add for _ in range(n)]


class _OpenAIStream(JobStream):
    """OpenAI's chunks of ``n`` jobs: a role chunk per choice, then content, reasoning and
    tool call deltas as they come, a finish chunk per choice, the usage when asked, [DONE]."""

    def __init__(self, jobs: Jobs, n: int, *, chat: bool, ident: str, model: str,
                 created: int, usage: bool, tools: bool = False, ping_s: float = 15.0,
                 logprobs: list[LogprobsForm] | None = None) -> None:
        super().__init__(jobs, ping_s=ping_s)
        self.n, self.chat, self.ident = n, chat, ident
        self.model, self.created, self.usage, self.tools = model, created, usage, tools
        self.logprobs = logprobs
        self.turns = [Turn(tools=tools) for _ in range(n)]
        #: per choice, the bytes of a text delta's chunk around its JSON-encoded text, when
        #: that chunk is nothing else (no logprobs): no dict and json.dumps per token (this
        #: stream's layer in process, bench/protocols.py's stub: 9.2 -> 4.6 us per token)
        self.plain: list[tuple[bytes, bytes]] | None = None
        # a model name that UTF-8 cannot carry fails the usual way, at its first chunk
        with contextlib.suppress(UnicodeEncodeError):
            if logprobs is None or tools:
                self.plain = [self._around(i) for i in range(n)]

    def _around(self, index: int) -> tuple[bytes, bytes]:
        """What precedes and follows the text in choice ``index``'s text delta frame."""
        frame = self._chunk([self._choice(index, "", None)])
        field = b'"content": ""' if self.chat else b'"text": ""'
        # the last: the id and the model (client text) come before it, and only constants
        # after; a JSON string never holds the field with its quotes unescaped anyway
        head, _, tail = frame.rpartition(field)
        return head + field[:-2], tail

    def _plain_chunk(self, index: int, text: str) -> bytes:
        """Choice ``index``'s text delta chunk from :attr:`plain` (which must be set)."""
        assert self.plain is not None
        before, after = self.plain[index]
        return b"".join((before, encode_basestring(text).encode(), after))

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": self.ident, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return sse.frame(json.dumps(body, ensure_ascii=False)).encode()

    def _choice(self, index: int, text: str | None, finish: str | None,
                role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

    def head(self) -> bytes:
        if not self.chat:
            return b""
        return b"".join(self._chunk([self._choice(i, "", None, role=True)])
                        for i in range(self.n))

    def event(self, index: int, event: str, data: dict[str, Any]) -> bytes:
        if event == "token" and self.plain is not None:
            text = self.turns[index].text_only(data)
            if text is not None:  # no Delta per token (what _delta makes of it)
                return self._plain_chunk(index, text)
        chunk = b""
        calls = 0
        for delta in self.turns[index].feed(event, data):
            chunk += self._delta(index, delta, calls)
            calls += delta.kind == "tool_call"
        return chunk

    def _delta(self, index: int, delta: Delta, calls: int) -> bytes:
        if delta.kind == "reasoning":  # rbees_core.reasoning
            return self._chunk([{"index": index, "delta": {"reasoning_content": delta.text},
                                 "finish_reason": None, "logprobs": None}])
        if delta.kind == "text":
            if self.plain is not None:
                return self._plain_chunk(index, delta.text)
            choice = self._choice(index, delta.text, None)
            if self.logprobs is not None and not self.tools:
                choice["logprobs"] = self.logprobs[index](delta.logprobs or ())
            return self._chunk([choice])
        if delta.kind == "tool_call":  # as OpenAI streams them: id, type, name, then arguments
            call = delta.call or {}
            head = {"index": calls, "id": call["id"], "type": "function",
                    "function": {"name": call["name"], "arguments": ""}}
            tail = {"index": calls, "function": {"arguments": call["arguments"]}}
            return b"".join(self._chunk([{"index": index, "delta": {"tool_calls": [part]},
                                          "finish_reason": None, "logprobs": None}])
                            for part in (head, tail))
        if delta.kind == "end":
            return self._chunk([self._choice(index, None, delta.finish)])
        if delta.kind == "error":
            return sse.frame(json.dumps(job_error(delta.error or {}).body())).encode()
        if delta.kind == "downloading":  # pull on first use: a comment, as pings are
            info = delta.info or {}
            return sse.comment(f"downloading {info.get('model')} to pool {info.get('pool_id')} "
                               f"({info.get('bytes')} of {info.get('total')} bytes)")
        return b""

    def tail(self) -> bytes:
        out = b""
        if self.usage:
            usage = {"prompt_tokens": sum(t.usage.tokens_in for t in self.turns),
                     "completion_tokens": sum(t.usage.tokens_out for t in self.turns)}
            out += self._chunk([], usage={**usage, "total_tokens": usage["prompt_tokens"]
                                          + usage["completion_tokens"]})
        return out + sse.frame("[DONE]").encode()


OPERATIONS = [
    openapi.Operation("POST", "/v1/chat/completions", "OpenAI chat completions", scope="inference",
                      errors={"400": "invalid request (OpenAI error shape)",
                              "404": "model_not_found", "429": "queue_full",
                              "503": "the model cannot run now"}),
    openapi.Operation("POST", "/v1/completions", "OpenAI completions", scope="inference",
                      errors={"400": "invalid request (OpenAI error shape)",
                              "404": "model_not_found", "429": "queue_full",
                              "503": "the model cannot run now"}),
]


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
