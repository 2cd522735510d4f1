"""OpenAI-compatible endpoints of rbees-orcd: /v1/chat/completions and /v1/completions.

Jobs go through the same queue as /v2/tasks (interactive lane, cancelled when the client
disconnects). OpenAI's harmless fields that rbees does not support are ignored; values it
cannot honour are refused in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from rbees_core import sse
from rbees_core.api import openapi
from rbees_core.api.orchestrator import TaskRequest
from rbees_core.errors import InvalidParamsError, RbeesError
from rbees_core.logprobs import CompletionLogprobs, LogprobsForm, chat_logprobs
from rbees_core.orchestrator.channel import TERMINAL
from rbees_core.programs.openai_errors import OpenAIError, from_rbees, job_error, read_object
from rbees_core.programs.orcd_common import service
from rbees_core.schema import from_mapping
from rbees_core.structured import response_format_schema
from rbees_core.tools import LiveText, check_tool_calls

MAX_N = 8
#: The event name of a ping on a stream's queue (no job event has it).
PINGED = ""
#: Most alternatives per token of the legacy completions' ``logprobs`` (OpenAI's limit).
MAX_LEGACY_LOGPROBS = 5
FINISH = {"stop": "stop", "eos": "stop", "max_tokens": "length"}


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
    task: dict[str, Any] = {"model": body["model"], "priority": "interactive",
                            "cancel_on_disconnect": True}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "messages must be a non-empty array", param="messages")
        task["messages"] = [_message(m, i) for i, m in enumerate(messages)]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise OpenAIError(400, "prompt must be a string", param="prompt")
        task["prompt"] = prompt
        max_tokens = body.get("max_tokens", 16)
    if max_tokens is not None:
        task["max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "seed", "keep_alive"):  # keep_alive: Ollama's
        if body.get(key) is not None:
            task[key] = body[key]
    if body.get("top_k") is not None:
        task["top_k"] = body["top_k"]
    task.update(_sampling(body, chat=chat))
    stop = body.get("stop")
    if stop is not None:
        task["stop"] = [stop] if isinstance(stop, str) else stop
    try:
        schema = response_format_schema(body.get("response_format"))
    except InvalidParamsError as exc:
        raise OpenAIError(400, exc.message, param=exc.field) from exc
    if schema is not None:
        task["json_schema"] = schema
    if body.get("grammar") is not None:  # GBNF, as llama.cpp's server takes it
        task["grammar"] = body["grammar"]
    if chat and body.get("tools") is not None:
        task["tools"] = body["tools"]
        for key in ("tool_choice", "parallel_tool_calls"):
            if body.get(key) is not None:
                task[key] = body[key]
    elif chat and body.get("tool_choice") not in (None, "none", "auto"):
        raise OpenAIError(400, "tool_choice needs tools", param="tool_choice")
    if chat:  # template variables, as llama.cpp's server takes them (rbees_core.reasoning)
        for key in ("chat_template_kwargs", "reasoning_effort"):
            if body.get(key) is not None:
                task[key] = body[key]
    return task, int(body.get("n", 1))


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


async def _submit_all(request: Request, task: dict[str, Any], n: int) -> list[str]:
    svc = service(request)
    job_ids = []
    try:
        for i in range(n):
            body = dict(task)
            seed = body.get("seed")
            # one seed per choice; a seed that is no integer in range is left for
            # from_mapping to refuse with a 400 naming it (int("") was a 500)
            if n > 1 and type(seed) is int and 0 <= seed < 2**63:
                body["seed"] = (seed + i) % 2**63
            req = from_mapping(TaskRequest, body)
            job_ids.append((await svc.submit(req, refuse_unknown=True)).job_id)
    except InvalidParamsError as exc:
        raise OpenAIError(400, exc.message, param=exc.field) from exc
    except RbeesError as exc:
        for job_id in job_ids:
            await svc.cancel(job_id)
        raise from_rbees(exc) from exc
    return job_ids


class _Jobs:
    """Follows n jobs' channels and yields (choice index, event, data) in arrival order."""

    def __init__(self, request: Request, job_ids: list[str]) -> None:
        self.svc = service(request)
        self.job_ids = job_ids
        self.queue: asyncio.Queue[tuple[int, str, dict[str, Any]]] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._follow(i, j)) for i, j in enumerate(job_ids)]

    async def _follow(self, index: int, job_id: str) -> None:
        following = await self.svc.follow(job_id, 0)
        queue = following.live
        try:
            for _, event, data in following.backlog:
                self.queue.put_nowait((index, event, data))
                if event in TERMINAL:
                    return
            while queue is not None:
                _, event, data = await queue.get()
                self.queue.put_nowait((index, event, data))
                if event in TERMINAL:
                    return
        finally:
            following.close()

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        for job_id in self.job_ids:
            with contextlib.suppress(RbeesError):
                await self.svc.cancel(job_id)


