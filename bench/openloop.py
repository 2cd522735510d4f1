"""An open-loop HTTP/1.1 load generator: requests on a fixed schedule, latency from the schedule.

A closed-loop client (each sends its next request when the last answer arrives) measures its
own queue: with C clients, latency is C / rate by Little's law whatever the server does, and
a slow answer delays the requests behind it without counting them (coordinated omission).
Here ``connections`` keep-alive connections share one fixed schedule of ``rate`` requests per
second; each request's latency runs from its scheduled time to the end of its answer, so a
server that falls behind is charged for every request it delayed.

One thread per connection with a blocking socket, no HTTP library: the client's own cost
per request (tens of microseconds, the GIL released while it sleeps or waits for the answer)
stays small next to the server's on a machine where both share the cores.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import attrs


@attrs.define
class Result:
    sent: int
    seconds: float
    latencies_ms: list[float]
    statuses: dict[int, int]

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def request_bytes(url: str, method: str, body: bytes, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    lines = [f"{method} {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self._open()

    def _open(self) -> None:
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buffer += chunk

    def exchange(self, request: bytes) -> int:
        """Send one request and read its answer; returns the status. A connection the
        server closed between two requests is opened again, once."""
        try:
            return self._exchange(request)
        except ConnectionError:
            self.sock.close()
            self._open()
            return self._exchange(request)

    def _exchange(self, request: bytes) -> int:
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._more()
        head, rest = self.buffer[:end], self.buffer[end + 4:]
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.buffer = rest
        while len(self.buffer) < length:
            self._more()
        self.buffer = self.buffer[length:]
        return int(head[9:12])


#: what one connection's thread is given: its index, its connection, the time the run
#: began (a ``time.perf_counter()`` value) and ``record(latency_ms, status)``
Drive = Callable[[int, "_Connection", float, Callable[[float, int], None]], None]


def _run(url: str, connections: int, start: float | None, lead: float, drive: Drive
         ) -> Result:
    """Open ``connections`` connections to ``url``'s host, then run ``drive`` for each on a
    thread of its own from ``start`` (default: ``lead`` seconds after they are open); merge
    what they recorded."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    conns = [_Connection(parts.hostname, parts.port) for _ in range(connections)]
    latencies: list[list[float]] = [[] for _ in range(connections)]
    statuses: list[dict[int, int]] = [{} for _ in range(connections)]
    began = start if start is not None else time.perf_counter() + lead

    def thread(index: int) -> None:
        mine, seen = latencies[index], statuses[index]

        def record(latency_ms: float, status: int) -> None:
            mine.append(latency_ms)
            seen[status] = seen.get(status, 0) + 1

        drive(index, conns[index], began, record)

    threads = [threading.Thread(target=thread, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    for conn in conns:
        conn.sock.close()
    merged: dict[int, int] = {}
    for seen in statuses:
        for status, n in seen.items():
            merged[status] = merged.get(status, 0) + n
    flat = [x for mine in latencies for x in mine]
    return Result(sent=len(flat), seconds=elapsed, latencies_ms=flat, statuses=merged)


def open_loop(url: str, *, rate: float, connections: int, seconds: float,
              body: bytes = b"", method: str = "POST", headers: dict[str, str] | None = None,
              make: Callable[[int], bytes] | None = None, start: float | None = None) -> Result:
    """Send ``rate`` requests per second for ``seconds`` over ``connections`` connections;
    ``make(k)`` builds request ``k`` (default: the same request to ``url`` each time).
    ``start`` (a ``time.perf_counter()`` value) lines several schedules up."""
    payload = request_bytes(url, method, body,
                            {"Content-Type": "application/json", **(headers or {})})
    total = int(rate * seconds)

    def drive(index: int, conn: _Connection, began: float,
              record: Callable[[float, int], None]) -> None:
        for k in range(index, total, connections):
            due = began + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            status = conn.exchange(payload if make is None else make(k))
            record((time.perf_counter() - due) * 1000, status)

    return _run(url, connections, start, 0.05, drive)


def closed_loop(url: str, *, connections: int, seconds: float, body: bytes = b"",
                method: str = "POST", start: float | None = None) -> Result:
    """Each of ``connections`` connections sends its next request as soon as its last answer
    arrives, for ``seconds`` from ``start``: the server's ceiling rate. Latency runs from
    each send, so it is the clients' own queue (Little's law), not a target's measure."""
    payload = request_bytes(url, method, body, {"Content-Type": "application/json"})

    def drive(index: int, conn: _Connection, began: float,
              record: Callable[[float, int], None]) -> None:
        time.sleep(max(0.0, began - time.perf_counter()))
        while (t0 := time.perf_counter()) < began + seconds:
            status = conn.exchange(payload)
            record((time.perf_counter() - t0) * 1000, status)

    return _run(url, connections, start, 0.0, drive)
