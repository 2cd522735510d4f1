"""``rbees jobs submit`` with no daemon anywhere (M0): scheduling here, state and workers over
a real OpenSSH server on loopback (``rbees_sshd``), tokens through an SSH port forward."""

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

import attrs
import httpx
import pytest

from rbees_core.config import PlacementConfig
from rbees_core.hosts import HostConfig, save_hosts
from rbees_core.models import DEFAULT_MODEL_REF
from rbees_core.testing import find_free_port
from rbees_core.testing.ssh import SshServer, venv_rbees_pool

RBEES = str(Path(sys.executable).with_name("rbees"))
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@attrs.define
class Setup:
    env: dict[str, str]
    local: Path  # this side's RBEES_HOME
    remote: Path  # the host's RBEES_HOME
    server: SshServer

    def pool(self, *args: str) -> Any:
        """``rbees-pool ... --format json`` on the host's side (same machine)."""
        done = subprocess.run([venv_rbees_pool(), *args, "--format", "json"],
                              capture_output=True, text=True, timeout=60,
                              env={**self.env, "RBEES_HOME": str(self.remote)})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def hosts(self, *, unreachable: bool = False) -> None:
        remote_env = {"RBEES_HOME": str(self.remote), "HOME": str(self.remote.parent / "rh")}
        hosts = {"pool1": HostConfig(name="pool1", destination=f"{self.server.user}@127.0.0.1:"
                                     f"{self.server.port}", remote_pool=venv_rbees_pool(),
                                     env=remote_env)}
        if unreachable:  # nothing listens there
            hosts["down"] = HostConfig(name="down", destination=f"127.0.0.1:{find_free_port()}",
                                       remote_pool=venv_rbees_pool(), connect_timeout_s=2)
        save_hosts(hosts, self.local / "hosts.toml")

    def submit(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RBEES, "jobs", "submit", "--model", DEFAULT_MODEL_REF, *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([RBEES, "jobs", "submit", "--model", DEFAULT_MODEL_REF, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)


@pytest.fixture(scope="module")
def m0(rbees_sshd: SshServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("m0")
    home, local, remote = root / "home", root / "rbees", root / "remote-rbees"
    (home / ".ssh").mkdir(parents=True)
    key = home / ".ssh" / "id_ed25519"
    key.write_bytes(rbees_sshd.client_key.read_bytes())
    key.chmod(0o600)
    (local / "run").mkdir(parents=True)
    (local / "known_hosts").write_text(rbees_sshd.known_hosts_line())
    # no rbees-orcd: where one would be recorded, nothing listens
    (local / "run" / "rbees-orcd.url").write_text(f"http://127.0.0.1:{find_free_port()}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RBEES_", "SSH_")) and k != "HF_ENDPOINT"}
    env.update(HOME=str(home), RBEES_HOME=str(local), COLUMNS="200")
    setup = Setup(env=env, local=local, remote=remote, server=rbees_sshd)
    setup.hosts()
    yield setup
    subprocess.run([venv_rbees_pool(), "worker", "stop", "--all", "--grace", "1"],
                   capture_output=True, timeout=60, env={**env, "RBEES_HOME": str(remote)})


def _ready_workers(setup: Setup) -> list[dict[str, Any]]:
    return [w for w in setup.pool("worker", "list") if w["state"] in ("ready", "busy")]


def test_a_job_with_no_daemon_streams_tokens_over_ssh(m0: Setup) -> None:
    done = m0.submit("--prompt", "What is the capital of France?", "--max-tokens", "8",
                     "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), done.stderr
    assert "starting a cpu worker" in done.stderr
    assert " tokens, " in done.stderr and "first token" in done.stderr
    (worker,) = _ready_workers(m0)
    assert worker["model_ref"] == DEFAULT_MODEL_REF
    # [placement]'s defaults, as rbees-orcd gives them: the next jobs fill its slots
    assert worker["slots_total"] == PlacementConfig().cpu_slots == 4
    assert m0.server.wait_no_sessions() == []


def test_a_second_job_reuses_the_worker_and_starts_within_a_second(m0: Setup) -> None:
    before = _ready_workers(m0)
    done = m0.submit("--prompt", "Say hello.", "--max-tokens", "4", "--temperature", "0",
                     "--host", "pool1", "--format", "json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["worker_started"] is False
    assert record["worker_id"] == before[0]["worker_id"]
    assert record["end"]["tokens_out"] >= 1 and record["text"]
    assert record["timings"]["first_token_ms"] < 1000, record["timings"]
    # and measured from process start to the first byte on stdout
    began = time.monotonic()
    proc = m0.popen("--prompt", "Say hello.", "--max-tokens", "4", "--temperature", "0")
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = time.monotonic() - began
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert first
    print(f"process start to first stdout byte: {elapsed * 1000:.0f} ms; in-process first "
          f"token: {record['timings']['first_token_ms']:.0f} ms")
    assert elapsed < 3.0  # Python's own start-up included, on a busy CI machine
    assert len(_ready_workers(m0)) == 1


def test_ctrl_c_cancels_the_job_on_the_worker(m0: Setup) -> None:
    (worker,) = _ready_workers(m0)
    proc = m0.popen("--prompt", COUNTING, "--raw", "--temperature", "0", "--max-tokens", "3000",
                    "--host", "pool1")
    assert proc.stdout is not None
    got = proc.stdout.read(8)  # streaming has begun
    assert got
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    while True:  # the worker's own /v2/ready, at the uri `worker list` gave
        ready = httpx.get(f"{worker['uri']}/v2/ready", timeout=1.0).json()
        if ready["slots_free"] == ready["slots_total"]:
            break
        assert time.monotonic() - sent < 1.0, ready
        time.sleep(0.02)
    freed_ms = (time.monotonic() - sent) * 1000
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "cancelled m0-" in err.decode()
    job_id = err.decode().split("cancelled ")[1].split()[0]
    log = (m0.remote / "workers" / worker["worker_id"] / "worker.log").read_text()
    assert any("job_cancel" in line and job_id in line for line in log.splitlines())
    (listed,) = _ready_workers(m0)
    assert listed["slots_free"] == listed["slots_total"]
    print(f"slot free {freed_ms:.0f} ms after SIGINT")


def test_auto_skips_an_unreachable_host_and_says_why(m0: Setup) -> None:
    m0.hosts(unreachable=True)
    try:
        done = m0.submit("--prompt", "Hi", "--max-tokens", "2", "--host", "auto", "-v")
    finally:
        m0.hosts()
    assert done.returncode == 0, done.stderr
    assert "host down skipped: cannot reach 127.0.0.1:" in done.stderr
    (why,) = [line for line in done.stderr.splitlines() if line.startswith("rbees: scheduler:")]
    assert "policy least-loaded decided to dispatch the job to worker" in why.lower()
    assert "on pool pool1" in why
    print(done.stderr)


def test_a_worker_dying_mid_stream_is_one_error_line(m0: Setup) -> None:
    (worker,) = _ready_workers(m0)
    proc = m0.popen("--prompt", COUNTING, "--raw", "--temperature", "0", "--max-tokens", "3000",
                    "--host", "pool1")
    assert proc.stdout is not None
    assert proc.stdout.read(8)
    os.kill(worker["pid"], signal.SIGKILL)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    lines = err.decode().strip().splitlines()
    assert lines[-1].startswith("rbees: error: worker ") and "died mid-stream" in lines[-1]
    assert [line for line in lines if line.startswith("rbees: error")] == lines[-1:]


def test_once_stops_the_worker_it_started(m0: Setup) -> None:
    assert _ready_workers(m0) == []  # the last one was killed
    done = m0.submit("--prompt", "Hi", "--max-tokens", "2", "--host", "pool1", "--once",
                     "--format", "json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["worker_started"] is True
    states = {w["worker_id"]: w["state"] for w in m0.pool("worker", "list")}
    assert states.get(record["worker_id"], "gone") not in ("ready", "busy", "loading")


def test_a_model_no_host_holds_nor_any_source_gets_fails_at_once(m0: Setup) -> None:
    """NO_CAPACITY (issue 22): no waiting WAIT_FOR_WORKER_S for a worker that cannot come."""
    t0 = time.monotonic()
    done = subprocess.run([RBEES, "jobs", "submit", "--model", "pkg:llm_no_such_model",
                           "--prompt", "x"], capture_output=True, text=True, env=m0.env,
                          timeout=120)
    took = time.monotonic() - t0
    assert done.returncode == 1 and "NO_CAPACITY" in done.stderr, done.stderr
    assert "no pool holds pkg:llm_no_such_model" in done.stderr
    assert took < 30, f"{took:.1f} s"  # a program start and one round of SSH, not 60 s
