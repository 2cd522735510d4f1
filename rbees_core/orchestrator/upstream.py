"""rbees-orcd's client for workers' job streams: one POST, an SSE answer, kept-alive sockets.

Every token of every job passes through here, on the loop that also admits jobs and writes
to the clients, while the worker's decode threads want the same cores. httpx spent most of
rbees-orcd's CPU per relayed token in its transport layers (httpcore, anyio, h11); this
client is an asyncio protocol around httptools' C parser (the one uvicorn serves with), which
hands the body to the SSE splitter as it arrives. Other calls to workers and pools stay on
httpx: they are few.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from rbees_core import sse
from rbees_core.tls import client_context

#: an idle kept-alive connection is dropped after this long: under the 5 s after which a
#: server with uvicorn's defaults closes it (rbees' daemons keep theirs 75 s)
IDLE_S = 4.0


class UpstreamError(Exception):
    """The worker could not be reached, broke the connection, timed out or spoke bad HTTP."""


class _Connection(asyncio.Protocol):
    """One socket to a worker, carrying one response at a time."""

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.closed = False
        #: any byte of the current response; taken from the idle ones; silent too long
        self.answered = self.reused = self.timed_out = False
        self.error: UpstreamError | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.timeout = self.last_data = 0.0

    def reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers_done, self.complete, self.keep_alive = 0, False, False, False
        self.answered, self.reused = False, True
        self.chunks.clear()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad HTTP from the worker: {exc}"))
            assert self.transport is not None
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(UpstreamError(f"the worker closed the connection: {exc}" if exc
                                     else "the worker closed the connection"))
        self._wake()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True
        # only known inside the parser's callbacks; reset with the parser after them
        self.keep_alive = self.parser.should_keep_alive()

    # -- for the reader -------------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def arm(self, timeout: float) -> None:
        """Fail the response once the worker sends nothing for ``timeout`` s. One timer
        for the whole response, pushed back as data arrives, not one per read."""
        self.timeout, self.last_data = timeout, self.loop.time()
        self.timer = self.loop.call_later(timeout, self._check_silence)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check_silence(self) -> None:
        if self.complete:  # whatever the reader does now, the response is whole
            self.timer = None
            return
        silent = self.loop.time() - self.last_data
        if silent < self.timeout:
            self.timer = self.loop.call_later(self.timeout - silent, self._check_silence)
            return
        self.timer, self.timed_out = None, True
        self._fail(UpstreamError(f"the worker sent nothing for {self.timeout:g} s"))
        self._wake()
        if self.transport is not None:
            self.transport.close()

    async def wait(self) -> None:
        """Until more of the response (or its failure) arrives; raises the failure."""
        if self.error is None:
            await self.settle()
        if self.error is not None:
            raise self.error

    async def settle(self) -> None:
        """Until more of the response (or its failure) arrives."""
        self.waiter = self.loop.create_future()
        await self.waiter


class Response:
    """A worker's answer: ``status`` once open, then :meth:`events` or :meth:`read`."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status

    async def read(self) -> bytes:
        conn, body = self._conn, bytearray()
        while True:
            while conn.chunks:
                body += conn.chunks.popleft()
            if conn.complete:
                return bytes(body)
            await conn.wait()

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """The SSE events of the body as (event, decoded JSON data), in order; ends with the
        body. Events without a name or data, and comments, are skipped."""
        conn, decoder = self._conn, sse.Decoder()
        while True:
            if conn.chunks:  # more may come, and the end with it, while we yield
                chunk = conn.chunks.popleft()
                if conn.chunks:
                    chunk = b"".join((chunk, *conn.chunks))
                    conn.chunks.clear()
                for event, data, _ in decoder.feed(chunk):
                    if event:
                        yield event, json.loads(data)
            elif conn.error is not None:  # after what arrived before it
                raise conn.error
            elif conn.complete:
                return
            else:
                await conn.settle()


