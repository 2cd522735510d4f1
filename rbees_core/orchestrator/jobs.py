"""Jobs as the orchestrator stores them: admission, the state machine, events.

:func:`new_job` turns a validated :class:`~rbees_core.api.orchestrator.TaskRequest` into a
:class:`NewJob` (id, seed and prompt digest chosen) for
:meth:`rbees_core.orchestrator.store.Store.admit`. :data:`TRANSITIONS` is the state machine
the store enforces.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from rbees_core.api.common import MAX_SEED
from rbees_core.api.orchestrator import JobStatus, Placement, Priority, TaskRequest
from rbees_core.schema import from_mapping, to_dict

#: Allowed status changes. ``dispatched``/``running -> queued`` is a retry (retry_count + 1);
#: the store refuses it once the job has produced a token.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"dispatched", "failed", "cancelled"}),
    "dispatched": frozenset({"running", "queued", "failed", "cancelled"}),
    "running": frozenset({"completed", "failed", "cancelled", "queued"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
#: Events after which nothing may follow (CONTRACT section 3).
TERMINAL_EVENTS: frozenset[str] = frozenset({"end", "error"})
#: Job fields a transition may set besides the status and the timestamps.
TRANSITION_FIELDS: frozenset[str] = frozenset({
    "pool_id", "worker_id", "tokens_in", "tokens_out", "ttft_ms", "stop_reason",
    "error_code", "error_message",
})
#: Generation parameters kept in the ``params`` JSON column.
PARAM_FIELDS: tuple[str, ...] = (
    "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
    "deadline_ms", "placement", "cancel_on_disconnect", "json_schema", "grammar", "tools",
    "tool_choice", "parallel_tool_calls", "presence_penalty", "frequency_penalty", "min_p",
    "logit_bias", "logprobs", "top_logprobs", "input",
    "chat_template_kwargs", "reasoning_effort", "keep_alive",
)
_EXECUTE_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop")
#: Execute fields sent only when set (a worker from before them accepts the job unchanged).
_OPTIONAL_EXECUTE_FIELDS = ("json_schema", "grammar", "tools", "tool_choice",
                            "chat_template_kwargs", "reasoning_effort")
#: Sampling fields sent only when they differ from their defaults (same reason).
_DEFAULTED_EXECUTE_FIELDS: dict[str, Any] = {
    "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0, "logit_bias": None,
    "logprobs": False, "top_logprobs": 0,
}


def dumps(data: Any) -> str:
    """Compact JSON, the form stored in the database and sent in SSE ``data:`` lines."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def prompt_digest(prompt: str | None, messages: list[dict[str, Any]] | None) -> str:
    """SHA-256 (hex) of the prompt text, or of the compact JSON of the messages."""
    text = prompt if prompt is not None else dumps(messages)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex}"


@attrs.frozen
class NewJob:
    """A job about to be admitted. Build it with :func:`new_job`."""

    job_id: str
    model: str
    priority: Priority
    seed: int
    params: dict[str, Any]
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    correlation_id: str | None = None
    created_at: float | None = None
    owner: str | None = None  # the submitting key's name (rbees_core.auth)

    @property
    def prompt_sha256(self) -> str:
        return prompt_digest(self.prompt, self.messages if self.prompt is not None or
                             self.messages is not None else self.params.get("input"))

    @property
    def embedding(self) -> bool:
        """Whether this is an embedding job (its ``input`` in the params)."""
        return self.params.get("input") is not None


def new_job(request: TaskRequest, *, job_id: str | None = None,
            correlation_id: str | None = None, created_at: float | None = None,
            owner: str | None = None) -> NewJob:
    """A :class:`NewJob` for a validated request; chooses the id and, if missing, the seed."""
    seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
    params = {k: getattr(request, k) for k in PARAM_FIELDS}
    params["stop"] = list(request.stop)
    if request.placement is not None:
        params["placement"] = to_dict(request.placement)
    messages = None if request.messages is None else [
        {k: v for k, v in to_dict(m).items() if v is not None} for m in request.messages
    ]
    return NewJob(
        job_id=job_id or new_job_id(), model=request.model, priority=request.priority,
        seed=seed, params=params, prompt=request.prompt,
        messages=messages, correlation_id=correlation_id, owner=owner,
        created_at=time.time() if created_at is None else created_at,
    )


