"""Never hang (issue 22, item 2): a job that can never be placed ends at once with
``NO_CAPACITY``, a job that cannot start by its deadline with ``DEADLINE_UNMET``.

The judgement (:mod:`rbees_core.feasibility`) over fake snapshots, then rbees-orcd's
service in this process with fake pools (heartbeats only: no worker, nothing to start).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from rbees_core.api.orchestrator import Placement, TaskRequest
from rbees_core.api.pool import CpuEntry, PoolHeartbeat
from rbees_core.errors import ModelNotFoundError
from rbees_core.feasibility import TOO_LARGE, UNKNOWN_MODEL, never_placeable
from rbees_core.orchestrator.service import OrchestratorService
from rbees_core.programs.openai_errors import job_error

from .test_orcd_service import new_service

GIB = 1024 ** 3


def pool(pool_id: str, models: list[dict[str, Any]], *, ram: int = 16 * GIB,
         status: str = "ready", workers: list[dict[str, Any]] | None = None
         ) -> dict[str, Any]:
    return {"pool_id": pool_id, "status": status, "workers": workers or [], "models": models,
            "devices": [{"device": "cpu", "kind": "cpu", "memory_total_bytes": ram,
                         "memory_free_bytes": ram // 2, "memory_reserved_bytes": 0}]}


SMALL = {"id": None, "ref": "file:/m/small.gguf", "size_bytes": GIB}
HUGE = {"id": None, "ref": "file:/m/huge.gguf", "size_bytes": 64 * GIB}


def test_a_model_no_pool_holds_and_no_source_provides_is_never_placeable() -> None:
    pools = [pool("p1", [SMALL])]
    kind, reason = never_placeable({"model": "file:/m/other.gguf"}, pools,
                                   provided=False) or ("", "")
    assert kind == UNKNOWN_MODEL and "no pool holds file:/m/other.gguf" in reason
    # one a source can download waits for it (pull on first use)
    assert never_placeable({"model": "tinyllama"}, pools, provided=True) is None
    assert never_placeable({"model": "file:/m/small.gguf"}, pools, provided=False) is None
    # pinned elsewhere: only that pool counts
    pinned = {"model": "file:/m/small.gguf", "placement": {"pool": "p2"}}
    found = never_placeable(pinned, pools, provided=False)
    assert found is not None and "pool p2, which the job is pinned to, is not registered" \
        in found[1]
    # an offline pool holds nothing a job could use
    found = never_placeable({"model": "file:/m/small.gguf"},
                            [pool("p1", [SMALL], status="offline")], provided=False)
    assert found is not None and found[0] == UNKNOWN_MODEL
    # a worker serving it is as good as the file on disk
    worker = {"worker_id": "w1", "model_ref": "file:/m/w.gguf", "state": "busy"}
    assert never_placeable({"model": "file:/m/w.gguf"}, [pool("p1", [], workers=[worker])],
                           provided=False) is None


def test_a_model_larger_than_every_device_is_never_placeable() -> None:
    found = never_placeable({"model": "file:/m/huge.gguf"},
                            [pool("p1", [HUGE]), pool("p2", [HUGE], ram=32 * GIB)],
                            provided=False)
    assert found is not None and found[0] == TOO_LARGE
    assert "needs 64.0 GiB" in found[1] and "the largest: 32.0 GiB" in found[1]
    # total memory counts, not free: idle workers can be stopped to make room
    assert never_placeable({"model": "file:/m/huge.gguf"}, [pool("p1", [HUGE], ram=64 * GIB)],
                           provided=False) is None
    # one pool large enough is enough; an unknown size may fit
    assert never_placeable({"model": "file:/m/huge.gguf"},
                           [pool("p1", [HUGE]), pool("p2", [HUGE], ram=128 * GIB)],
                           provided=False) is None
    unsized = {"id": None, "ref": "file:/m/huge.gguf"}
    assert never_placeable({"model": "file:/m/huge.gguf"}, [pool("p1", [unsized])],
                           provided=False) is None


def test_a_model_larger_than_each_device_that_can_be_split_or_offloaded_is_placeable() -> None:
    """Issue 22, item 5: 64 GiB of 80 layers on a host of two 40 GB GPUs (a split), or of
    one 24 GB GPU and 48 GiB of RAM (a partial offload), is not NO_CAPACITY."""
    def gpu(index: int, gib: int) -> dict[str, Any]:
        return {"device": f"cuda:{index}", "kind": "cuda", "memory_total_bytes": gib * GIB,
                "memory_free_bytes": gib * GIB, "memory_reserved_bytes": 0}

    layered = {**HUGE, "layers": 80, "layer_bytes": int(0.78 * GIB)}
    job = {"model": "file:/m/huge.gguf"}
    two = pool("p1", [layered])
    two["devices"] += [gpu(0, 40), gpu(1, 40)]
    assert never_placeable(job, [two], provided=False) is None
    offload = pool("p1", [layered], ram=48 * GIB)
    offload["devices"].append(gpu(0, 24))
    assert never_placeable(job, [offload], provided=False) is None
    # the same hosts for a model of unknown shape (sized by its file): whole, or never
    two["models"] = offload["models"] = [HUGE]
    found = never_placeable(job, [two, offload], provided=False)
    assert found is not None and found[0] == TOO_LARGE
    assert "split across GPUs or offloaded in part" in found[1]


def test_no_capacity_maps_to_openai_statuses() -> None:
    unknown = job_error({"code": "NO_CAPACITY", "message": "m", "reason": UNKNOWN_MODEL})
    assert (unknown.status, unknown.code, unknown.param) == (404, "model_not_found", "model")
    large = job_error({"code": "NO_CAPACITY", "message": "m", "reason": TOO_LARGE})
    assert (large.status, large.code, large.kind) == (400, "no_capacity",
                                                      "invalid_request_error")
    late = job_error({"code": "DEADLINE_UNMET", "message": "m", "retriable": False,
                      "retry_after_ms": 2500})
    assert (late.status, late.code, late.retry_after_s) == (503, "deadline_unmet", 3)
    assert late.response().headers["retry-after"] == "3"


# -- in rbees-orcd's service -----------------------------------------------------------------


def fake_beat(pool_id: str, models: list[dict[str, Any]], seq: int = 1,
              ram: int = 16 * GIB) -> PoolHeartbeat:
    """A heartbeat of a pool with ``models`` on disk, no worker and no reachable URL."""
    return PoolHeartbeat(pool_id=pool_id, host=pool_id, gpus=[], models=models, workers=[],
                         cpu=CpuEntry(cores=2, ram_total_bytes=ram, ram_free_bytes=ram // 2),
                         url="http://127.0.0.1:1", seq=seq, sent_at=time.time())


@pytest.fixture
async def lonely(tmp_path: Path) -> AsyncIterator[OrchestratorService]:
    """A started service with one fake pool holding a small and a huge model (heartbeats
    every 0.1 s: the grace after a start is 0.3 s)."""
    svc = new_service(tmp_path, heartbeat_interval_s=0.1)
    await svc.start()
    svc.heartbeat(fake_beat("p1", [SMALL, HUGE]))
    await asyncio.sleep(0.35)  # past the grace
    yield svc
    await svc.close()


async def ended(svc: OrchestratorService, job_id: str, within_s: float) -> dict[str, Any]:
    """The job's terminal error event, which must come within ``within_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        channel = svc.book.channels.get(job_id)
        if channel is None or channel.done:
            events = await asyncio.to_thread(svc.store.events_after, job_id, 0)
            if events and events[-1].event == "error":
                payload: dict[str, Any] = events[-1].payload()
                return payload
        await asyncio.sleep(0.01)
    raise AssertionError(f"{job_id} did not end within {within_s} s")


