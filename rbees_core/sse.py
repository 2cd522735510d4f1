"""Server-sent events: the one writer and the one reader every rbees program uses.

The wire format is the WHATWG one (``text/event-stream``): a frame is ``id:``, ``event:``
and ``data:`` lines ended by a blank line; a line starting with ``:`` is a comment; lines
end with LF, CRLF or CR. rbees' daemons write JSON in ``data:`` (one line: compact JSON never
holds a line break), OpenAI's stream writes ``data:`` only; any text with line breaks goes
as several ``data:`` lines, which the reader joins with ``\\n``.

Writers: :func:`frame` (any text), :func:`json_frame` (the daemons' events; the hot path of
rbees-orcd, kept to one f-string). Readers: :class:`Decoder` fed raw byte chunks (httpx's
``aiter_raw``/``aiter_bytes``, rbees-orcd's upstream client, a subprocess's stdout) or
whole lines (httpx's ``iter_lines``); :func:`iter_events`, :func:`aiter_events` and
:func:`parse` wrap it for the usual sources.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, Generic, NamedTuple, TypeVar

__all__ = ["PING", "Decoder", "Event", "Pinger", "aiter_events", "comment", "frame",
           "iter_events", "json_frame", "parse"]

T = TypeVar("T")
#: A comment frame: keeps a quiet stream (a job waiting in the queue) alive through proxies
#: and idle timeouts; every reader ignores it.
PING = b": ping\n\n"


class Event(NamedTuple):
    """One dispatched frame. ``event`` is ``""`` when the frame named none (a browser calls
    it ``message``); ``data`` is its ``data:`` lines joined with ``\\n``; ``id`` the last
    ``id:`` seen on the stream so far (``None`` before any)."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        """``data`` decoded as JSON (raises ``ValueError`` when it is not)."""
        return json.loads(self.data)


# -- writing ---------------------------------------------------------------------------------


def frame(data: str = "", *, event: str | None = None, id: int | str | None = None) -> str:
    """One SSE frame, blank line included. ``data`` with line breaks (LF, CRLF or CR) goes
    as one ``data:`` line per line. Raises ``ValueError`` when ``event`` or ``id`` holds a
    line break (it would forge other fields)."""
    head = ""
    if id is not None:
        ident = str(id)
        if "\n" in ident or "\r" in ident:
            raise ValueError(f"an SSE id holds a line break: {ident!r}")
        head = f"id: {ident}\n"
    if event is not None:
        if "\n" in event or "\r" in event:
            raise ValueError(f"an SSE event name holds a line break: {event!r}")
        head += f"event: {event}\n"
    if "\n" in data or "\r" in data:
        lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        return head + "".join(f"data: {line}\n" for line in lines) + "\n"
    return f"{head}data: {data}\n\n"


def comment(text: str) -> bytes:
    """An SSE comment frame (``: text``), which every reader ignores: what rbees-orcd's
    ``/v1`` streams send for a job's ``downloading`` events. Line breaks become spaces."""
    flat = text.replace("\r", " ").replace("\n", " ")
    return f": {flat}\n\n".encode()


def json_frame(event_id: int | None, event: str, data: Any) -> str:
    """The frame of one daemon event: ``id``, ``event`` and ``data`` as compact JSON (one
    line: JSON text escapes every line break). Called per relayed token; ``event`` is one
    of the daemon's own names, never client text."""
    body = json.dumps(data, ensure_ascii=False)
    if event_id is None:
        return f"event: {event}\ndata: {body}\n\n"
    return f"id: {event_id}\nevent: {event}\ndata: {body}\n\n"


