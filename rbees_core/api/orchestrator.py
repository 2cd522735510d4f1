"""Orchestrator daemon types (CONTRACT section 5), as served by rbees-orcd.

Requests (:class:`TaskRequest`) are built with :func:`rbees_core.schema.from_mapping`, which
enforces the section 1 limits carried by the fields and then the cross-field rules in
``check()``. Answers (:class:`TaskAccepted`, :class:`JobRecord`, :class:`JobList`) are built
by the daemon from :mod:`rbees_core.orchestrator` and serialised with
:func:`rbees_core.schema.to_dict`. A pool's heartbeat is the pool's own state
(:class:`rbees_core.api.pool.PoolHeartbeat`), read with the same limits. Timestamps are Unix
epoch seconds (float).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import attrs

from rbees_core.api.common import (
    DEVICE_PATTERN,
    ID_PATTERN,
    MAX_EMBED_INPUTS,
    MAX_GRAMMAR_CHARS,
    MAX_MODEL_REF,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TOKENS,
    MAX_TOP_LOGPROBS,
    SHELL_META,
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
from rbees_core.structured import check_schema
from rbees_core.tools import MAX_TOOLS

JobStatus = Literal["queued", "dispatched", "running", "completed", "failed", "cancelled"]
Role = Literal["system", "user", "assistant", "tool"]
StopReason = Literal["max_tokens", "stop", "eos"]

#: Job states in which nothing changes any more.
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
#: Every job state, in the order of the state machine.
JOB_STATUSES: tuple[str, ...] = (
    "queued", "dispatched", "running", "completed", "failed", "cancelled",
)
#: A deadline longer than a day is a mistake, not a deadline.
MAX_DEADLINE_MS = 86_400_000
_NOT_ID_CHAR = r"[^A-Za-z0-9_.-]"
#: Device names: ``cpu``, ``cuda``, ``cuda:0``, ``metal``, ``mps`` (an identifier plus ``:``).


@attrs.frozen
class TaskMessage:
    """One chat turn of a task; rendered with the model's own chat template by the worker."""

    role: Role
    content: str | None = field(
        default=None, max_length=MAX_PROMPT_CHARS, forbid="\x00",
        doc="the text; null only on an assistant turn that has tool_calls")
    tool_calls: list[dict[str, Any]] | None = field(
        default=None, max_items=64,
        doc='an assistant turn\'s calls: [{id, type: "function", function: {name, arguments}}]')
    tool_call_id: str | None = field(default=None, max_length=128,
                                     doc="the call a tool message answers")
    name: str | None = field(default=None, max_length=128, doc="the tool a tool message is from")
    reasoning_content: str | None = field(
        default=None, max_length=MAX_PROMPT_CHARS, forbid="\x00",
        doc="an assistant turn's reasoning (a thinking model's), for templates that show it")

    def chars(self) -> int:
        """Characters this turn adds to the prompt (content and call arguments)."""
        return turn_chars(self.content, self.tool_calls) + len(self.reasoning_content or "")

    def check(self) -> None:
        check_turn(self.role, self.content, self.tool_calls)
        if self.reasoning_content is not None and self.role != "assistant":
            raise InvalidParamsError("reasoning_content", "only an assistant turn has it")


@attrs.frozen
class Placement:
    """Where a job may or should run. Every field narrows or biases the scheduler's choice."""

    pool: str | None = field(default=None, pattern=ID_PATTERN, doc="run only on this pool")
    device: str | None = field(
        default=None, pattern=DEVICE_PATTERN,
        doc='run only on this device ("cpu", "cuda:0", ...)'
    )
    prefer_pools: list[str] = field(
        factory=list, max_items=64, item_max_length=128, forbid=_NOT_ID_CHAR,
        doc="pools to try first, in order",
    )
    avoid_pools: list[str] = field(
        factory=list, max_items=64, item_max_length=128, forbid=_NOT_ID_CHAR,
        doc="pools never to use",
    )


