"""rbees-orcd's client for workers' job streams, against real servers on loopback: scripted
bytes from a raw socket server (chunk splits, failures) and the daemons' own SSE response
served by uvicorn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from rbees_core.http import EventStreamResponse, serve
from rbees_core.orchestrator.upstream import Upstream, UpstreamError
from rbees_core.testing import find_free_port

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")


@asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that reads one request head and body per exchange, records it, then runs
    ``script``; yields its URL and the requests it got, each prefixed by the number of its
    connection (b"1 POST ...")."""
    requests: list[bytes] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = b"%d " % connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                requests.append(number + head + await reader.readexactly(length))
                await script(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.close()


def upstream(read_timeout: float = 5.0) -> Upstream:
    return Upstream(connect_timeout=2.0, read_timeout=read_timeout)


async def collect(client: Upstream, url: str) -> tuple[int, list[tuple[str, Any]]]:
    async with client.post(f"{url}/v2/execute", {"job_id": "j"}, {}) as answer:
        return answer.status, [item async for item in answer.events()]


async def test_events_survive_any_split_and_the_connection_is_kept() -> None:
    frames = (b"event: started\ndata: {\"slot\": 0}\n\n: a comment\n\n"
              b"event: token\r\ndata: {\"t\": \"Hi\", \"i\": 0}\r\n\r\n"
              b"event: token\ndata:{\"t\": \" there\",\ndata: \"i\": 1}\n\n"
              b"data: {\"nameless\": true}\n\nevent: end\ndata: {\"tokens_out\": 2}\n\n")

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        for i in range(0, len(frames), 7):  # frames cut anywhere, written one by one
            writer.write(chunk(frames[i:i + 7]))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(b"0\r\n\r\n")

    client = upstream()
    async with raw_server(script) as (url, requests):
        for _ in range(2):
            status, events = await collect(client, url)
            assert status == 200
            assert events == [("started", {"slot": 0}), ("token", {"t": "Hi", "i": 0}),
                              ("token", {"t": " there", "i": 1}), ("end", {"tokens_out": 2})]
    client.close()
    assert [r[:2] for r in requests] == [b"1 ", b"1 "]  # one kept-alive connection
    head, _, body = requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"1 POST /v2/execute HTTP/1.1\r\n")
    assert json.loads(body) == {"job_id": "j"}


async def test_the_last_events_and_the_end_may_arrive_while_the_reader_is_busy() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(b"event: token\ndata: {\"i\": 0}\n\n"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(chunk(b"event: token\ndata: {\"i\": 1}\n\n")
                     + chunk(b"event: end\ndata: {}\n\n") + b"0\r\n\r\n")

    async with raw_server(script) as (url, _):
        seen = []
        async with upstream().post(f"{url}/v2/execute", {}, {}) as answer:
            async for item in answer.events():
                seen.append(item)
                await asyncio.sleep(0.2)  # as a durable write would: the rest arrives now
        assert seen == [("token", {"i": 0}), ("token", {"i": 1}), ("end", {})]


async def test_a_whole_answer_read_slowly_is_not_a_silence() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(b"event: end\ndata: {}\n\n") + b"0\r\n\r\n")

    async with raw_server(script) as (url, _), \
            upstream(read_timeout=0.2).post(f"{url}/v2/execute", {}, {}) as answer:
        async for event, _ in answer.events():
            assert event == "end"
            await asyncio.sleep(0.5)  # as the final write might, past the read timeout


async def test_an_error_answer_is_read_whole() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = b'{"error": {"code": "ALL_SLOTS_BUSY"}}'
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))

    async with raw_server(script) as (url, _), \
            upstream().post(f"{url}/v2/execute", {}, {"Authorization": "Bearer x"}) as answer:
        assert answer.status == 503
        assert json.loads(await answer.read())["error"]["code"] == "ALL_SLOTS_BUSY"


async def test_a_stream_cut_mid_way_is_an_error_after_the_events_before_it() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(b"event: token\ndata: {\"t\": \"a\"}\n\n"))
        await writer.drain()
        await asyncio.sleep(0.1)  # the reader waits; the next event and the cut come at once
        writer.write(chunk(b"event: token\ndata: {\"t\": \"b\"}\n\n"))
        writer.close()

    async with raw_server(script) as (url, _):
        seen = []
        with pytest.raises(UpstreamError, match="closed the connection"):
            async with upstream().post(f"{url}/v2/execute", {}, {}) as answer:
                async for item in answer.events():
                    seen.append(item)
        assert seen == [("token", {"t": "a"}), ("token", {"t": "b"})]


