"""The one SSE writer and reader: what a frame looks like on the wire and what the reader
makes of any way the wire may split it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rbees_core import sse
from rbees_core.sse import Decoder, Event

BODY = ('id: 1\r\nevent: token\r\ndata: {"t": "h\u00e9\u4e16"}\r\n\r\n'
        ": a comment\r"
        "retry: 100\r"
        "data: first\rdata:second\rdata\r\r"
        "event: end\nid: 2\ndata: {}\n\n"
        "event: lonely\n\n"
        "data: no end").encode()
EXPECTED = [Event("token", '{"t": "h\u00e9\u4e16"}', "1"), Event("", "first\nsecond\n", "1"),
            Event("end", "{}", "2")]


def test_writer_splits_multiline_data_and_the_reader_joins_it() -> None:
    text = sse.frame("a\r\nb\nc\rd", event="note", id=7)
    assert text == "id: 7\nevent: note\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    assert sse.parse(text) == [Event("note", "a\nb\nc\nd", "7")]
    assert sse.frame("[DONE]") == "data: [DONE]\n\n"
    assert sse.frame("") == "data: \n\n"
    assert sse.parse(sse.frame("")) == [Event("", "", None)]


def test_writer_refuses_line_breaks_in_names_and_ids() -> None:
    with pytest.raises(ValueError, match="event name"):
        sse.frame("x", event="a\nb")
    with pytest.raises(ValueError, match="id"):
        sse.frame("x", id="1\r2")


def test_json_frame_is_one_data_line() -> None:
    data = {"t": "line\nbreak\r\u2028", "i": 3}
    text = sse.json_frame(4, "token", data)
    assert text.count("\n") == 4
    (event,) = sse.parse(text)
    assert (event.event, event.id, event.json()) == ("token", "4", data)
    assert sse.json_frame(None, "end", {}) == "event: end\ndata: {}\n\n"


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, 10_000])
def test_reader_takes_any_chunking(size: int) -> None:
    decoder, got = Decoder(), []
    for start in range(0, len(BODY), size):
        got += decoder.feed(BODY[start:start + size])
    assert got == EXPECTED
    assert decoder.last_id == "2"


def test_reader_takes_lines() -> None:
    lines = BODY.decode().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    assert list(sse.iter_events(lines)) == EXPECTED


def test_ids_with_nul_are_ignored_and_a_blank_id_resets() -> None:
    assert sse.parse("id: 5\ndata: a\n\nid: x\0y\ndata: b\n\nid\ndata: c\n\n") == [
        Event("", "a", "5"), Event("", "b", "5"), Event("", "c", "")]


async def test_aiter_events_over_httpx_bytes_and_lines() -> None:
    async def stream(request: Request) -> Response:
        return Response(BODY, media_type="text/event-stream")

    app = Starlette(routes=[Route("/", stream)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as client:
        async with client.stream("GET", "/") as answer:
            assert [e async for e in sse.aiter_events(answer.aiter_bytes())] == EXPECTED
        async with client.stream("GET", "/") as answer:
            assert [e async for e in sse.aiter_events(answer.aiter_lines())] == EXPECTED


async def test_aiter_events_over_a_process_stdout() -> None:
    frames = "".join(sse.json_frame(i, "token", {"t": "\u00e9" * i}) for i in range(1, 4))
    proc = await asyncio.create_subprocess_exec(
        "printf", "%s", frames, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None

    async def chunks() -> AsyncIterator[bytes]:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(3):
            yield chunk

    got = [(e.id, e.event, e.json()) async for e in sse.aiter_events(chunks())]
    await proc.wait()
    assert got == [(str(i), "token", {"t": "\u00e9" * i}) for i in range(1, 4)]


def test_pinger_puts_its_item_only_after_a_quiet_interval() -> None:
    async def run() -> list[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        pinger = sse.Pinger(queue, "ping", 0.05)
        got = []
        for _ in range(6):  # busy: touched every 0.02 s, no ping
            await asyncio.sleep(0.02)
            pinger.touch()
        assert queue.empty()
        got.append(await asyncio.wait_for(queue.get(), 1))  # quiet: one comes
        await asyncio.sleep(0.12)
        pinger.close()
        await asyncio.sleep(0.1)
        while not queue.empty():
            got.append(queue.get_nowait())
        return got

    got = asyncio.run(run())
    assert got[0] == "ping" and 2 <= len(got) <= 4  # then about one per interval, until closed
    assert sse.parse(sse.PING + b"data: x\n\n")[0].data == "x"  # readers skip it