class Pinger(Generic[T]):
    """Puts ``item`` on ``queue`` whenever nothing passed for ``interval_s`` seconds.

    The stream writers of rbees-orcd (its /v1 streams and ``/v2/tasks/{id}/events``) read
    their events from ``queue``; on ``item`` they write :data:`PING`. They call
    :meth:`touch` on every other item and :meth:`close` when the stream ends. One timer per
    interval, not one per event: the token path only stores a time. ``interval_s`` <= 0:
    no pings. Made on the event loop that reads ``queue``.
    """

    def __init__(self, queue: asyncio.Queue[T], item: T, interval_s: float) -> None:
        self.queue, self.item, self.interval_s = queue, item, interval_s
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.handle: asyncio.TimerHandle | None = None
        if interval_s > 0:
            self.handle = self.loop.call_later(interval_s, self._due)

    def touch(self) -> None:
        """Something was sent: the next ping is due ``interval_s`` from now."""
        self.last = self.loop.time()

    def _due(self) -> None:
        idle = self.loop.time() - self.last
        if idle >= self.interval_s * 0.999:
            self.queue.put_nowait(self.item)
            self.last, idle = self.loop.time(), 0.0
        self.handle = self.loop.call_later(self.interval_s - idle, self._due)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


# -- reading ---------------------------------------------------------------------------------


class Decoder:
    """Turns an event stream into :class:`Event` s, incrementally.

    Feed it raw chunks with :meth:`feed` (they may split a line, a CRLF or a UTF-8
    character anywhere) or whole lines without their ending with :meth:`line`; do not mix
    the two on one decoder. A frame not ended by a blank line when the stream ends is
    dropped, as the standard says.
    """

    __slots__ = ("_after_cr", "_data", "_event", "_id", "_pending")

    def __init__(self) -> None:
        self._pending = b""
        self._after_cr = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    @property
    def last_id(self) -> str | None:
        """The last ``id:`` seen (what a client sends back as ``Last-Event-ID``)."""
        return self._id

    def feed(self, chunk: bytes) -> list[Event]:
        """The frames that ``chunk`` completes, in order."""
        buf = self._pending + chunk if self._pending else chunk
        if self._after_cr:  # the LF of a CRLF split between two chunks
            self._after_cr = False
            if buf[:1] == b"\n":
                buf = buf[1:]
        end = buf.rfind(b"\n")
        if b"\r" in buf:
            end = max(end, buf.rfind(b"\r"))
        if end < 0:
            self._pending = buf
            return []
        self._pending = buf[end + 1:]
        text = buf[:end + 1].decode("utf-8", "replace")  # whole lines: whole characters
        if "\r" in text:
            self._after_cr = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        lines.pop()
        return self._take(lines)

    def line(self, line: str) -> Event | None:
        """Take one line (without its ending); the frame it completes, if any."""
        events = self._take((line,))
        return events[0] if events else None

    def _take(self, lines: Iterable[str]) -> list[Event]:
        # one loop for many lines: every token rbees-orcd relays passes here
        events: list[Event] = []
        for line in lines:
            if not line:
                if self._data:
                    data = self._data[0] if len(self._data) == 1 else "\n".join(self._data)
                    events.append(Event(self._event, data, self._id))
                    self._data = []
                self._event = ""
                continue
            field, colon, value = line.partition(":")
            if colon and value[:1] == " ":
                value = value[1:]
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value
            elif field == "id" and "\0" not in value:
                self._id = value
            # "retry", comments (an empty field name) and unknown fields are ignored
        return events


def iter_events(lines: Iterable[str]) -> Iterator[Event]:
    """The frames of a stream given as lines (httpx's ``Response.iter_lines()``)."""
    decoder = Decoder()
    for line in lines:
        event = decoder.line(line)
        if event is not None:
            yield event


async def aiter_events(chunks: AsyncIterable[bytes] | AsyncIterable[str]
                       ) -> AsyncIterator[Event]:
    """The frames of a stream given as byte chunks (httpx's ``aiter_raw``/``aiter_bytes``,
    a process's stdout) or as lines without endings (httpx's ``aiter_lines``)."""
    decoder = Decoder()
    async for chunk in chunks:
        if isinstance(chunk, bytes):
            for event in decoder.feed(chunk):
                yield event
        else:
            found = decoder.line(chunk)
            if found is not None:
                yield found


def parse(body: str | bytes) -> list[Event]:
    """The frames of a whole body (a frame the body does not end is dropped)."""
    decoder = Decoder()
    return decoder.feed(body if isinstance(body, bytes) else body.encode())
