"""Reasoning: the ``<think>...</think>`` of thinking models, apart from the answer.

Qwen3, QwQ and the DeepSeek-R1 distills write their reasoning between ``<think>`` and
``</think>`` before the answer; some templates open the ``<think>`` in the generation prompt
(the model's output then starts inside the reasoning). As llama.cpp's
``--reasoning-format deepseek`` does, rbees reports the reasoning apart from the content:

- the worker (:func:`splitting_sink`, for a chat job whose template :func:`thinks`) splits
  each token event's text into ``t`` (content) and ``reasoning``, one event per piece as
  before; a piece that may be the start of a tag is held back until the next one tells;
- rbees-orcd maps ``reasoning`` to OpenAI's ``delta.reasoning_content`` (streamed) and
  ``message.reasoning_content``; ``/v2/tasks`` streams carry the field as the worker sent it.

Rules (:class:`ReasoningSplitter`): reasoning is recognised only at the start of the output
(after optional whitespace) or from the start when the prompt opened it (a ``<think>`` the
model writes there all the same is dropped, as llama.cpp does); the tags are not reported;
the reasoning's leading and trailing whitespace and the whitespace between ``</think>`` and
the answer are dropped; an output cut before ``</think>`` (``max_tokens``) is all reasoning,
with empty content; text that does not start with ``<think>`` is all content, byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from rbees_core.errors import InvalidParamsError

if TYPE_CHECKING:
    from rbees_core.chat_template import ChatTemplate

OPEN = "<think>"
CLOSE = "</think>"
Sink = Callable[[str, dict[str, Any]], None]
_OPENED = re.compile(r"<think>\s*$")
#: OpenAI's ``reasoning_effort`` values; "none" also turns Qwen3's thinking off.
EFFORTS = ("none", "minimal", "low", "medium", "high")
Effort = Literal["none", "minimal", "low", "medium", "high"]
_VARIABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
#: What the renderer sets itself: a job cannot give these.
_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
MAX_TEMPLATE_KWARGS_CHARS = 16_384


def template_variables(kwargs: Mapping[str, Any] | None, effort: str | None, *,
                       field: str = "chat_template_kwargs") -> dict[str, Any]:
    """The variables a chat job adds to its template's render: ``kwargs`` (llama.cpp's
    ``chat_template_kwargs``, e.g. ``{"enable_thinking": false}``) and ``reasoning_effort``
    (passed as the variable of that name, which gpt-oss templates read; ``"none"`` also sets
    ``enable_thinking`` false unless ``kwargs`` says otherwise).

    Called by the request checks of rbees-orcd and the worker, and by the worker to render.
    Raises :class:`InvalidParamsError` for names that are no identifiers (or begin with
    ``_``), names the renderer sets itself, more than 32 variables or 16 KiB of JSON, and an
    effort not in :data:`EFFORTS`."""
    out: dict[str, Any] = {}
    if kwargs is not None:
        if not isinstance(kwargs, Mapping) or len(kwargs) > 32:
            raise InvalidParamsError(field, "must be an object of at most 32 variables")
        for name in kwargs:
            if not isinstance(name, str) or not _VARIABLE.match(name):
                raise InvalidParamsError(field, f"{name!r} is no template variable name "
                                         "(a letter, then letters, digits or _)")
            if name in _RESERVED:
                raise InvalidParamsError(field, f"{name!r} is set by the renderer itself")
        if len(json.dumps(kwargs)) > MAX_TEMPLATE_KWARGS_CHARS:
            raise InvalidParamsError(field, f"must be at most {MAX_TEMPLATE_KWARGS_CHARS} "
                                     "characters of JSON")
        out.update(kwargs)
    if effort is not None:
        if effort not in EFFORTS:
            raise InvalidParamsError("reasoning_effort", f"must be one of {', '.join(EFFORTS)}")
        out.setdefault("reasoning_effort", effort)
        if effort == "none":
            out.setdefault("enable_thinking", False)
    return out


def thinks(template: ChatTemplate | None) -> bool:
    """Whether a model's chat template is a thinking one: it knows ``</think>`` (Qwen3's
    writes and strips the reasoning, R1 distills' strip it from past turns); its chat jobs
    get their reasoning split off."""
    return template is not None and CLOSE in template.source


def opens_reasoning(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` (the generation prompt of
    DeepSeek-R1 distills, or a template override): the output starts as reasoning."""
    return _OPENED.search(prompt[-64:]) is not None


