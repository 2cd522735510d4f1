"""A streamed Responses answer: OpenAI's semantic events over one job's events.

``response.created`` and ``response.in_progress`` (the response with no output yet); per
output item ``response.output_item.added``, its ``content_part.added``, the deltas
(``response.reasoning_text.delta``, ``response.output_text.delta``,
``response.function_call_arguments.delta``), their ``.done``, ``content_part.done`` and
``output_item.done``; then ``response.completed`` (or ``response.incomplete`` when
``max_output_tokens`` cut it) with the whole response. A job that fails sends ``error`` and
``response.failed``. Every event carries its ``sequence_number``; pings and a model being
pulled are SSE comments.
"""

from __future__ import annotations

import json
from typing import Any

from rbees_api_responses.request import (
    call_item,
    envelope,
    finish,
    message_item,
    reasoning_item,
    render,
)
from rbees_core import protocols as p
from rbees_core import sse


class ResponseStream(p.JobStream):
    """The event stream of one Responses job (made by
    :func:`rbees_api_responses.responses.create_response`)."""

    def __init__(self, jobs: p.Jobs, chat: p.ChatRequest, body: dict[str, Any], *,
                 ident: str, created: int, ping_s: float = 15.0) -> None:
        super().__init__(jobs, ping_s=ping_s)
        self.chat, self.ident, self.tail_id = chat, ident, ident.removeprefix("resp_")
        self.answer = envelope(ident, chat, body, created, "in_progress")
        self.turn = p.Turn(tools=chat.tooled)
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # the output items done
        self.kind: str | None = None  # the open item's type
        self.text = ""  # the open item's text so far

    def _event(self, kind: str, /, **data: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return sse.frame(json.dumps(body, ensure_ascii=False), event=kind).encode()

    def head(self) -> bytes:
        return (self._event("response.created", response=self.answer)
                + self._event("response.in_progress", response=self.answer))

    @property
    def _where(self) -> dict[str, Any]:
        return {"item_id": self._item_id, "output_index": len(self.items)}

    @property
    def _item_id(self) -> str:
        prefix = {"reasoning": "rs", "message": "msg"}.get(self.kind or "", "fc")
        return f"{prefix}_{self.tail_id}_{len(self.items)}"

    def _open(self, kind: str) -> bytes:
        out = self._close()
        self.kind, self.text = kind, ""
        if kind == "reasoning":
            item = reasoning_item(self._item_id, "")
            item.update(status="in_progress", content=[])
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = message_item(self._item_id, "", "in_progress")
            item["content"] = []
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return (out + self._event("response.output_item.added", item=item,
                                  output_index=len(self.items))
                + self._event("response.content_part.added", content_index=0, part=part,
                              **self._where))

    def _close(self) -> bytes:
        if self.kind is None:
            return b""
        where = self._where
        if self.kind == "reasoning":
            item = reasoning_item(self._item_id, self.text)
            out = self._event("response.reasoning_text.done", content_index=0,
                              text=self.text, **where)
        else:
            item = message_item(self._item_id, self.text)
            out = self._event("response.output_text.done", content_index=0, text=self.text,
                              logprobs=[], **where)
        out += self._event("response.content_part.done", content_index=0,
                           part=item["content"][0], **where)
        out += self._event("response.output_item.done", item=item,
                           output_index=len(self.items))
        self.items.append(item)
        self.kind = None
        return out

    def _call(self, call: dict[str, Any]) -> bytes:
        out = self._close()
        self.kind = "function_call"
        ident, where = self._item_id, self._where
        out += self._event("response.output_item.added",
                           item=call_item(ident, {**call, "arguments": ""}, "in_progress"),
                           output_index=len(self.items))
        out += self._event("response.function_call_arguments.delta",
                           delta=call["arguments"], **where)
        out += self._event("response.function_call_arguments.done", name=call["name"],
                           arguments=call["arguments"], **where)
        item = call_item(ident, call)
        out += self._event("response.output_item.done", item=item,
                           output_index=len(self.items))
        self.items.append(item)
        self.kind = None
        return out

    def event(self, index: int, event: str, data: dict[str, Any]) -> bytes:
        out = b""
        for delta in self.turn.feed(event, data):
            out += self._delta(delta)
        return out

    def _delta(self, delta: p.Delta) -> bytes:
        out = b""
        if delta.kind in ("reasoning", "text"):
            kind = "reasoning" if delta.kind == "reasoning" else "message"
            if not delta.text:
                return b""
            if self.kind != kind:
                out += self._open(kind)
            self.text += delta.text
            name = ("response.reasoning_text.delta" if kind == "reasoning"
                    else "response.output_text.delta")
            extra: dict[str, Any] = {} if kind == "reasoning" else {"logprobs": []}
            return out + self._event(name, content_index=0, delta=delta.text, **extra,
                                     **self._where)
        if delta.kind == "tool_call":
            return self._call(delta.call or {})
        if delta.kind == "end":
            if not self.items and self.kind is None:  # an empty answer: an empty message
                out += self._open("message")
            out += self._close()
            answer = finish({**self.answer, "output": self.items}, self.turn)
            name = ("response.incomplete" if answer["status"] == "incomplete"
                    else "response.completed")
            return out + self._event(name, response=answer)
        if delta.kind == "error":
            error = render(p.job_error(delta.error or {}))["error"]
            failed = {**self.answer, "status": "failed", "output": self.items,
                      "error": {"code": "rate_limit_exceeded" if error["code"] in (
                          "queue_full_dropped",) else "server_error",
                          "message": error["message"]}}
            return (self._event("error", code=error["code"], message=error["message"],
                                param=error["param"])
                    + self._event("response.failed", response=failed))
        if delta.kind == "downloading":
            info = delta.info or {}
            return sse.comment(f"downloading {info.get('model')} to pool {info.get('pool_id')} "
                               f"({info.get('bytes')} of {info.get('total')} bytes)")
        return b""