async def test_a_silent_worker_times_out() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        await asyncio.sleep(5)

    async with raw_server(script) as (url, _):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamError, match=r"sent nothing for 0\.3 s"):
            async with upstream(read_timeout=0.3).post(f"{url}/v2/execute", {}, {}) as answer:
                [item async for item in answer.events()]
        assert 0.25 < loop.time() - t0 < 2.0


async def test_a_kept_alive_connection_the_server_closed_is_replaced_once() -> None:
    """The server answers once, then closes that connection when the next request comes
    (its idle timeout raced the reuse): the request goes again on a new connection."""
    seen: list[tuple[int, bytes]] = []
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        number = connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.lower().split(b"content-length: ")[1]
                                             .split(b"\r\n")[0]))
                seen.append((number, head.split(b"\r\n")[0]))
                if number == 1 and len(seen) == 2:
                    break  # closes without a byte of answer
                writer.write(SSE_HEAD + chunk(b"event: end\ndata: {}\n\n") + b"0\r\n\r\n")
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v2/execute"
    client = upstream()
    try:
        for _ in range(2):
            assert (await collect(client, url.removesuffix("/v2/execute")))[1] == [("end", {})]
    finally:
        client.close()
        server.close()
    assert [number for number, _ in seen] == [1, 1, 2]


async def test_a_withdrawn_request_is_never_sent_or_is_hung_up() -> None:
    """close() before the block: nothing is sent. Cancelled while it waits for the answer's
    headers: the connection is closed at once, which is how a worker learns to stop."""
    got: list[bytes] = []
    hung_up = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.read()  # no answer; until the client hangs up
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v2/execute"
    client = upstream()
    try:
        withdrawn = client.post(url, {}, {})
        withdrawn.close()
        with pytest.raises(UpstreamError, match="withdrawn"):
            async with withdrawn:
                pass

        async def waits() -> None:
            async with client.post(url, {}, {}):
                pass

        task = asyncio.create_task(waits())
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(hung_up.wait(), 2)
        assert len(got) == 1  # the withdrawn one never left
    finally:
        client.close()
        server.close()


async def test_no_listener_and_bad_input_are_errors_before_anything_is_sent() -> None:
    with pytest.raises(UpstreamError, match="cannot connect"):
        async with upstream().post(f"http://127.0.0.1:{find_free_port()}/v2/execute", {}, {}):
            pass
    with pytest.raises(UpstreamError, match="line break"):
        upstream().post("http://127.0.0.1:1/x", {}, {"X-Correlation-Id": "a\r\nHost: b"})
    with pytest.raises(UpstreamError, match="not a worker URL"):
        upstream().post("ftp://127.0.0.1/x", {}, {})


async def test_against_the_daemons_own_event_stream_and_leaving_early_hangs_up() -> None:
    """uvicorn + EventStreamResponse, as a worker serves /v2/execute; leaving the block
    before the end closes the connection, and the server sees the client go."""
    gone = asyncio.Event()

    async def execute(request: Request) -> EventStreamResponse:
        body = await request.json()
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        for i in range(body["tokens"]):
            queue.put_nowait(("token", {"t": f"w{i}", "i": i}))
        if body["end"]:
            queue.put_nowait(("end", {"tokens_out": body["tokens"]}))
        return EventStreamResponse(queue, on_disconnect=gone.set)

    port, shutdown = find_free_port(), asyncio.Event()
    server = asyncio.create_task(serve(Starlette(routes=[Route("/v2/execute", execute,
                                                               methods=["POST"])]),
                                       "127.0.0.1", port, shutdown))
    client, url = upstream(), f"http://127.0.0.1:{port}/v2/execute"
    events: list[tuple[str, Any]] = []
    try:
        for _ in range(100):
            try:
                async with client.post(url, {"tokens": 3, "end": True}, {}) as answer:
                    events = [item async for item in answer.events()]
                break
            except UpstreamError:
                await asyncio.sleep(0.05)
        assert events == [("token", {"t": "w0", "i": 0}), ("token", {"t": "w1", "i": 1}),
                          ("token", {"t": "w2", "i": 2}), ("end", {"tokens_out": 3})]
        assert [len(idle) for idle in client._idle.values()] == [1]  # kept for the next
        async with client.post(url, {"tokens": 2, "end": False}, {}) as answer:
            async for event, _ in answer.events():
                assert event == "token"
                break
        await asyncio.wait_for(gone.wait(), 5)
    finally:
        client.close()
        shutdown.set()
        await server