async def test_a_job_that_can_never_be_placed_ends_at_once(lonely: OrchestratorService
                                                           ) -> None:
    svc = lonely
    t0 = time.monotonic()
    huge = await svc.submit(TaskRequest(model="file:/m/huge.gguf", prompt="x"))
    error = await ended(svc, huge.job_id, 1.0)
    took = time.monotonic() - t0
    assert error["code"] == "NO_CAPACITY" and error["reason"] == TOO_LARGE, error
    assert error["retriable"] is False and "needs 64.0 GiB" in error["message"]
    assert took < 1.0, f"NO_CAPACITY after {took:.3f} s"
    record = await asyncio.to_thread(svc.store.get, huge.job_id)
    assert record.status == "failed" and record.error is not None
    assert record.error.code == "NO_CAPACITY"
    why = await svc.dispatcher.why(huge.job_id)
    assert "The job ended (NO_CAPACITY)" in why["explanation"]
    assert why["decisions"][-1]["decisions"][0]["action"] == "fail"
    # pinned to a pool that does not hold it, nor can get it
    pinned = await svc.submit(TaskRequest(model="file:/m/small.gguf", prompt="x",
                                          placement=Placement(pool="p9")))
    error = await ended(svc, pinned.job_id, 1.0)
    assert error["code"] == "NO_CAPACITY" and error["reason"] == UNKNOWN_MODEL
    assert "pool p9" in error["message"]
    assert not svc.queue


