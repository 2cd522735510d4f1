"""Worker daemon types (CONTRACT sections 2 and 3)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from rbees_core.api.common import (
    DEVICE_PATTERN,
    ID_PATTERN,
    MAX_EMBED_INPUTS,
    MAX_GRAMMAR_CHARS,
    MAX_SEED,
    MAX_TOKENS,
    MAX_TOP_LOGPROBS,
    SHELL_META,
    WORKER_MAX_PROMPT_CHARS,
    Priority,
)
from rbees_core.api.rules import (
    check_output_rules,
    check_sampling,
    check_turn,
    turn_chars,
)
from rbees_core.errors import InvalidParamsError
from rbees_core.reasoning import Effort, template_variables
from rbees_core.schema import field, limits
from rbees_core.tools import MAX_TOOLS

Role = Literal["system", "user", "assistant", "tool"]
StopReason = Literal["max_tokens", "stop", "eos"]
WorkerStateName = Literal["loading", "ready", "busy", "draining", "stopped", "failed"]


@attrs.frozen
class Message:
    """One chat turn; rendered with the model's own chat template."""

    role: Role
    content: str | None = field(
        default=None, max_length=WORKER_MAX_PROMPT_CHARS, forbid="\x00",
        doc="the text; null only on an assistant turn that has tool_calls")
    tool_calls: list[dict[str, Any]] | None = field(
        default=None, max_items=64,
        doc='an assistant turn\'s calls: [{id, type: "function", function: {name, arguments}}]')
    tool_call_id: str | None = field(default=None, max_length=128,
                                     doc="the call a tool message answers")
    name: str | None = field(default=None, max_length=128, doc="the tool a tool message is from")
    reasoning_content: str | None = field(
        default=None, max_length=WORKER_MAX_PROMPT_CHARS, forbid="\x00",
        doc="an assistant turn's reasoning (a thinking model's), for templates that show it")

    def chars(self) -> int:
        """Characters this turn adds to the prompt (content and call arguments)."""
        return turn_chars(self.content, self.tool_calls) + len(self.reasoning_content or "")

    def check(self) -> None:
        check_turn(self.role, self.content, self.tool_calls)
        if self.reasoning_content is not None and self.role != "assistant":
            raise InvalidParamsError("reasoning_content", "only an assistant turn has it")


