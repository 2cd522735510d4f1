"""Evict to fit on a real cluster (issue 22, acceptance): a pool that offers memory for two
SmolLM2 workers (``[pool] memory_limit``), three models (the same GGUF under three names):
a request for the third stops the least recently used idle worker, recorded in its
decision, and then runs; a worker with a job running is never stopped for this."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pluggy

from rbees_core.pool.memory import Estimates
from rbees_core.testing.cluster import Cluster, up


def _workers(c: Cluster) -> dict[str, dict[str, Any]]:
    """Live workers of the pool by model reference."""
    listed = httpx.get(f"{c.pool_url}/v2/workers", timeout=10).json()["workers"]
    return {w["model_ref"]: w for w in listed if w["state"] in ("ready", "busy", "starting")}


def _run(c: Cluster, model: str, **task: Any) -> tuple[str, list[Any]]:
    job_id = c.submit(model=model, **task)["job_id"]
    return job_id, c.events(job_id)


def _stops(c: Cluster, job_id: str) -> list[dict[str, Any]]:
    why = httpx.get(f"{c.url}/v2/tasks/{job_id}/decision", timeout=10).json()
    return [d for entry in why["decisions"] for d in entry["decisions"]
            if d["action"] == "stop_worker"]


def test_the_lru_idle_worker_makes_room_and_a_busy_one_never_does(
        tmp_path: Path, rbees_pm: pluggy.PluginManager, smollm2_path: str) -> None:
    home = tmp_path / "home"
    models = home / "models"
    models.mkdir(parents=True)
    refs = {}
    for name in ("alpha", "beta", "gamma"):  # one file, three models
        os.link(smollm2_path, models / f"{name}.gguf")
        refs[name] = f"file:{models / name}.gguf"
    one = Estimates(rbees_pm).estimate(smollm2_path, backend="llamacpp", device="cpu",
                                       slots=1, ctx=None).total_bytes
    limit = int(2.5 * one)  # two workers fit, a third does not
    c = up(home, environ={"RBEES_POOL_MEMORY_LIMIT": str(limit),
                          "RBEES_PLACEMENT_CPU_SLOTS": "1"})
    try:
        # the pool offers what it says, and sizes each model as its preflight does
        state = httpx.get(f"{c.pool_url}/v2/state", timeout=10).json()
        assert state["cpu"]["ram_total_bytes"] == limit
        sized = {m["ref"]: m["memory_bytes"] for m in state["models"]}
        assert sized[refs["alpha"]] == one

        for name in ("alpha", "beta"):  # alpha used first: the least recently used
            _, events = _run(c, refs[name])
            assert events[-1][1] == "end", events
        assert set(_workers(c)) == {refs["alpha"], refs["beta"]}
        started = time.monotonic()
        job_id, events = _run(c, refs["gamma"])
        print(f"gamma after evicting alpha: {time.monotonic() - started:.2f} s")
        assert events[-1][1] == "end", events
        (stop,) = _stops(c, job_id)
        assert "evicted (least recently used)" in stop["reason"], stop
        assert set(_workers(c)) == {refs["beta"], refs["gamma"]}
        why = c.rbees("jobs", "why", job_id, "--format", "json")
        assert why.returncode == 0 and stop["worker_id"] in why.stdout, why

        # beta is now the least recently used, but a job runs there: gamma goes instead
        beta = _workers(c)[refs["beta"]]
        long: dict[str, Any] = {}

        def run_long() -> None:
            long["job_id"], long["events"] = _run(c, refs["beta"], max_tokens=400,
                                                  prompt="Count: 1, 2, 3,")

        runner = threading.Thread(target=run_long)
        runner.start()
        deadline = time.monotonic() + 60
        while _workers(c)[refs["beta"]]["slots_free"] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job_id, events = _run(c, refs["alpha"])
        assert events[-1][1] == "end", events
        assert runner.is_alive()  # beta's job still runs: it was busy all along
        stops = _stops(c, job_id)
        assert [s["worker_id"] for s in stops] == [_stop_target(stops)]
        assert beta["worker_id"] not in {s["worker_id"] for s in stops}
        runner.join(120)
        assert long["events"][-1][1] == "end", long["events"][-3:]
        assert _workers(c)[refs["beta"]]["worker_id"] == beta["worker_id"]  # never stopped
        assert set(_workers(c)) == {refs["alpha"], refs["beta"]}
    finally:
        c.rbees("down")


def _stop_target(stops: list[dict[str, Any]]) -> str:
    assert len(stops) == 1, stops
    return str(stops[0]["worker_id"])