@attrs.frozen
class TaskRequest:
    """Body of POST /v2/tasks: one generation job for the orchestrator's queue."""

    model: str = attrs.field(
        metadata=limits(
            min_length=1, max_length=MAX_MODEL_REF, forbid=SHELL_META,
            doc="model reference (catalog name, pkg:, file: ...)",
        )
    )
    prompt: str | None = field(
        default=None, max_length=MAX_PROMPT_CHARS, forbid="\x00",
        doc="raw prompt; exactly one of prompt and messages",
    )
    messages: list[TaskMessage] | None = field(default=None, max_items=256)
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
    seed: int | None = field(
        default=None, minimum=0, maximum=MAX_SEED,
        doc="sampling seed; chosen and recorded by the orchestrator when missing",
    )
    priority: Priority = field(default="interactive", doc="queue lane")
    deadline_ms: int | None = field(
        default=None, minimum=1, maximum=MAX_DEADLINE_MS,
        doc="milliseconds from admission by which the job must have started (DEADLINE_UNMET)",
    )
    placement: Placement | None = None
    cancel_on_disconnect: bool = field(
        default=False, doc="cancel the job when the client of its live event stream goes away"
    )
    json_schema: dict[str, Any] | None = field(
        default=None, doc="constrain the output to JSON valid under this JSON schema "
        "(workers whose backend has grammar support: llamacpp)")
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
    input: list[str] | None = field(
        default=None, max_items=MAX_EMBED_INPUTS, item_max_length=MAX_PROMPT_CHARS,
        doc="texts to embed: an embedding job (instead of prompt or messages), run on an "
            "embedding worker; its end event carries the vectors")
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None, doc="further variables of the chat template's render, as llama.cpp's "
        'server takes them (e.g. {"enable_thinking": false} for Qwen3)')
    reasoning_effort: Effort | None = field(
        default=None, doc="OpenAI's reasoning effort, given to the chat template as the "
        'variable reasoning_effort; "none" also sets enable_thinking false')
    keep_alive: str | int | float | None = field(
        default=None, doc='how long the worker stays loaded after this job (Ollama\'s '
        'keep_alive): a duration ("5m", "30s", "1h30m"), a number of seconds, 0 (unload '
        'right after the job) or -1 (keep it loaded); default: rbees-orcd\'s keep_alive')

    def check(self) -> None:
        """Rules across fields; raises :class:`InvalidParamsError` naming the field."""
        from rbees_core.durations import check_keep_alive

        check_keep_alive(self.keep_alive)
        ref = self.model.replace("\\", "/")
        if ".." in ref.split("/"):
            raise InvalidParamsError("model", "must not contain '..'")
        if self.input is not None:
            self._check_embedding()
            self._check_placement()
            return
        if (self.prompt is None) == (self.messages is None):
            raise InvalidParamsError("prompt", "give exactly one of prompt and messages")
        if self.messages is not None:
            if not self.messages:
                raise InvalidParamsError("messages", "must not be empty")
            if sum(m.chars() for m in self.messages) > MAX_PROMPT_CHARS:
                raise InvalidParamsError(
                    "messages", f"must hold at most {MAX_PROMPT_CHARS} characters"
                )
        if any(s == "" for s in self.stop):
            raise InvalidParamsError("stop", "must not contain empty strings")
        check_output_rules(prompt=self.prompt, json_schema=self.json_schema,
                           grammar=self.grammar, tools=self.tools, tool_choice=self.tool_choice)
        check_sampling(logit_bias=self.logit_bias)
        if self.json_schema is not None:
            if len(json.dumps(self.json_schema)) > MAX_GRAMMAR_CHARS:
                raise InvalidParamsError("json_schema", f"must be at most {MAX_GRAMMAR_CHARS} "
                                         "characters of JSON")
            check_schema(self.json_schema, field="json_schema")
        template_variables(self.chat_template_kwargs, self.reasoning_effort)
        if self.prompt is not None and (self.chat_template_kwargs or self.reasoning_effort):
            raise InvalidParamsError("chat_template_kwargs" if self.chat_template_kwargs
                                     else "reasoning_effort", "needs messages (a chat)")
        self._check_placement()

    def _check_placement(self) -> None:
        if self.placement is not None:
            p = self.placement
            for name, pools in (("prefer_pools", p.prefer_pools), ("avoid_pools", p.avoid_pools)):
                if any(pool == "" for pool in pools):
                    raise InvalidParamsError(f"placement.{name}", "must not contain empty ids")
            if p.pool is not None and p.pool in p.avoid_pools:
                raise InvalidParamsError(
                    "placement.avoid_pools", f"avoids the pinned pool {p.pool}"
                )

    def _check_embedding(self) -> None:
        from rbees_core.api.worker import check_inputs

        if self.prompt is not None or self.messages is not None:
            raise InvalidParamsError("input", "give input, or prompt or messages, not both")
        for name in ("json_schema", "grammar", "tools"):
            if getattr(self, name) is not None:
                raise InvalidParamsError(name, "an embedding job (input) takes none")
        assert self.input is not None
        check_inputs(self.input)
        if sum(len(text) for text in self.input) > MAX_PROMPT_CHARS:
            raise InvalidParamsError("input", f"must hold at most {MAX_PROMPT_CHARS} characters")

    @property
    def embedding(self) -> bool:
        """Whether this is an embedding job (``input``)."""
        return self.input is not None


