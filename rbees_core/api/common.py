"""Limits and types shared by every daemon (CONTRACT section 1)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from rbees_core.schema import field, limits

ID_PATTERN = r"[A-Za-z0-9_.-]{1,128}"
#: A job's lane: interactive jobs go first, in rbees-orcd's queue and on a worker.
Priority = Literal["interactive", "batch"]
#: A device: a kind with an optional index ("cpu", "cuda:0", "metal").
DEVICE_PATTERN = r"[A-Za-z0-9_.:-]{1,64}"
CORRELATION_ID_PATTERN = r"[A-Za-z0-9-]{1,64}"
#: Characters a shell gives meaning to; model refs and paths must not contain them.
SHELL_META = r"[;&|`$<>(){}\[\]!*?~'\"\\\s\x00]"
MAX_BODY_BYTES = 1024 * 1024
MAX_PROMPT_CHARS = 100_000
WORKER_MAX_PROMPT_CHARS = 32_768
MAX_SEED = 2**63 - 1
#: Longest GBNF grammar (or JSON schema, as JSON text) a job may carry.
MAX_GRAMMAR_CHARS = 65_536
#: Most tokens a job may ask for; the worker clamps it to what its slot's context holds.
MAX_TOKENS = 2**31 - 1
#: Most alternatives per token a job may ask for with ``top_logprobs`` (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: Most tokens one ``logit_bias`` may name.
MAX_LOGIT_BIAS = 1024
#: Inputs of one embedding job (``/v1/embeddings``, ``POST /v2/embed``).
MAX_EMBED_INPUTS = 256
#: Longest model reference (a catalog id, ``hf:...``, ``file:...``).
MAX_MODEL_REF = 512
#: Longest error text a pool reports (a worker's, an RPC server's, a failed model's reason);
#: the pool cuts longer ones with :func:`clip`, so that rbees-orcd never refuses its state.
MAX_ERROR_CHARS = 4096


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


@attrs.frozen
class ErrorBody:
    """The inside of the error envelope."""

    code: str = attrs.field(metadata=limits(doc="UPPER_SNAKE error code"))
    message: str = attrs.field(metadata=limits(doc="what went wrong, for a person"))
    retriable: bool = attrs.field(
        metadata=limits(doc="whether retrying the same request may succeed")
    )
    correlation_id: str = attrs.field(metadata=limits(doc="the request's X-Correlation-Id"))
    details: dict[str, Any] | None = field(default=None, doc="structured details")


@attrs.frozen
class ErrorEnvelope:
    """Every non-2xx answer of every daemon."""

    error: ErrorBody


@attrs.frozen
class Health:
    """Liveness answer of GET /health."""

    status: str = attrs.field(metadata=limits(doc='always "ok"'))
    version: str
    uptime_s: float
