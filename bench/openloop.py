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
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def reconnect(self) -> None:
        self.sock.close()
        self.sock = socket.create_connection(self.address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buffer += chunk

    def exchange(self, request: bytes) -> int:
        """Send one request and read its answer; returns the status."""
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


def _run(conns: list[_Connection], connection: Callable[[int], None],
         latencies: list[list[float]], statuses: list[dict[int, int]], began: float) -> Result:
    """Run ``connection(i)`` for each connection on a thread of its own; merge what they
    recorded."""
    threads = [threading.Thread(target=connection, args=(i,)) for i in range(len(conns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
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
    parts = urlsplit(url)
    payload = request_bytes(url, method, body,
                            {"Content-Type": "application/json", **(headers or {})})
    assert parts.hostname is not None and parts.port is not None
    conns = [_Connection(parts.hostname, parts.port) for _ in range(connections)]
    latencies: list[list[float]] = [[] for _ in range(connections)]
    statuses: list[dict[int, int]] = [{} for _ in range(connections)]
    began = start if start is not None else time.perf_counter() + 0.05
    total = int(rate * seconds)

    def connection(index: int) -> None:
        conn, mine, seen = conns[index], latencies[index], statuses[index]
        for k in range(index, total, connections):
            due = began + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            request = payload if make is None else make(k)
            try:
                status = conn.exchange(request)
            except ConnectionError:  # closed by the server between two requests
                conn.reconnect()
                status = conn.exchange(request)
            mine.append((time.perf_counter() - due) * 1000)
            seen[status] = seen.get(status, 0) + 1

    return _run(conns, connection, latencies, statuses, began)


def closed_loop(url: str, *, connections: int, seconds: float, body: bytes = b"",
                method: str = "POST", start: float | None = None) -> Result:
    """Each of ``connections`` connections sends its next request as soon as its last answer
    arrives, for ``seconds`` from ``start``: the server's ceiling rate. Latency runs from
    each send, so it is the clients' own queue (Little's law), not a target's measure."""
    parts = urlsplit(url)
    payload = request_bytes(url, method, body, {"Content-Type": "application/json"})
    assert parts.hostname is not None and parts.port is not None
    conns = [_Connection(parts.hostname, parts.port) for _ in range(connections)]
    latencies: list[list[float]] = [[] for _ in range(connections)]
    statuses: list[dict[int, int]] = [{} for _ in range(connections)]
    began = start if start is not None else time.perf_counter()
    stop = began + seconds

    def connection(index: int) -> None:
        conn, mine, seen = conns[index], latencies[index], statuses[index]
        time.sleep(max(0.0, began - time.perf_counter()))
        while (t0 := time.perf_counter()) < stop:
            try:
                status = conn.exchange(payload)
            except ConnectionError:  # closed by the server between two requests
                conn.reconnect()
                status = conn.exchange(payload)
            mine.append((time.perf_counter() - t0) * 1000)
            seen[status] = seen.get(status, 0) + 1

    return _run(conns, connection, latencies, statuses, began)