@attrs.frozen
class ExecuteRequest:
    """Body of POST /v2/execute: one generation job."""

    job_id: str = attrs.field(
        metadata=limits(pattern=ID_PATTERN, doc="caller-chosen job identifier")
    )
    prompt: str | None = field(
        default=None,
        max_length=WORKER_MAX_PROMPT_CHARS,
        forbid="\x00",
        doc="raw prompt; exactly one of prompt and messages",
    )
    messages: list[Message] | None = field(default=None, max_items=256)
    max_tokens: int = field(
        default=256, minimum=1, maximum=MAX_TOKENS,
        doc="most tokens to generate; the worker clamps it to what the slot's context "
        "leaves after the prompt (the job then ends with max_tokens)")
    temperature: float = field(default=0.7, minimum=0, maximum=2)
    top_p: float = field(default=1.0, minimum=0, maximum=1)
    top_k: int = field(default=0, minimum=0, maximum=1_000_000)
    repetition_penalty: float = field(default=1.0, minimum=0.01, maximum=10)
    stop: list[str] = field(factory=list, max_items=4, item_max_length=100)
    presence_penalty: float = field(
        default=0.0, minimum=-2, maximum=2,
        doc="lowers the logits of tokens already generated (llama.cpp's penalties sampler, "
        "last 64 tokens)")
    frequency_penalty: float = field(
        default=0.0, minimum=-2, maximum=2,
        doc="lowers the logits of generated tokens by how often each came (last 64 tokens)")
    min_p: float = field(default=0.0, minimum=0, maximum=1,
                         doc="drop tokens less likely than min_p times the likeliest one")
    logit_bias: dict[str, Any] | None = field(
        default=None, doc='{"token id": bias from -100 to 100} added to the logits; -100 '
        "bans a token, 100 forces it")
    logprobs: bool = field(default=False, doc="token events carry each token's log "
                           "probability (log-softmax of the model's logits)")
    top_logprobs: int = field(default=0, minimum=0, maximum=MAX_TOP_LOGPROBS,
                              doc="and the likeliest alternatives of each (only with logprobs)")
    seed: int | None = field(default=None, minimum=0, maximum=MAX_SEED)
    json_schema: dict[str, Any] | None = field(
        default=None, doc="constrain the output to JSON valid under this JSON schema "
        "(backends with grammar support: llamacpp)")
    grammar: str | None = field(
        default=None, max_length=MAX_GRAMMAR_CHARS, forbid="\x00",
        doc="constrain the output to this GBNF grammar (root rule: root; llamacpp)")
    tools: list[dict[str, Any]] | None = field(
        default=None, max_items=MAX_TOOLS,
        doc='functions the model may call: [{type: "function", function: {name, '
        'description, parameters}}] (OpenAI\'s form); the calls come in the end event')
    tool_choice: str | dict[str, Any] | None = field(
        default=None, doc='"auto" (default with tools), "none", "required" or '
        '{type: "function", function: {name}}')
    parallel_tool_calls: bool = field(default=True, doc="whether one answer may call "
                                      "several tools")
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None, doc="further variables of the chat template's render, as llama.cpp's "
        'server takes them (e.g. {"enable_thinking": false} for Qwen3)')
    reasoning_effort: Effort | None = field(
        default=None, doc="OpenAI's reasoning effort, given to the chat template as the "
        'variable reasoning_effort; "none" also sets enable_thinking false')
    priority: Priority = field(
        default="interactive", doc="the job's lane: while an interactive job's prompt is "
        "read, the worker's batch jobs pause (the interactive one's first token comes as "
        "on an idle worker)")

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParamsError("prompt", "give exactly one of prompt and messages")
        check_output_rules(prompt=self.prompt, json_schema=self.json_schema,
                           grammar=self.grammar, tools=self.tools, tool_choice=self.tool_choice)
        check_sampling(logit_bias=self.logit_bias)
        if self.messages is not None:
            if not self.messages:
                raise InvalidParamsError("messages", "must not be empty")
            total = sum(m.chars() for m in self.messages)
            if total > WORKER_MAX_PROMPT_CHARS:
                raise InvalidParamsError(
                    "messages", f"must hold at most {WORKER_MAX_PROMPT_CHARS} characters"
                )
        if any(s == "" for s in self.stop):
            raise InvalidParamsError("stop", "must not contain empty strings")
        template_variables(self.chat_template_kwargs, self.reasoning_effort)
        if self.prompt is not None and (self.chat_template_kwargs or self.reasoning_effort):
            raise InvalidParamsError("chat_template_kwargs" if self.chat_template_kwargs
                                     else "reasoning_effort", "needs messages (a chat)")


def check_inputs(inputs: list[str], field: str = "input") -> None:
    """An embedding job's texts: at least one, none empty, no NUL. Raises
    :class:`InvalidParamsError` naming ``field``."""
    if not inputs:
        raise InvalidParamsError(field, "must hold at least one text")
    for i, text in enumerate(inputs):
        if not text:
            raise InvalidParamsError(field, f"input {i} is empty")
        if "\x00" in text:
            raise InvalidParamsError(field, f"input {i} contains a NUL character")


@attrs.frozen
class EmbedRequest:
    """Body of POST /v2/embed: one embedding job (an embedding worker only)."""

    job_id: str = attrs.field(
        metadata=limits(pattern=ID_PATTERN, doc="caller-chosen job identifier"))
    input: list[str] = field(
        factory=list, max_items=MAX_EMBED_INPUTS, item_max_length=WORKER_MAX_PROMPT_CHARS,
        doc="the texts to embed, all in one forward pass when they fit the worker's batch")

    def check(self) -> None:
        check_inputs(self.input)


@attrs.frozen
class CancelRequest:
    """Body of POST /v2/cancel."""

    job_id: str = attrs.field(metadata=limits(pattern=ID_PATTERN))


