"""The scheduler contract suite: the same snapshots for every registered policy.

Every policy installed (the built-in ones, and the script scheduler running
``schedulers/examples/low_power.star``) must: never dispatch to a full worker, an
unavailable pool, or an avoided pool when an alternative exists; honour the job's hard
placement (pool, device); prefer a ready worker to starting one; start only where the model
is on disk and fits; wait with a reason when nothing fits; and list every worker holding
the model (and every device, when a start was considered) among its candidates, each loser
with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from rbees_core import plugins
from rbees_core.interfaces import Scheduler
from rbees_core.scheduling import Snapshot, Verdict, device_available, explain
from rbees_core.testing.scheduler import device, job, pool, snapshot, targets, worker

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "schedulers" / "examples" / "low_power.star"
POLICIES = sorted(plugins.schedulers(plugins.make_manager()))


@pytest.fixture(scope="module", params=POLICIES)
def policy(request: pytest.FixtureRequest) -> Iterator[Scheduler]:
    cls = plugins.schedulers(plugins.make_manager())[request.param]
    made: Scheduler = cls.from_path(EXAMPLE) if request.param == "script" else cls()
    yield made
    made.close()


def test_the_builtin_policies_and_the_script_scheduler_are_registered() -> None:
    assert {"least-loaded", "most-free-memory", "round-robin", "binpack", "spread",
            "script"} <= set(POLICIES)


def decide(policy: Scheduler, snap: Snapshot) -> Verdict:
    verdict = policy.decide(snap)
    assert verdict.fallback is None, verdict.fallback  # the example script must not fail
    check_candidates(snap, verdict)
    json.dumps(verdict.to_dict())
    for c in verdict.candidates:  # written by hand for speed: every field, as attrs has them
        assert c.to_dict() == attrs.asdict(c)
    assert explain(verdict)
    return verdict


def check_candidates(snap: Snapshot, verdict: Verdict) -> None:
    data = snap.data
    model = data["job"]["model"]
    seen = {(c.pool_id, c.target, c.kind) for c in verdict.candidates}
    for p in data["pools"]:
        for w in p["workers"]:
            if w["model_ref"] == model:
                assert (p["pool_id"], w["worker_id"], "worker") in seen
    if not any(d.action == "dispatch" for d in verdict.decisions):
        for p in data["pools"]:
            for d in p["devices"]:
                assert (p["pool_id"], d["device"], "device") in seen
    for c in verdict.candidates:
        assert c.rejected is None or c.rejected.strip(), c
    chosen = {(d.pool_id, d.worker_id if d.action == "dispatch" else d.device)
              for d in verdict.decisions if d.action in ("dispatch", "start_worker")}
    for c in verdict.candidates:
        if (c.pool_id, c.target) in chosen:
            assert c.rejected is None, c
        else:
            assert c.rejected, c


def the_worker(snap: Snapshot, pool_id: str | None, worker_id: str | None) -> dict[str, Any]:
    p = next(p for p in snap.data["pools"] if p["pool_id"] == pool_id)
    return next(w for w in p["workers"] if w["worker_id"] == worker_id)


def test_never_dispatches_to_a_full_worker(policy: Scheduler) -> None:
    snap = snapshot(pool("a", workers=[worker("full", slots=4, free=0), worker("ok", free=1)]),
                    pool("b", workers=[worker("busy", state="busy", slots=2, free=0)]))
    assert targets(decide(policy, snap)) == [("dispatch", "a", "ok")]


def test_never_dispatches_to_an_unavailable_pool(policy: Scheduler) -> None:
    snap = snapshot(pool("gone", status="unavailable", workers=[worker("w1", free=4)]),
                    pool("off", status="offline", workers=[worker("w1", free=4)]),
                    pool("here", workers=[worker("w1", free=1)]))
    assert targets(decide(policy, snap)) == [("dispatch", "here", "w1")]


def test_never_uses_an_avoided_pool_when_an_alternative_exists(policy: Scheduler) -> None:
    placement = {"avoid_pools": ["avoid"]}
    snap = snapshot(pool("avoid", workers=[worker("w1", free=4)]),
                    pool("other", workers=[worker("w1", free=1)]), job=job(placement=placement))
    assert targets(decide(policy, snap)) == [("dispatch", "other", "w1")]
    # starting a worker elsewhere is an alternative too
    snap = snapshot(pool("avoid", workers=[worker("w1", free=4)]),
                    pool("other", devices=[device("cpu", free_gib=8)]),
                    job=job(placement=placement, memory_gib=1))
    assert targets(decide(policy, snap)) == [("start_worker", "other", "cpu")]


def test_uses_an_avoided_pool_when_nothing_else_can(policy: Scheduler) -> None:
    snap = snapshot(pool("avoid", workers=[worker("w1", free=2)]),
                    pool("other", status="offline", workers=[worker("w1")]),
                    job=job(placement={"avoid_pools": ["avoid"]}))
    assert targets(decide(policy, snap)) == [("dispatch", "avoid", "w1")]


def test_honours_a_pinned_pool(policy: Scheduler) -> None:
    pools = [pool("roomy", devices=[device("cuda:0", free_gib=40, power_w=5)],
                  workers=[worker("w1", device="cuda:0", free=8, slots=8)]),
             pool("pinned", devices=[device("cpu", free_gib=8, power_w=500)],
                  workers=[worker("w1", free=1)])]
    snap = snapshot(*pools, job=job(placement={"pool": "pinned"}))
    assert targets(decide(policy, snap)) == [("dispatch", "pinned", "w1")]
    pools[1]["workers"] = []
    snap = snapshot(*pools, job=job(placement={"pool": "pinned"}, memory_gib=1))
    assert targets(decide(policy, snap)) == [("start_worker", "pinned", "cpu")]


def test_honours_a_pinned_device(policy: Scheduler) -> None:
    pools = [pool("a", devices=[device("cuda:0", free_gib=40), device("cuda:1", free_gib=4)],
                  workers=[worker("w0", device="cuda:0", free=8, slots=8),
                           worker("w1", device="cuda:1", free=1)])]
    snap = snapshot(*pools, job=job(placement={"device": "cuda:1"}))
    assert targets(decide(policy, snap)) == [("dispatch", "a", "w1")]
    pools[0]["workers"] = [worker("w0", device="cuda:0", free=8, slots=8)]
    snap = snapshot(*pools, job=job(placement={"device": "cuda:1"}, memory_gib=1))
    assert targets(decide(policy, snap)) == [("start_worker", "a", "cuda:1")]


def test_a_ready_worker_beats_starting_one(policy: Scheduler) -> None:
    snap = snapshot(pool("cold", devices=[device("cuda:0", free_gib=80, power_w=1)]),
                    pool("warm", devices=[device("cpu", free_gib=2, power_w=300)],
                         workers=[worker("w1", free=1)]))
    assert targets(decide(policy, snap)) == [("dispatch", "warm", "w1")]


def test_starts_only_where_the_model_is_and_fits(policy: Scheduler) -> None:
    snap = snapshot(pool("no-model", devices=[device("cuda:0", free_gib=80)], models=["other"]),
                    pool("too-small", devices=[device("cuda:0", free_gib=2)]),
                    pool("reserved", devices=[device("cuda:0", free_gib=9, reserved_gib=6)]),
                    pool("fits", devices=[device("cpu", free_gib=5)]),
                    job=job(memory_gib=4))
    verdict = decide(policy, snap)
    assert targets(verdict) == [("start_worker", "fits", "cpu")]
    started = verdict.decisions[0]
    p = next(p for p in snap.data["pools"] if p["pool_id"] == started.pool_id)
    dev = next(d for d in p["devices"] if d["device"] == started.device)
    assert device_available(dev) >= snap.data["job"]["memory_bytes"]


@pytest.mark.parametrize("case", ["all-full", "no-memory", "no-model", "no-pools",
                                  "pinned-away", "all-down"])
def test_waits_with_a_reason_when_nothing_fits(policy: Scheduler, case: str) -> None:
    pools = {
        "all-full": [pool("a", devices=[device("cpu", free_gib=0.5)],
                          workers=[worker("w1", free=0), worker("w2", state="busy", free=0)])],
        "no-memory": [pool("a", devices=[device("cuda:0", free_gib=2), device("cpu", free_gib=1)])],
        "no-model": [pool("a", models=["other"], workers=[worker("w1", model="other")])],
        "no-pools": [],
        "pinned-away": [pool("a", workers=[worker("w1")])],
        "all-down": [pool("a", status="offline", workers=[worker("w1")]),
                     pool("b", status="unavailable")],
    }[case]
    placement = {"pool": "elsewhere"} if case == "pinned-away" else None
    snap = snapshot(*pools, job=job(placement=placement, memory_gib=4))
    verdict = decide(policy, snap)
    assert [d.action for d in verdict.decisions] == ["wait"]
    assert (verdict.decisions[0].reason or "").strip()
    assert all(c.rejected for c in verdict.candidates)


def test_the_same_snapshot_gives_the_same_decision(policy: Scheduler) -> None:
    pools = [pool(f"p{i}", devices=[device("cuda:0", free_gib=i + 1, power_w=100 - i)],
                  workers=[worker(f"w{j}", device="cuda:0", free=(i * j) % 3) for j in range(3)])
             for i in range(5)]
    cls = type(policy)
    first = cls.from_path(EXAMPLE) if cls.name == "script" else cls()
    second = cls.from_path(EXAMPLE) if cls.name == "script" else cls()
    try:
        for _ in range(3):
            snap = snapshot(*pools)
            assert first.decide(snap).decisions == second.decide(snap).decisions
    finally:
        first.close()
        second.close()


def test_decisions_follow_the_snapshot(policy: Scheduler) -> None:
    """A policy reads each snapshot afresh (the script sandbox keeps converted pools)."""
    pools = [pool("a", workers=[worker("w1", free=1)]), pool("b", workers=[worker("w1", free=1)])]
    first = decide(policy, snapshot(*pools))
    chosen = first.decisions[0]
    the_worker(Snapshot({"pools": pools}), chosen.pool_id, chosen.worker_id)["slots_free"] = 0
    second = decide(policy, snapshot(*pools))
    assert second.decisions[0].action == "dispatch"
    assert second.decisions[0].pool_id != chosen.pool_id


def test_no_cpu_worker_starts_where_no_core_is_free(policy: Scheduler) -> None:
    """Cores are accounted like memory: a CPU whose cores are all held by busy workers of
    other models, one core each, is no place to start one (it would oversubscribe them);
    the GPU is."""
    busy = [worker("other", model="llama", state="busy", slots=4, free=0, cpus=[0]),
            worker("third", model="qwen", state="busy", slots=4, free=0, cpus=[1])]
    full = pool("a", devices=[device("cpu", free_gib=8, cores=2, cores_free=0)],
                workers=busy, models=["smollm2", "llama", "qwen"])
    verdict = decide(policy, snapshot(full, job=job(memory_gib=1)))
    assert [d.action for d in verdict.decisions] == ["wait"]
    assert "no free core" in (verdict.decisions[0].reason or "")
    gpu = pool("b", devices=[device("cpu", free_gib=8, cores=2, cores_free=0),
                             device("cuda:0", free_gib=8)], workers=busy,
               models=["smollm2", "llama", "qwen"])
    assert targets(decide(policy, snapshot(gpu, job=job(memory_gib=1)))) == [
        ("start_worker", "b", "cuda:0")]


def test_a_worker_holding_every_core_gives_half_to_a_new_model(policy: Scheduler) -> None:
    """Two busy models on one host each decode on cores of their own: a worker holding
    both cores is halved for the new one (its pool moves it), never shared, never evicted
    while busy; while that start is under way, no second start counts on the same cores."""
    busy = worker("other", model="llama", state="busy", slots=4, free=0, cpus=[0, 1])
    full = pool("a", devices=[device("cpu", free_gib=8, cores=2, cores_free=0)],
                workers=[busy], models=["smollm2", "llama"])
    verdict = decide(policy, snapshot(full, job=job(memory_gib=1)))
    assert targets(verdict) == [("start_worker", "a", "cpu")]
    assert verdict.decisions[0].threads == 1
    coming = {"worker_id": "w-new", "model_ref": "qwen", "device": "cpu", "state": "starting",
              "slots_total": 4, "slots_free": 0, "uri": None, "expected": True, "threads": 1}
    starting = pool("a", devices=[device("cpu", free_gib=8, cores=2, cores_free=0)],
                    workers=[busy, coming], models=["smollm2", "llama", "qwen"])
    assert [d.action for d in decide(policy, snapshot(starting, job=job(memory_gib=1))
                                     ).decisions] == ["wait"]


def test_a_started_worker_takes_at_most_the_free_cores(policy: Scheduler) -> None:
    half = pool("a", devices=[device("cpu", free_gib=8, cores=4, cores_free=2)],
                workers=[worker("other", model="llama", state="busy", free=0, cpus=[0, 1])],
                models=["smollm2", "llama"])
    snap = snapshot(half, job=job(memory_gib=1),
                    worker_defaults={"cpu": {"slots": 4, "ctx": None, "threads": None}})
    verdict = decide(policy, snap)
    assert targets(verdict) == [("start_worker", "a", "cpu")]
    assert verdict.decisions[0].threads == 2 and verdict.decisions[0].slots == 4