async def test_a_model_no_source_knows_ends_at_once_with_no_capacity(
        lonely: OrchestratorService) -> None:
    """``POST /v2/tasks`` admits it and it ends in the next dispatch round with
    ``NO_CAPACITY`` (reason ``unknown_model``), its decision saying why; the ``/v1`` routes
    refuse it at admission (404 ``model_not_found`` in OpenAI's shape), leaving no job."""
    svc = lonely
    t0 = time.monotonic()
    unknown = await svc.submit(TaskRequest(model="no-such-model", prompt="x"))
    error = await ended(svc, unknown.job_id, 1.0)
    took = time.monotonic() - t0
    assert error["code"] == "NO_CAPACITY" and error["reason"] == UNKNOWN_MODEL, error
    assert error["retriable"] is False
    assert "no pool holds no-such-model" in error["message"]
    assert "no source can download no-such-model" in error["message"]
    assert took < 1.0, f"NO_CAPACITY after {took:.3f} s"
    why = await svc.dispatcher.why(unknown.job_id)
    assert "The job ended (NO_CAPACITY)" in why["explanation"]
    before = await asyncio.to_thread(svc.store.count_by_status)
    with pytest.raises(ModelNotFoundError):
        await svc.submit(TaskRequest(model="no-such-model", prompt="x"), refuse_unknown=True)
    assert await asyncio.to_thread(svc.store.count_by_status) == before
    assert not svc.queue


async def test_a_job_submitted_during_the_grace_is_judged_when_it_ends(tmp_path: Path
                                                                      ) -> None:
    """A job told to wait while the pools still had their grace to report in is judged as
    soon as the grace is over, not when something else next changes (the BDD scenario on a
    fresh cluster waited 30 s for NO_CAPACITY)."""
    svc = new_service(tmp_path, heartbeat_interval_s=0.1)  # grace 0.3 s
    await svc.start()

    async def beating() -> None:  # a live pool whose state does not change
        for seq in itertools.count(1):
            svc.heartbeat(fake_beat("p1", [SMALL, HUGE], seq=seq))
            await asyncio.sleep(0.05)

    beats = asyncio.create_task(beating())
    try:
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        pinned = await svc.submit(TaskRequest(model="file:/m/small.gguf", prompt="x",
                                              placement=Placement(pool="p9")))
        error = await ended(svc, pinned.job_id, 2.0)
        assert error["code"] == "NO_CAPACITY" and error["reason"] == UNKNOWN_MODEL
        assert time.monotonic() - t0 < 1.5
    finally:
        beats.cancel()
        await svc.close()


async def test_a_job_whose_pool_goes_away_ends(lonely: OrchestratorService) -> None:
    svc = lonely
    svc.heartbeat(fake_beat("p2", [{"id": None, "ref": "file:/m/p2.gguf",
                                    "size_bytes": GIB}]))
    accepted = await svc.submit(TaskRequest(model="file:/m/p2.gguf", prompt="x"))
    await asyncio.sleep(0.2)
    assert accepted.job_id in svc.queue  # its worker cannot start (no pool answers): waits
    svc.deregister("p2")
    error = await ended(svc, accepted.job_id, 1.5)
    assert error["code"] == "NO_CAPACITY" and "no pool holds file:/m/p2.gguf" \
        in error["message"]


async def test_a_catalog_model_no_pool_has_waits_and_why_says_for_what(
        lonely: OrchestratorService) -> None:
    svc = lonely
    accepted = await svc.submit(TaskRequest(model="tinyllama", prompt="x"))
    await asyncio.sleep(0.3)
    assert accepted.job_id in svc.queue
    why = await svc.dispatcher.why(accepted.job_id)
    assert "no download of it is under way" in why["explanation"], why["explanation"]
    assert await svc.cancel(accepted.job_id)


# -- deadlines -------------------------------------------------------------------------------


