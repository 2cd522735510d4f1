"""An open-loop HTTP/1.1 load generator: requests on a fixed schedule, latency from the schedule.

A closed-loop client (each sends its next request when the last answer arrives) measures its
own queue: with C clients, latency is C / rate by Little's law whatever the server does, and
a slow answer delays the requests behind it without counting them (coordinated omission).
Here ``connections`` keep-alive connections share one fixed schedule of ``rate`` requests per
second; each request's latency runs from its scheduled time to the end of its answer, so a
server that falls behind is charged for every request it delayed.

Raw asyncio streams, no HTTP library: the client's own cost per request stays small next to
the server's on a machine where both share the cores.
"""

from __future__ import annotations

import asyncio
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


async def _read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def open_loop(url: str, *, rate: float, connections: int, seconds: float,
                    body: bytes = b"", method: str = "POST",
                    headers: dict[str, str] | None = None,
                    make: Callable[[int], bytes] | None = None) -> Result:
    """Send ``rate`` requests per second for ``seconds`` over ``connections`` connections;
    ``make(k)`` builds request ``k`` (default: the same request to ``url`` each time)."""
    parts = urlsplit(url)
    payload = request_bytes(url, method, body,
                            {"Content-Type": "application/json", **(headers or {})})
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    streams = [await asyncio.open_connection(parts.hostname, parts.port)
               for _ in range(connections)]
    start = time.perf_counter() + 0.05
    total = int(rate * seconds)

    async def connection(index: int) -> None:
        nonlocal sent
        reader, writer = streams[index]
        for k in range(index, total, connections):
            due = start + k / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = payload if make is None else make(k)
            writer.write(request)
            try:
                status = await _read_answer(reader)
            except (asyncio.IncompleteReadError, ConnectionError):  # closed by the server
                writer.close()
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                streams[index] = (reader, writer)
                writer.write(request)
                status = await _read_answer(reader)
            latencies.append((time.perf_counter() - due) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
            sent += 1

    await asyncio.gather(*(connection(i) for i in range(connections)))
    elapsed = time.perf_counter() - start
    for _, writer in streams:
        writer.close()
    return Result(sent=sent, seconds=elapsed, latencies_ms=latencies, statuses=statuses)