class Upstream:
    """POSTs to workers with streamed answers, over connections kept alive per worker."""

    def __init__(self, *, connect_timeout: float, read_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    def post(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> Exchange:
        """``async with upstream.post(url, body, headers) as answer``: the answer once its
        headers arrived. Leaving the block early closes the connection, which tells the
        worker to stop."""
        return Exchange(self, url, body, headers)

    def _reuse(self, key: tuple[str, str, int]) -> _Connection | None:
        """A kept-alive connection to ``key`` that is still open, if there is one."""
        idle = self._idle.get(key, [])
        found = None
        while idle and found is None:
            conn = idle.pop()
            if not conn.closed and conn.loop.time() - conn.idle_since < IDLE_S:
                conn.reset()
                found = conn
            elif conn.transport is not None:
                conn.transport.close()
        if not idle:
            self._idle.pop(key, None)  # workers come and go
        return found

    async def _connect(self, key: tuple[str, str, int], *, fresh: bool = False
                       ) -> _Connection:
        conn = None if fresh else self._reuse(key)
        if conn is not None:
            return conn
        loop = asyncio.get_running_loop()
        scheme, host, port = key
        context: ssl.SSLContext | None = None
        if scheme == "https":
            context = self._ssl = self._ssl or client_context()  # rbees_core.tls
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(key), host, port,
                                                       ssl=context)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {host}:{port}: "
                                f"{exc or type(exc).__name__}") from exc
        return conn

    def _release(self, conn: _Connection, reusable: bool) -> None:
        conn.disarm()
        if reusable and conn.complete and conn.keep_alive and not conn.closed \
                and conn.error is None:
            conn.idle_since = conn.loop.time()
            self._idle.setdefault(conn.key, []).append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()


class Exchange:
    """One POST to a worker and its answer; made by :meth:`Upstream.post`."""

    def __init__(self, upstream: Upstream, url: str, body: dict[str, Any],
                 headers: dict[str, str]) -> None:
        self.upstream = upstream
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"not a worker URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.key = (parts.scheme, parts.hostname, port)
        if any(ch in text for item in headers.items() for text in item for ch in "\r\n"):
            raise UpstreamError("a header for the worker holds a line break")
        payload = json.dumps(body).encode()
        lines = [f"POST {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
                 f"Host: {parts.netloc.rpartition('@')[2]}", "Content-Type: application/json",
                 "Accept: text/event-stream", f"Content-Length: {len(payload)}",
                 *(f"{name}: {value}" for name, value in headers.items())]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        self.conn: _Connection | None = None
        self.done = False

    def send_now(self) -> None:
        """Write the request at once when a kept-alive connection is open (else entering
        the block connects and writes it). Whoever calls this enters the block or calls
        :meth:`close`."""
        if self.conn is None and (conn := self.upstream._reuse(self.key)) is not None:
            self._send(conn)

    def _send(self, conn: _Connection) -> None:
        assert conn.transport is not None
        self.conn = conn
        conn.arm(self.upstream.read_timeout)
        conn.transport.write(self.request)

    async def __aenter__(self) -> Response:
        try:
            return await self._answer()
        except BaseException:  # a failure, or the caller cancelled: hang up
            self.close()
            raise

    async def _answer(self) -> Response:
        if self.conn is None:
            self._send(self._unless_withdrawn(await self.upstream._connect(self.key)))
        for attempt in (1, 2):
            conn = self.conn
            assert conn is not None
            try:
                while not conn.headers_done:
                    await conn.wait()
                return Response(conn)
            except UpstreamError:
                # a kept-alive connection the server closed while it sat idle (before a
                # byte of this answer): the request goes once more, on a new connection
                if attempt == 2 or not conn.reused or conn.answered or conn.timed_out \
                        or self.done:
                    raise
            self.upstream._release(conn, reusable=False)
            self.conn = None
            fresh = await self.upstream._connect(self.key, fresh=True)
            self._send(self._unless_withdrawn(fresh))
        raise AssertionError("unreachable")

    def _unless_withdrawn(self, conn: _Connection) -> _Connection:
        """``conn``, unless :meth:`close` was called while it was being opened."""
        if self.done:
            self.upstream._release(conn, reusable=False)
            raise UpstreamError("the request to the worker was withdrawn")
        return conn

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._finish(reusable=kind is None)

    def close(self) -> None:
        """Withdraw the request: hang up (which tells the worker to stop), or, before it
        was sent, see that it never is. A no-op once the block ended."""
        self._finish(reusable=False)

    def _finish(self, reusable: bool) -> None:
        if not self.done:
            self.done = True
            if self.conn is not None:
                self.upstream._release(self.conn, reusable=reusable)