def test_deadlines_come_due_in_order_and_skip_jobs_gone() -> None:
    from rbees_core.orchestrator.deadlines import Deadlines

    d = Deadlines()
    for i, at in enumerate([5.0, 1.0, 3.0, 2.0]):
        d.add(f"j{i}", at)
    assert d.next_in(0.5) == 0.5 and d.next_in(9.0) == 0.0
    queued = {"j0", "j1", "j2"}  # j3 started
    assert d.due(2.5, queued) == [("j1", 1.0)]
    assert d.due(4.0, queued, hold=lambda job_id: job_id == "j2") == []  # admitting
    assert d.due(4.0, queued) == [("j2", 3.0)]
    assert d.next_in(4.0) == 1.0 and len(d) == 1
    assert Deadlines().next_in(0.0) is None


async def test_a_job_that_cannot_start_by_its_deadline_ends(lonely: OrchestratorService
                                                            ) -> None:
    svc = lonely
    t0 = time.monotonic()
    late = await svc.submit(TaskRequest(model="file:/m/small.gguf", prompt="x",
                                        deadline_ms=500))
    waits = await svc.submit(TaskRequest(model="file:/m/small.gguf", prompt="x"))
    error = await ended(svc, late.job_id, 3.0)
    took = time.monotonic() - t0
    assert error["code"] == "DEADLINE_UNMET" and error["retriable"] is False, error
    assert "deadline_ms of 500" in error["message"] and "it waited" in error["message"]
    assert 500 <= error["waited_ms"] < 900, error
    assert 0.5 <= took < 1.2, f"DEADLINE_UNMET after {took:.3f} s"
    assert isinstance(error["retry_after_ms"], int)
    record = await asyncio.to_thread(svc.store.get, late.job_id)
    assert record.status == "failed" and record.error is not None
    assert record.error.code == "DEADLINE_UNMET"
    assert waits.job_id in svc.queue  # no deadline: it waits on
    assert await svc.cancel(waits.job_id)


async def test_a_deadline_survives_a_restart(tmp_path: Path) -> None:
    svc = new_service(tmp_path, heartbeat_interval_s=0.1)
    await svc.start()
    svc.heartbeat(fake_beat("p1", [SMALL]))
    accepted = await svc.submit(TaskRequest(model="file:/m/small.gguf", prompt="x",
                                            deadline_ms=300))
    await svc.close()
    await asyncio.sleep(0.4)  # the deadline passed while nothing ran
    again = new_service(tmp_path, heartbeat_interval_s=0.1)
    await again.start()
    try:
        error = await ended(again, accepted.job_id, 1.0)
        assert error["code"] == "DEADLINE_UNMET"
    finally:
        await again.close()


def test_a_full_worker_is_not_stopped_to_start_its_own_model_again() -> None:
    """A job that waited long for the cores of a CPU evicts a busy worker of *another*
    model; the one full worker of its own model is waited for (stopping it, as the policy
    did, restarted the model over and over under 200 queued batch jobs)."""
    from rbees_scheduler_builtin import LeastLoaded

    from rbees_core.config import SchedulerConfig
    from rbees_core.testing.scheduler import device, job, snapshot, targets, worker
    from rbees_core.testing.scheduler import pool as snap_pool

    full = worker("w1", free=0, cpus=[0, 1])
    other = worker("w2", model="tinyllama", free=0, cpus=[0, 1])
    cpu = device(cores=2, cores_free=0)
    policy = LeastLoaded.from_config(SchedulerConfig())
    waited = job(waited_s=60.0)
    same = policy.decide(snapshot(snap_pool("p1", devices=[cpu], workers=[full]), job=waited))
    assert [t[0] for t in targets(same)] == ["wait"], same.decisions
    halved = policy.decide(snapshot(snap_pool("p1", devices=[cpu], workers=[other],
                                              models=["smollm2", "tinyllama"]), job=waited))
    assert targets(halved) == [("start_worker", "p1", "cpu")]  # w2 gives it one core
    assert halved.decisions[0].threads == 1
    one_each = [worker("w2", model="tinyllama", free=0, cpus=[0]),
                worker("w3", model="qwen", free=0, cpus=[1])]
    other_model = policy.decide(snapshot(snap_pool("p1", devices=[cpu], workers=one_each,
                                                   models=["smollm2", "tinyllama", "qwen"]),
                                         job=waited))
    assert {("stop_worker", "p1", "w2"), ("stop_worker", "p1", "w3")} & set(
        targets(other_model))
