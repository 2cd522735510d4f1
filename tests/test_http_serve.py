"""rbees_core.http.serve: the server every daemon runs, over real sockets on loopback."""

from __future__ import annotations

import asyncio
import gc
import socket
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from rbees_core.http import serve
from rbees_core.testing import find_free_port


async def two_parts(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"first "
        yield b"second"
    return StreamingResponse(body())  # headers and body go out in separate writes


def app(lifespan: Any = None) -> Starlette:
    return Starlette(routes=[Route("/two", two_parts)], lifespan=lifespan)


async def wait_listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise AssertionError("the server never listened")


async def test_answers_promptly_and_collects_on_a_timer_while_serving() -> None:
    port, shutdown = find_free_port(), asyncio.Event()
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    server = asyncio.create_task(serve(app(), "127.0.0.1", port, shutdown))
    try:
        await wait_listening(port)
        assert gc.get_threshold()[2] == 2**31 - 1 and gc.get_freeze_count() > frozen
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            took = []
            for _ in range(15):
                t0 = time.perf_counter()
                answer = await client.get("/two")
                took.append(time.perf_counter() - t0)
                assert answer.text == "first second"
        # a response in two writes waits for the client's delayed ACK (40 ms) unless the
        # accepted socket has TCP_NODELAY
        assert statistics.median(took) < 0.02, took
    finally:
        shutdown.set()
        await asyncio.wait_for(server, 10)
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen


async def test_a_port_in_use_is_an_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await serve(app(), "127.0.0.1", port, asyncio.Event())


async def test_a_failed_startup_is_raised_again() -> None:
    @asynccontextmanager
    async def broken(app: Starlette) -> AsyncIterator[None]:
        raise RuntimeError("the store is locked")
        yield

    with pytest.raises(RuntimeError, match="the store is locked"):
        await asyncio.wait_for(serve(app(broken), "127.0.0.1", find_free_port(),
                                     asyncio.Event()), 10)