@attrs.frozen
class CoresRequest:
    """Body of POST /v2/cores: decode with ``threads`` threads on the CPUs ``cpus`` from the
    next step on (the worker's pool moves cores between its workers)."""

    threads: int = attrs.field(metadata=limits(minimum=1, maximum=1024))
    cpus: list[int] = attrs.field(metadata=limits(max_items=1024))


@attrs.frozen
class CoresState:
    """POST /v2/cores: the threads and CPU set the worker now runs on."""

    threads: int
    cpus: list[int]


@attrs.frozen
class Accepted:
    """A 202 answer."""

    accepted: bool = True
    job_id: str | None = None


@attrs.frozen
class ReadyState:
    """GET /v2/ready."""

    ready: bool
    state: WorkerStateName
    model: str | None = None
    backend: str | None = None
    device: str | None = None
    slots_total: int | None = None
    slots_free: int | None = None
    memory_bytes: int | None = None
    progress: float | None = None
    embedding: bool = field(default=False, doc="started with --embedding: serves POST "
                            "/v2/embed, not /v2/execute")


@attrs.frozen
class ReadyCallback:
    """Body the worker POSTs to its --callback-url once the model is loaded."""

    worker_id: str = attrs.field(metadata=limits(pattern=ID_PATTERN))
    model_ref: str = attrs.field(metadata=limits(max_length=512))
    backend: str = attrs.field(metadata=limits(pattern=ID_PATTERN))
    device: str = attrs.field(metadata=limits(pattern=DEVICE_PATTERN))
    uri: str = attrs.field(metadata=limits(max_length=512))
    slots_total: int = attrs.field(metadata=limits(minimum=1))
    memory_bytes: int = attrs.field(metadata=limits(minimum=0))
    memory_kind: Literal["vram", "unified", "ram"]
    pid: int = attrs.field(metadata=limits(minimum=1))
    embedding: bool = field(default=False, doc="an embedding worker (--embedding)")


# Event payloads (section 3); documented in OpenAPI and used to build the frames.
@attrs.frozen
class StartedEvent:
    job_id: str
    model: str
    worker_id: str
    queue_wait_ms: float


@attrs.frozen
class TokenEvent:
    t: str = attrs.field(metadata=limits(doc="text piece, whole UTF-8 characters"))
    i: int = attrs.field(metadata=limits(doc="piece index, from 0"))
    logprobs: list[dict[str, Any]] | None = field(
        default=None, doc="with logprobs: the entries of the tokens this piece completes, "
        "OpenAI's form [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]; "
        "a token whose text ends in a later piece comes with that piece")


@attrs.frozen
class MetricsEvent:
    tokens_out: int
    decode_ms: float
    tokens_per_s: float
    queue_depth: int


@attrs.frozen
class EndEvent:
    job_id: str
    tokens_in: int
    tokens_out: int
    decode_ms: float
    ttft_ms: float
    stop_reason: StopReason
    seed: int


@attrs.frozen
class EmbedEndEvent:
    """The ``end`` event of an embedding job (POST /v2/embed): its vectors, unit length,
    as base64 of little-endian float32, in the inputs' order."""

    job_id: str
    embeddings: list[str]
    dimensions: int
    tokens_in: int = attrs.field(metadata=limits(doc="tokens of every input together"))
    tokens: list[int] = attrs.field(metadata=limits(doc="tokens of each input"))
    forward_passes: int = attrs.field(metadata=limits(
        doc="forward passes the job took: 1 when every input fitted one batch"))
    tokens_out: int = 0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0


@attrs.frozen
class ErrorEvent:
    job_id: str
    code: str
    message: str
    retriable: bool


@attrs.frozen
class ProgressEvent:
    stage: str
    fraction: float


__all__ = [
    "SHELL_META",
    "Accepted",
    "CancelRequest",
    "EmbedEndEvent",
    "EmbedRequest",
    "EndEvent",
    "ErrorEvent",
    "ExecuteRequest",
    "Message",
    "MetricsEvent",
    "ProgressEvent",
    "ReadyCallback",
    "ReadyState",
    "StartedEvent",
    "TokenEvent",
]