@attrs.frozen
class JobSpec:
    """Everything needed to run a job on a worker, prompt included. Never sent to clients."""

    job_id: str
    seq: int
    model: str
    priority: Priority
    status: JobStatus
    seed: int
    params: dict[str, Any]
    prompt: str | None
    messages: list[dict[str, Any]] | None
    correlation_id: str | None

    @property
    def placement(self) -> Placement | None:
        raw = self.params.get("placement")
        return None if raw is None else from_mapping(Placement, raw)

    @property
    def embedding(self) -> bool:
        """Whether this is an embedding job (its ``input`` in the params)."""
        return self.params.get("input") is not None

    def execute_body(self) -> dict[str, Any]:
        """The body of the worker's ``POST /v2/execute`` for this job."""
        return execute_body(self)


def execute_body(job: NewJob | JobSpec) -> dict[str, Any]:
    """The body of the worker's ``POST /v2/execute`` for a job (prompt included), or of
    ``POST /v2/embed`` for an embedding job (``{job_id, input}``)."""
    body: dict[str, Any] = {"job_id": job.job_id}
    if job.params.get("input") is not None:
        body["input"] = job.params["input"]
        return body
    if job.prompt is not None:
        body["prompt"] = job.prompt
    else:
        body["messages"] = job.messages
    body.update({k: job.params[k] for k in _EXECUTE_FIELDS if k in job.params})
    body.update({k: job.params[k] for k in _OPTIONAL_EXECUTE_FIELDS
                 if job.params.get(k) is not None})
    body.update({k: job.params[k] for k, default in _DEFAULTED_EXECUTE_FIELDS.items()
                 if job.params.get(k, default) not in (default, {})})
    if job.params.get("tools"):
        body["parallel_tool_calls"] = job.params.get("parallel_tool_calls", True)
    body["seed"] = job.seed
    if job.priority == "batch":  # the worker lets interactive prompts go first
        body["priority"] = "batch"
    return body


@attrs.frozen
class StoredEvent:
    """One job event as kept for SSE replay. ``data`` is its compact JSON text."""

    event_id: int
    event: str
    data: str

    def payload(self) -> Any:
        return json.loads(self.data)


@attrs.frozen
class RecoveredJob:
    """A job left queued by :meth:`~rbees_core.orchestrator.store.Store.recover`.

    Push them into the queue in the order given, with ``since=created_at``.
    """

    job_id: str
    seq: int
    priority: Priority
    model: str
    created_at: float
    retry_count: int
    placement: Placement | None
    embedding: bool = False
    deadline_ms: int | None = None


@attrs.frozen
class Recovery:
    """What :meth:`~rbees_core.orchestrator.store.Store.recover` did.

    ``queued``: every queued job afterwards, in admission order (re-queued ones included).
    ``requeued``: dispatched/running jobs without a token, now queued with retry_count + 1.
    ``failed``: jobs that had produced tokens, now failed with ``ORCHESTRATOR_RESTARTED``.
    ``settled``: unfinished jobs whose terminal event was already stored; their status now
    follows that event (``end`` -> completed, ``error`` -> failed with its code).
    """

    queued: list[RecoveredJob]
    requeued: list[str]
    failed: list[str]
    settled: list[str]


def event_pairs(events: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """Normalise ``[(event, data), ...]``, rejecting malformed entries early."""
    pairs = []
    for item in events:
        name, data = item
        if not isinstance(name, str) or not name:
            raise ValueError(f"event name must be a non-empty string, got {name!r}")
        if not isinstance(data, Mapping):
            raise ValueError(f"event data must be a mapping, got {type(data).__name__}")
        pairs.append((name, data))
    return pairs