@attrs.frozen
class TaskAccepted:
    """The 202 answer of POST /v2/tasks."""

    job_id: str
    status: JobStatus = attrs.field(metadata=limits(doc='always "queued"'))
    queue_position: int = attrs.field(metadata=limits(doc="jobs dispatched before this one"))
    predicted_start_ms: int = attrs.field(metadata=limits(doc="estimated wait before start"))
    events_url: str = attrs.field(metadata=limits(doc="the job's SSE stream"))


@attrs.frozen
class JobError:
    """Why a job failed or was cancelled."""

    code: str = attrs.field(metadata=limits(doc="UPPER_SNAKE error code"))
    message: str


@attrs.frozen
class JobRecord:
    """GET /v2/tasks/{id}: what is known of one job. Never carries the prompt text."""

    job_id: str
    status: JobStatus
    priority: Priority
    model: str
    prompt_sha256: str = attrs.field(
        metadata=limits(doc="SHA-256 (hex) of the prompt, or of the canonical JSON of messages")
    )
    seed: int
    created_at: float = attrs.field(metadata=limits(doc="admission time"))
    queued_at: float | None = field(default=None, doc="when it last entered the queue")
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    pool_id: str | None = None
    worker_id: str | None = None
    retry_count: int = field(default=0, doc="times it went back to the queue")
    tokens_in: int | None = None
    tokens_out: int = 0
    ttft_ms: float | None = None
    stop_reason: StopReason | None = None
    error: JobError | None = None
    owner: str | None = field(default=None, doc="the name of the API key (or `operator`) "
                              "that submitted it; null on a daemon without credentials")


@attrs.frozen
class JobList:
    """GET /v2/tasks: one page of job records, newest first."""

    jobs: list[JobRecord]
    next_cursor: str | None = field(default=None, doc="pass as ?cursor= for the next page")


# Orchestrator-only event payloads (section 3).
@attrs.frozen
class QueuedEvent:
    job_id: str
    queue_position: int
    predicted_start_ms: int


@attrs.frozen
class DispatchedEvent:
    job_id: str
    pool_id: str
    worker_id: str


__all__ = [
    "DEVICE_PATTERN",
    "FINAL_STATUSES",
    "JOB_STATUSES",
    "DispatchedEvent",
    "JobError",
    "JobList",
    "JobRecord",
    "JobStatus",
    "Placement",
    "Priority",
    "QueuedEvent",
    "TaskAccepted",
    "TaskMessage",
    "TaskRequest",
]