def _partial(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Splits a model's output, fed piece by piece, into (reasoning, content) pieces.

    ``started``: the prompt opened the reasoning (:func:`opens_reasoning`). Call
    :meth:`feed` per piece and :meth:`finish` once at the end (what was held back).
    """

    def __init__(self, *, started: bool = False) -> None:
        # "start": may still open <think>; "reasoning"; "after": between </think> and the
        # answer (whitespace dropped); "content": the rest is content as it comes
        self.state = "reasoning" if started else "start"
        self.held = ""
        self.said = False  # some reasoning was reported (its leading whitespace is gone)
        self.opened = not started  # the <think> was read (not only opened by the prompt)

    def feed(self, piece: str) -> tuple[str, str]:
        """``(reasoning, content)`` to report now after ``piece`` (either may be empty)."""
        self.held += piece
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                head = self.held.lstrip()
                if head.startswith(OPEN):
                    self.state, self.held, self.opened = "reasoning", head[len(OPEN):], True
                    continue
                if OPEN.startswith(head):  # nothing yet, or the tag's beginning
                    return reasoning, content
                self.state = "content"
                continue
            if self.state == "reasoning":
                if not self.said and not self.opened:  # opened by the prompt: a model
                    head = self.held.lstrip()  # may still write its own <think>, dropped
                    if head and OPEN.startswith(head) and head != OPEN:
                        return reasoning, content
                    self.opened = True
                    if head.startswith(OPEN):
                        self.held = head[len(OPEN):]
                at = self.held.find(CLOSE)
                if at >= 0:
                    reasoning += self._said(self.held[:at].rstrip())
                    self.state, self.held = "after", self.held[at + len(CLOSE):]
                    continue
                keep = _partial(self.held, CLOSE)
                body = self.held[:len(self.held) - keep]
                cut = len(body.rstrip())  # trailing whitespace waits: it may end the reasoning
                reasoning += self._said(self.held[:cut])
                self.held = self.held[cut:]
                return reasoning, content
            if self.state == "after":
                self.held = self.held.lstrip()
                if not self.held:
                    return reasoning, content
                self.state = "content"
                continue
            content += self.held
            self.held = ""
            return reasoning, content

    def _said(self, text: str) -> str:
        if not self.said:
            text = text.lstrip()
            self.said = bool(text)
        return text

    def finish(self) -> tuple[str, str]:
        """``(reasoning, content)`` held back when the output ended: an open reasoning's
        last text (cut by ``max_tokens``), or a start that never became ``<think>``."""
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return self._said(held.rstrip()), ""
        if self.state == "start":
            self.state = "content"
            return "", held
        return "", ""


def splitting_sink(sink: Sink, *, started: bool) -> Sink:
    """``sink`` (a worker job's event sink) with each ``token`` event's text split by a
    :class:`ReasoningSplitter`: ``t`` the content, ``reasoning`` the reasoning (only when
    there is some); other fields stay. Text held back at the end goes in one more token
    event just before the ``end``. Runs on the decode thread, like ``sink``; the worker
    puts it outermost, so that tool calls are parsed from the content alone."""
    splitter = ReasoningSplitter(started=started)
    next_index = 0

    def emit(data: dict[str, Any], reasoning: str, content: str) -> None:
        data = {**data, "t": content}
        if reasoning:
            data["reasoning"] = reasoning
        sink("token", data)

    def split(event: str, data: dict[str, Any]) -> None:
        nonlocal next_index
        if event == "token":
            next_index = int(data.get("i", next_index)) + 1
            reasoning, content = splitter.feed(str(data.get("t", "")))
            emit(data, reasoning, content)
            return
        if event == "end":
            reasoning, content = splitter.finish()
            if reasoning or content:
                emit({"i": next_index}, reasoning, content)
        sink(event, data)

    return split


__all__ = ["CLOSE", "EFFORTS", "OPEN", "Effort", "ReasoningSplitter", "opens_reasoning",
           "splitting_sink", "template_variables", "thinks"]
