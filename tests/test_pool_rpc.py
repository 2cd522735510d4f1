"""pool-managerd's llama.cpp RPC servers (issue 27, item 1): off by default, started and
stopped on request for one device, bound to loopback, their memory reserved in the pool's
accounting and shown in /v2/state; a server that dies is failed and its memory released."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from tests.test_pool_managerd import Pool, start_pool, stop_pool

MIB = 2**20


#: the control token of the lending pools these tests start
LENDER_TOKEN = "pool-token-0123456789abcdef"


def start_lender(tmp_path: Path) -> Pool:
    """A pool-managerd with ``[pool] rpc = true`` and :data:`LENDER_TOKEN` as its token
    file (its gateway lets in who proves it)."""
    token_file = tmp_path / "token"
    token_file.write_text(LENDER_TOKEN)
    token_file.chmod(0o600)
    return start_pool(tmp_path / "home", "--api-token-file", str(token_file),
                      token=LENDER_TOKEN, env={"RBEES_POOL_RPC": "true"})


def wait_server(pool: Pool, server_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = {s["server_id"]: s for s in pool.get("/v2/state")["rpc_servers"]}
        entry: dict[str, Any] = found[server_id]
        if entry["state"] == state:
            return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"{server_id} not {state}: {entry}\n{pool.log.read_text()}")
        time.sleep(0.1)


def listens_on(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def other_address() -> str | None:
    """An address of this host that is not loopback (None when it has none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            address = str(s.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_rpc_is_off_by_default(tmp_path: Path) -> None:
    pool = start_pool(tmp_path / "home")
    try:
        assert pool.get("/v2/state")["rpc"] is False
        answer = pool.post("/v2/rpc/start", {"device": "cpu", "memory_bytes": 64 * MIB})
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "RPC_DISABLED"
    finally:
        stop_pool(pool)


def test_a_server_is_reserved_supervised_and_loopback_only(tmp_path: Path) -> None:
    pool = start_pool(tmp_path / "home", env={"RBEES_POOL_RPC": "true",
                                              "RBEES_POOL_MEMORY_LIMIT": "1GiB"})
    try:
        state = pool.get("/v2/state")
        assert state["rpc"] is True and state["rpc_servers"] == []
        assert state["cpu"]["ram_total_bytes"] == 1024 * MIB
        before = state["cpu"]["ram_free_bytes"]
        too_big = pool.post("/v2/rpc/start", {"device": "cpu", "memory_bytes": 2048 * MIB})
        assert too_big.status_code == 409
        assert too_big.json()["error"]["code"] == "INSUFFICIENT_RAM"

        answer = pool.post("/v2/rpc/start", {"device": "cpu", "memory_bytes": 300 * MIB})
        assert answer.status_code == 202, answer.text
        sid = answer.json()["server_id"]
        entry = wait_server(pool, sid, "ready")
        host, _, port = entry["endpoint"].rpartition(":")
        assert host == "127.0.0.1" and listens_on(host, int(port))
        address = other_address()
        if address is not None:  # bound to loopback: not reachable by the host's address
            assert not listens_on(address, int(port))
        state = pool.get("/v2/state")
        assert state["cpu"]["ram_free_bytes"] == min(before, 1024 * MIB - 300 * MIB)
        # what it reserves counts in the next preflight: 800 MiB no longer fits 1 GiB
        second = pool.post("/v2/rpc/start", {"device": "cpu", "memory_bytes": 800 * MIB})
        assert second.status_code == 409

        stopped = pool.post(f"/v2/rpc/{sid}/stop")
        assert stopped.status_code == 202 and stopped.json()["state"] == "stopped"
        assert pool.get("/v2/state")["cpu"]["ram_free_bytes"] == before
        assert not listens_on(host, int(port))

        # a server that dies is failed, its memory released
        sid = pool.post("/v2/rpc/start", {"device": "cpu",
                                          "memory_bytes": 100 * MIB}).json()["server_id"]
        entry = wait_server(pool, sid, "ready")
        os.kill(entry["pid"], signal.SIGKILL)
        entry = wait_server(pool, sid, "failed", timeout=10)
        assert "exited" in entry["error"]
        assert pool.get("/v2/state")["cpu"]["ram_free_bytes"] == before
    finally:
        assert stop_pool(pool) == 0


def test_a_pool_starts_a_sharded_worker_through_a_gateway(tmp_path: Path) -> None:
    """POST /v2/workers/start with rpc (a lender's tunnel URL) and rpc_token: the worker
    holds its share (its preflight counts that, not the whole model) and serves jobs."""
    from rbees_core.auth import pool_control_token

    token = LENDER_TOKEN
    pool = start_lender(tmp_path)
    try:
        sid = pool.post("/v2/rpc/start", {"device": "cpu", "memory_bytes": 200 * MIB}
                        ).json()["server_id"]
        tunnel = wait_server(pool, sid, "ready")["tunnel"]
        answer = pool.post("/v2/workers/start", {
            "model_ref": "smollm2", "device": "cpu", "threads": 1, "tensor_split": [1, 3],
            "rpc": [tunnel], "rpc_token": pool_control_token(token, "testpool")})
        assert answer.status_code == 202, answer.text
        wid = answer.json()["worker_id"]
        entry = pool.wait_worker(wid, "ready", timeout=120)
        state = pool.get("/v2/state")
        model = next(m for m in state["models"] if "smollm2" in m["ref"].lower())
        assert entry["memory_bytes"] < model["memory_bytes"]  # a quarter of its layers
        token_path = pool.home / "workers" / wid / "rpc"
        assert oct(token_path.stat().st_mode & 0o777) == "0o600"
        reply = httpx.post(f"{entry['uri']}/v2/execute", json={
            "job_id": "j1", "prompt": "Bees are", "max_tokens": 8, "temperature": 0},
            headers={"Authorization": f"Bearer {pool_control_token(token, 'testpool')}"},
            timeout=60)
        assert reply.status_code == 200 and "event: end" in reply.text, reply.text
    finally:
        assert stop_pool(pool) == 0


def test_a_pool_lists_its_live_rpc_servers_and_only_the_latest_ended_ones() -> None:
    """Like its workers (tests/test_pool_managerd.py), a pool keeps the ENDED_KEPT latest
    stopped or failed RPC servers, not every one it started: both go through
    ``workers.forget_ended``."""
    import io
    from types import SimpleNamespace

    from rbees_core.log import Logger
    from rbees_core.pool.rpc import ENDED_KEPT, RpcServers

    servers = RpcServers(SimpleNamespace(log=Logger("test", io.StringIO())), enabled=True,
                         changed=lambda: None)
    states = ["failed", "stopped", "ready"] * 10 + ["starting", "stopping"]
    for i, state in enumerate(states):
        servers.servers[f"r{i}"] = SimpleNamespace(state=state)  # type: ignore[assignment]
    servers._forget_ended()
    ended = [f"r{i}" for i, s in enumerate(states) if s in ("failed", "stopped")]
    live = [f"r{i}" for i, s in enumerate(states) if s not in ("failed", "stopped")]
    assert len(ended) > ENDED_KEPT
    assert sorted(servers.servers) == sorted(live + ended[-ENDED_KEPT:])
