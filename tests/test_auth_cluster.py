"""Credentials on a real cluster (issue 25): ``rbees up`` with an operator token file,
``rbees keys create|list|usage`` over HTTP, a chat completion with a key through a real
SmolLM2 worker, usage counters equal to the tokens the job reports, the job owned by the key,
what a client key cannot do, and no log file holding a key or the token."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from rbees_core.testing.cluster import up

TOKEN = "cluster-operator-token-0123456789"


def test_a_key_runs_a_job_its_usage_counts_its_tokens_and_no_log_holds_a_secret(
        tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    home = tmp_path / "home"
    cluster = up(home, environ={"RBEES_API_TOKEN_FILE": str(token_file)})
    try:
        made = cluster.rbees("keys", "create", "alice", "--scope", "inference",
                             "--rpm", "60", "--expires", "30d")
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        assert key.startswith("rbk_") and "\n" not in key
        listed = json.loads(cluster.rbees("keys", "list", "--format", "json").stdout)
        assert [k["name"] for k in listed] == ["alice"] and key not in json.dumps(listed)
        auth = {"Authorization": f"Bearer {key}"}
        answer = httpx.post(f"{cluster.url}/v1/chat/completions", headers=auth, timeout=300,
                            json={"model": "smollm2", "max_tokens": 4, "temperature": 0,
                                  "messages": [{"role": "user", "content": "Hi"}]})
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        (job,) = httpx.get(f"{cluster.url}/v2/tasks", headers=auth, timeout=10).json()["jobs"]
        assert job["owner"] == "alice"
        rows: list[dict[str, Any]] = []
        for _ in range(100):
            rows = json.loads(cluster.rbees("keys", "usage", "--format", "json").stdout)
            if rows:
                break
            time.sleep(0.1)
        (row,) = rows
        assert (row["key"], row["requests"]) == ("alice", 1)
        assert row["prompt_tokens"] == usage["prompt_tokens"] == job["tokens_in"]
        assert row["completion_tokens"] == usage["completion_tokens"] == job["tokens_out"]
        # what a client key cannot do, whatever the path
        pool_id = job["pool_id"]
        assert httpx.post(f"{cluster.url}/v2/pools/{pool_id}/heartbeat", headers=auth,
                          json={}).status_code == 403
        assert httpx.post(f"{cluster.url}/v2/pools/{pool_id}/workers", headers=auth,
                          json={}).status_code == 403
        assert httpx.post(f"{cluster.url}/v2/pools/{pool_id}/workers/{job['worker_id']}"
                          "/stop", headers=auth).status_code == 403
        assert httpx.request("DELETE", f"{cluster.url}/api/delete", headers=auth,
                             json={"model": "smollm2"}).status_code == 403
        assert httpx.get(f"{cluster.pool_url}/v2/workers", headers=auth).status_code == 401
        # --tpm: once a minute's jobs used the key's tokens, the next request waits
        bob = cluster.rbees("keys", "create", "bob", "--scope", "inference", "--tpm", "5")
        assert bob.returncode == 0, bob.stderr
        as_bob = {"Authorization": f"Bearer {bob.stdout.strip()}"}
        chat = {"model": "smollm2", "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Hi"}]}
        assert httpx.post(f"{cluster.url}/v1/chat/completions", headers=as_bob, json=chat,
                          timeout=300).status_code == 200  # nothing used yet
        limited = httpx.post(f"{cluster.url}/v1/chat/completions", headers=as_bob, json=chat,
                             timeout=300)
        assert limited.status_code == 429, limited.text
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert limited.json()["error"]["type"] == "rate_limit_error"
    finally:
        cluster.rbees("down")
    # no file the cluster wrote (logs, state, run files) holds the key or the token
    for path in home.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 * 2**20 and "models" not in path.parts:
            data = path.read_bytes()
            assert key.encode() not in data, path
            assert key.rsplit("_", 1)[1].encode() not in data, path
            if path.name != "token":
                assert TOKEN.encode() not in data, path
