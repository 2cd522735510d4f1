"""Rules across the fields of a generation request that ``POST /v2/tasks`` (rbees-orcd) and
``POST /v2/execute`` (the worker) share: one chat turn, and how output constraints combine."""

from __future__ import annotations

import json
from typing import Any

from rbees_core.api.common import MAX_GRAMMAR_CHARS, MAX_LOGIT_BIAS
from rbees_core.errors import InvalidParamsError
from rbees_core.tools import check_tool_calls, check_tool_choice, check_tools


def turn_chars(content: str | None, tool_calls: list[dict[str, Any]] | None) -> int:
    """Characters one chat turn adds to the prompt (content and call arguments)."""
    calls = len(json.dumps(tool_calls)) if tool_calls else 0
    return len(content or "") + calls


def check_turn(role: str, content: str | None, tool_calls: list[dict[str, Any]] | None) -> None:
    """A chat turn's rules across fields (a task's and an execute request's messages):
    content may be null only on an assistant turn with tool_calls, which only assistants
    have. Raises :class:`InvalidParamsError`."""
    if content is None and not (role == "assistant" and tool_calls):
        raise InvalidParamsError("content", "is required, except on an assistant turn "
                                 "with tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise InvalidParamsError("tool_calls", "only an assistant turn has tool_calls")
        check_tool_calls(tool_calls, field="tool_calls")


def check_output_rules(*, prompt: str | None, json_schema: Any, grammar: str | None,
                       tools: Any, tool_choice: Any) -> None:
    """How a job's output constraints may combine (``POST /v2/tasks`` and ``/v2/execute``):
    at most one of json_schema and grammar; tools need messages and no other constraint;
    a tool_choice beyond none/auto needs tools. Raises :class:`InvalidParamsError`."""
    if json_schema is not None and grammar is not None:
        raise InvalidParamsError("grammar", "give at most one of json_schema and grammar")
    if tools is not None:
        if len(json.dumps(tools)) > MAX_GRAMMAR_CHARS:
            raise InvalidParamsError("tools", f"must be at most {MAX_GRAMMAR_CHARS} "
                                     "characters of JSON")
        check_tool_choice(tool_choice, check_tools(tools))
        if prompt is not None:
            raise InvalidParamsError("tools", "need messages, not a prompt")
        if json_schema is not None or grammar is not None:
            raise InvalidParamsError("tools", "cannot be combined with json_schema or "
                                     "grammar")
    elif tool_choice not in (None, "none", "auto"):
        raise InvalidParamsError("tool_choice", "needs tools")


def check_sampling(*, logit_bias: dict[str, Any] | None) -> None:
    """The sampling fields' rules beyond their ranges (``POST /v2/tasks`` and
    ``/v2/execute``): ``logit_bias`` maps token ids (decimal strings) to biases from -100 to
    100. Whether the ids are in the model's vocabulary only the worker knows. Raises
    :class:`InvalidParamsError`."""
    if logit_bias is None:
        return
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidParamsError("logit_bias", f"may name at most {MAX_LOGIT_BIAS} tokens")
    for key, bias in logit_bias.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) < 2**31):
            raise InvalidParamsError("logit_bias", f"key {key[:20]!r} is no token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not (
                -100 <= bias <= 100):
            raise InvalidParamsError("logit_bias", f"the bias of token {key} must be a "
                                     "number from -100 to 100")


def logit_bias_pairs(logit_bias: dict[str, Any] | None) -> tuple[tuple[int, float], ...]:
    """A checked ``logit_bias`` (see :func:`check_sampling`) as ``(token, bias)`` pairs, in
    token order: what :attr:`rbees_core.backend.SamplingParams.logit_bias` holds."""
    return tuple(sorted((int(k), float(v)) for k, v in (logit_bias or {}).items()))
