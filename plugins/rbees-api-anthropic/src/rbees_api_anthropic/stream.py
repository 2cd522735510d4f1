"""A streamed Messages answer: Anthropic's event sequence over one job's events.

``message_start`` (the message with no content yet), then per content block
``content_block_start``, its ``content_block_delta`` s (``thinking_delta`` then a
``signature_delta`` for reasoning, ``text_delta`` for text, one ``input_json_delta`` for a
tool call's input) and ``content_block_stop``; then ``message_delta`` (stop reason and
usage) and ``message_stop``. A job that fails sends an ``error`` event and ends the stream;
pings are ``ping`` events, a model being pulled first SSE comments.
"""

from __future__ import annotations

import json
from typing import Any

from rbees_api_anthropic.request import render, stop_sequence
from rbees_core import protocols as p
from rbees_core import sse

PING = sse.frame(json.dumps({"type": "ping"}), event="ping").encode()


def _event(name: str, data: dict[str, Any]) -> bytes:
    return sse.frame(json.dumps({"type": name, **data}, ensure_ascii=False),
                     event=name).encode()


class MessageStream(p.JobStream):
    """The event stream of one Messages job (made by
    :func:`rbees_api_anthropic.create_message`)."""

    ping = PING

    def __init__(self, jobs: p.Jobs, chat: p.ChatRequest, *, ident: str,
                 ping_s: float = 15.0) -> None:
        super().__init__(jobs, ping_s=ping_s)
        self.chat, self.ident = chat, ident
        self.turn = p.Turn(tools=chat.tooled)
        self.index = -1  # the open block's index
        self.kind: str | None = None  # the open block's type

    def head(self) -> bytes:
        return _event("message_start", {"message": {
            "id": self.ident, "type": "message", "role": "assistant", "model": self.chat.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _close(self) -> bytes:
        if self.kind is None:
            return b""
        out = b""
        if self.kind == "thinking":
            out += _event("content_block_delta", {"index": self.index, "delta": {
                "type": "signature_delta", "signature": ""}})
        self.kind = None
        return out + _event("content_block_stop", {"index": self.index})

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.kind = kind
        return out + _event("content_block_start", {"index": self.index,
                                                    "content_block": block})

    def event(self, index: int, event: str, data: dict[str, Any]) -> bytes:
        out = b""
        for delta in self.turn.feed(event, data):
            out += self._delta(delta)
        return out

    def _delta(self, delta: p.Delta) -> bytes:
        out = b""
        if delta.kind == "reasoning":
            if self.kind != "thinking":
                out += self._open("thinking", {"type": "thinking", "thinking": "",
                                               "signature": ""})
            return out + _event("content_block_delta", {"index": self.index, "delta": {
                "type": "thinking_delta", "thinking": delta.text}})
        if delta.kind == "text":
            if not delta.text:
                return b""
            if self.kind != "text":
                out += self._open("text", {"type": "text", "text": ""})
            return out + _event("content_block_delta", {"index": self.index, "delta": {
                "type": "text_delta", "text": delta.text}})
        if delta.kind == "tool_call":
            call = delta.call or {}
            out += self._open("tool_use", {"type": "tool_use", "id": call["id"],
                                           "name": call["name"], "input": {}})
            out += _event("content_block_delta", {"index": self.index, "delta": {
                "type": "input_json_delta", "partial_json": call["arguments"] or "{}"}})
            return out + self._close()
        if delta.kind == "end":
            if self.index < 0:  # an empty answer: one empty text block, as a Message has
                out += self._open("text", {"type": "text", "text": ""})
            out += self._close()
            reason, sequence = stop_sequence(self.chat, self.turn)
            usage = self.turn.usage
            return out + _event("message_delta", {
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": {"input_tokens": usage.tokens_in, "output_tokens": usage.tokens_out}})
        if delta.kind == "error":
            return _event("error", {"error": render(p.job_error(delta.error or {}))["error"]})
        if delta.kind == "downloading":
            info = delta.info or {}
            return sse.comment(f"downloading {info.get('model')} to pool {info.get('pool_id')} "
                               f"({info.get('bytes')} of {info.get('total')} bytes)")
        return b""

    def tail(self) -> bytes:
        if self.turn.finish is None:  # the job failed: its error event ended the stream
            return b""
        return _event("message_stop", {})