async def _cancel_on_disconnect(request: Request, jobs: _Jobs, n: int) -> None:
    """A non-streamed request whose client goes away cancels its jobs, queued or running
    (the streamed ones watch for it in :class:`_OpenAIStream`); the handler waiting for
    them is then let go."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    await jobs.cancel()
    for index in range(n):
        jobs.queue.put_nowait((index, "error", {"code": "CANCELLED",
                                                "message": "the client went away"}))


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def _complete(request: Request, *, chat: bool) -> Response:
    try:
        body = await read_object(request)
        task, n = _task(body, chat=chat)
        # not started after [orchestrator] max_queue_wait_s: DEADLINE_UNMET, a 503
        task["deadline_ms"] = round(service(request).settings.max_queue_wait_s * 1000)
        job_ids = await _submit_all(request, task, n)
    except OpenAIError as exc:
        return exc.response()
    jobs = _Jobs(request, job_ids)
    created = int(time.time())
    ident = ("chatcmpl-" if chat else "cmpl-") + job_ids[0].removeprefix("job-")
    model = task["model"]
    # With tools the answer is known once the job ends: the worker parses the calls out
    tooled = bool(task.get("tools")) and task.get("tool_choice") != "none"
    if body.get("stream"):
        opts = body.get("stream_options") or {}
        return _OpenAIStream(jobs, n, chat=chat, ident=ident, model=model, created=created,
                             usage=bool(opts.get("include_usage")), tools=tooled,
                             ping_s=service(request).settings.sse_ping_interval_s,
                             logprobs=_logprobs_form(task, n)
                             )  # type: ignore[return-value]
    texts: list[str | None] = [""] * n
    entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    thoughts = [""] * n  # reasoning_content (rbees_core.reasoning)
    calls: list[list[dict[str, Any]] | None] = [None] * n
    finish: list[str | None] = [None] * n
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    done = 0
    error: dict[str, Any] | None = None
    watcher = asyncio.create_task(_cancel_on_disconnect(request, jobs, n))
    while done < n:
        index, event, data = await jobs.queue.get()
        if event == "token":
            texts[index] += data["t"]
            thoughts[index] += data.get("reasoning", "")
            if data["t"] or not data.get("reasoning"):  # as streamed: the content's pieces
                entries[index].extend(data.get("logprobs") or ())
        elif event == "end":
            finish[index] = FINISH.get(str(data.get("stop_reason")), "stop")
            if tooled:
                texts[index], calls[index] = data.get("content"), data.get("tool_calls")
                finish[index] = "tool_calls" if calls[index] else finish[index]
            usage["prompt_tokens"] += int(data.get("tokens_in") or 0)
            usage["completion_tokens"] += int(data.get("tokens_out") or 0)
            done += 1
        elif event == "error":
            error = error or data
            done += 1
    watcher.cancel()
    if error is not None:
        return job_error(error).response()
    choices = []
    forms = _logprobs_form(task, n)
    for i in range(n):
        logprobs = None if forms is None else forms[i](entries[i])
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": texts[i]}
            if calls[i]:
                message["tool_calls"] = calls[i]
            if thoughts[i]:
                message["reasoning_content"] = thoughts[i]
            choices.append({"index": i, "message": message, "finish_reason": finish[i],
                            "logprobs": logprobs})
        else:
            choices.append({"index": i, "text": texts[i], "finish_reason": finish[i],
                            "logprobs": logprobs})
    return JSONResponse({
        "id": ident, "object": "chat.completion" if chat else "text_completion",
        "created": created, "model": model, "choices": choices,
        "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
    })


def _logprobs_form(task: dict[str, Any], n: int) -> list[LogprobsForm] | None:
    """Per choice, what makes its (or its chunk's) ``logprobs`` of the entries the token
    events carried; None when the task asked for none."""
    if not task.get("logprobs"):
        return None
    if "messages" in task:
        return [chat_logprobs] * n
    return [CompletionLogprobs(len(task["prompt"])).add for _ in range(n)]


class _OpenAIStream:
    def __init__(self, jobs: _Jobs, n: int, *, chat: bool, ident: str, model: str,
                 created: int, usage: bool, tools: bool = False, ping_s: float = 15.0,
                 logprobs: list[LogprobsForm] | None = None) -> None:
        self.jobs, self.n, self.chat, self.ident = jobs, n, chat, ident
        self.ping_s = ping_s
        self.model, self.created, self.usage, self.tools = model, created, usage, tools
        self.logprobs = logprobs
        self.live = [LiveText() for _ in range(n)]  # with tools: what may stream as content

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

    def _tool_chunks(self, index: int, end: dict[str, Any], finish: str) -> tuple[bytes, str]:
        """The deltas of a job with tools, sent when it ends (its ``end`` event carries the
        content and calls the worker parsed): the content not streamed yet (see
        :class:`~rbees_core.tools.LiveText`), then each call as OpenAI streams them, its id,
        type and name first, its arguments next."""
        out = b""
        calls = end.get("tool_calls") or []
        content = self.live[index].rest(end.get("content"), bool(calls))
        if content:
            out += self._chunk([self._choice(index, content, None)])
        for i, call in enumerate(calls):
            head = {"index": i, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            tail = {"index": i, "function": {"arguments": call["function"]["arguments"]}}
            for part in (head, tail):
                out += self._chunk([{"index": index, "delta": {"tool_calls": [part]},
                                     "finish_reason": None, "logprobs": None}])
        return out, "tool_calls" if calls else finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        gone = asyncio.Event()
        cancel: Callable[[], Any] = self.jobs.cancel

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            await cancel()

        watcher = asyncio.create_task(watch())
        pinger = sse.Pinger(self.jobs.queue, (-1, PINGED, {}), self.ping_s)
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        try:
            if self.chat:
                await send({"type": "http.response.body", "more_body": True, "body": b"".join(
                    self._chunk([self._choice(i, "", None, role=True)]) for i in range(self.n))})
            done = 0
            while done < self.n and not gone.is_set():
                index, event, data = await self.jobs.queue.get()
                chunk = b""
                if event == "token" and data.get("reasoning"):  # rbees_core.reasoning
                    chunk = self._chunk([{"index": index, "delta": {
                        "reasoning_content": data["reasoning"]}, "finish_reason": None,
                        "logprobs": None}])
                if event == "token" and not self.tools and (
                        data["t"] or not data.get("reasoning")):
                    choice = self._choice(index, data["t"], None)
                    if self.logprobs is not None:
                        choice["logprobs"] = self.logprobs[index](data.get("logprobs") or ())
                    chunk += self._chunk([choice])
                elif event == "token" and self.tools:
                    now = self.live[index].feed(data["t"])
                    chunk += self._chunk([self._choice(index, now, None)]) if now else b""
                elif event == "end":
                    done += 1
                    usage["prompt_tokens"] += int(data.get("tokens_in") or 0)
                    usage["completion_tokens"] += int(data.get("tokens_out") or 0)
                    finish = FINISH.get(str(data.get("stop_reason")), "stop")
                    if self.tools:
                        chunk, finish = self._tool_chunks(index, data, finish)
                    chunk += self._chunk([self._choice(index, None, finish)])
                elif event == "error":
                    done += 1
                    chunk = sse.frame(json.dumps(job_error(data).body())).encode()
                elif event == PINGED:
                    chunk = sse.PING
                elif event == "downloading":  # pull on first use: a comment, as pings are
                    chunk = sse.comment(
                        f"downloading {data.get('model')} to pool {data.get('pool_id')} "
                        f"({data.get('bytes')} of {data.get('total')} bytes)")
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    pinger.touch()
            if not gone.is_set():
                tail = b""
                if self.usage:
                    tail += self._chunk([], usage={
                        **usage, "total_tokens": usage["prompt_tokens"]
                        + usage["completion_tokens"]})
                tail += sse.frame("[DONE]").encode()
                await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:
            await cancel()
        finally:
            pinger.close()
            watcher.cancel()


OPERATIONS = [
    openapi.Operation("POST", "/v1/chat/completions", "OpenAI chat completions",
                      errors={"400": "invalid request (OpenAI error shape)",
                              "404": "model_not_found", "429": "queue_full",
                              "503": "the model cannot run now"}),
    openapi.Operation("POST", "/v1/completions", "OpenAI completions",
                      errors={"400": "invalid request (OpenAI error shape)",
                              "404": "model_not_found", "429": "queue_full",
                              "503": "the model cannot run now"}),
]


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
