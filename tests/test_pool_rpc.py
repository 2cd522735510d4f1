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

from tests.test_pool_managerd import Pool, start_pool, stop_pool

MIB = 2**20


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
