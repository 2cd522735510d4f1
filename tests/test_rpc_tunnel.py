"""The authenticated tunnel to another pool's RPC server (issue 27, item 4,
rbees_core.rpc_tunnel): only who proves the pool's control token gets through, a dead far
end is noticed, and a real sharded worker through a pool's gateway answers as the unsharded
one. The RPC server itself listens on loopback only (tests/test_pool_rpc.py; from another
network namespace: features/sharding.feature)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rbees_core.auth import pool_control_token
from rbees_core.errors import ModelLoadError
from rbees_core.rpc_tunnel import LocalEnd, open_tunnels, parse_url, serve_gateway
from rbees_core.testing import WorkerHandle
from tests.test_pool_managerd import stop_pool
from tests.test_pool_rpc import LENDER_TOKEN, start_lender

MIB = 2**20


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_only_the_pools_token_gets_through() -> None:
    target, port = await echo_server()
    gateway = await serve_gateway("127.0.0.1", 0, token="secret-token",
                                  target=lambda sid: port if sid == "rpc-cpu-0" else None)
    g = gateway.sockets[0].getsockname()[1]
    try:
        endpoints, ends = await open_tunnels(
            (f"rbees-rpc://127.0.0.1:{g}/rpc-cpu-0", "127.0.0.1:1"), "secret-token")
        assert endpoints[1] == "127.0.0.1:1"  # a plain endpoint is left as it is
        host, _, local = endpoints[0].rpartition(":")
        assert host == "127.0.0.1"
        reader, writer = await asyncio.open_connection(host, int(local))
        writer.write(b"hello")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        writer.close()
        for end in ends:
            end.close()
        with pytest.raises(ModelLoadError, match="refused: NO bad proof"):
            await LocalEnd(f"rbees-rpc://127.0.0.1:{g}/rpc-cpu-0", "wrong").start()
        with pytest.raises(ModelLoadError, match="no RPC server"):
            await LocalEnd(f"rbees-rpc://127.0.0.1:{g}/rpc-cpu-9", "secret-token").start()
        with pytest.raises(ModelLoadError, match="needs the pool's token"):
            await open_tunnels((f"rbees-rpc://127.0.0.1:{g}/rpc-cpu-0",), None)
        # a client that does not know the protocol gets nothing but the greeting and a NO
        reader, writer = await asyncio.open_connection("127.0.0.1", g)
        assert (await reader.readline()).startswith(b"RBEES-RPC/1 ")
        writer.write(b"\x00\x01\x02 raw llama.cpp rpc\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"NO ")
        assert await reader.read() == b""
        writer.close()
        await asyncio.sleep(0.2)  # the handlers' own closes
    finally:
        gateway.close()
        target.close()
        await gateway.wait_closed()


async def test_a_far_end_that_goes_away_is_reported() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(4)  # one answer (none to the tunnel's probe), then gone
        if data:
            writer.write(data)
            await writer.drain()
        writer.close()

    target = await asyncio.start_server(once, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    gateway = await serve_gateway("127.0.0.1", 0, token="t", target=lambda sid: port)
    g = gateway.sockets[0].getsockname()[1]
    dead: list[str] = []
    end = LocalEnd(f"rbees-rpc://127.0.0.1:{g}/x", "t", on_dead=dead.append)
    host, _, local = (await end.start()).rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(local))
    writer.write(b"ping")
    await writer.drain()
    assert await reader.readexactly(4) == b"ping"
    assert await asyncio.wait_for(reader.read(), 10) == b""  # llama.cpp's side is closed
    deadline = time.monotonic() + 5
    while not dead and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert dead and "ended" in dead[0]
    writer.close()
    end.close()
    gateway.close()
    target.close()
    await asyncio.sleep(0.2)


def test_urls() -> None:
    assert parse_url("rbees-rpcs://10.0.0.2:4000/rpc-cpu-0") == ("10.0.0.2", 4000,
                                                                  "rpc-cpu-0", True)
    with pytest.raises(ModelLoadError, match="expected"):
        parse_url("http://10.0.0.2:4000/x")


def test_a_sharded_worker_through_a_pools_gateway(
        tmp_path: Path, rbees_worker: Callable[..., WorkerHandle]) -> None:
    token = LENDER_TOKEN
    pool = start_lender(tmp_path)
    try:
        answer = pool.post("/v2/rpc/start", {"device": "cpu", "memory_bytes": 200 * MIB})
        assert answer.status_code == 202, answer.text
        sid = answer.json()["server_id"]
        deadline = time.monotonic() + 60
        while True:
            entry = {s["server_id"]: s for s in pool.get("/v2/state")["rpc_servers"]}[sid]
            if entry["state"] == "ready" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert entry["state"] == "ready" and entry["tunnel"].startswith("rbees-rpc://")
        assert entry["tunnel"].endswith(f"/{sid}")
        control = tmp_path / "control"
        control.write_text(pool_control_token(token, "testpool"))
        control.chmod(0o600)
        body = {"job_id": "j1", "prompt": "Bees make honey because", "max_tokens": 16,
                "temperature": 0, "seed": 1}
        whole = rbees_worker(worker_id="whole")
        expected = whole.text(body)
        whole.process.stop()
        sharded = rbees_worker(worker_id="sharded", extra=[
            "--rpc", entry["tunnel"], "--rpc-token-file", str(control),
            "--tensor-split", "1,1", "--threads", "1"])
        assert sharded.text(body) == expected
        # a worker without the pool's token does not get in: its load fails
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token")
        wrong.chmod(0o600)
        sharded.process.stop()
        with pytest.raises(RuntimeError, match="refused"):
            rbees_worker(worker_id="intruder", extra=[
                "--rpc", entry["tunnel"], "--rpc-token-file", str(wrong)], ready_timeout=30)
    finally:
        assert stop_pool(pool) == 0
