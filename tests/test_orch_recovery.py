"""rbees-orcd's crash counting and restart backoff (:mod:`rbees_core.orchestrator.recovery`),
over a fake clock: the first restart after a crash is at once, each further crash before the
worker was healthy doubles the wait (1, 2, 4 s... up to 5 min), a healthy period starts a new
series, and a start held back is a ``wait`` whose reason and the metrics say so. The real
cluster's side (a SIGKILLed worker back within 2 s, a lost pool's jobs) is in
features/recovery.feature."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from rbees_core.interfaces import Scheduler
from rbees_core.log import Logger
from rbees_core.orchestrator.book import Book
from rbees_core.orchestrator.recovery import BACKOFF_MAX_S, BackedOffScheduler, Recovery
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.scheduling import Decision, Snapshot, Verdict

MODEL = "smollm2"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class StartPolicy(Scheduler):
    """Always asks for a worker on p1's CPU."""

    name = "start"

    def decide(self, snapshot: Snapshot) -> Verdict:
        return Verdict(policy="start", decisions=[
            Decision("start_worker", pool_id="p1", device="cpu", model=MODEL)],
            summary="no worker holds smollm2")


def worker(worker_id: str, state: str, **more: Any) -> dict[str, Any]:
    return {"worker_id": worker_id, "model_ref": MODEL, "state": state, **more}


def recovery(clock: Clock, metrics: CollectorRegistry | None = None) -> Recovery:
    book = Book()
    book.spawn = lambda coro: coro.close()  # type: ignore[assignment,method-assign,return-value]
    return Recovery(book, PoolRegistry(), Logger("rbees-orcd"), metrics=metrics, clock=clock)


def crash(rec: Recovery, clock: Clock, worker_id: str, *, lived: float = 0.5) -> None:
    """A worker seen ready, then reported failed ``lived`` seconds later."""
    rec.observe("p1", {}, {worker_id: worker(worker_id, "ready")})
    clock.now += lived
    rec.observe("p1", {worker_id: worker(worker_id, "ready")},
                {worker_id: worker(worker_id, "failed", exit_code=-9)})


def test_a_crashing_model_backs_off_1_2_4_seconds_up_to_5_minutes() -> None:
    clock = Clock()
    rec = recovery(clock)
    crash(rec, clock, "w1")
    assert rec.held("p1", MODEL, False) is None  # the first restart is at once
    waits = []
    for n in range(2, 14):
        crash(rec, clock, f"w{n}")
        held = rec.held("p1", MODEL, False)
        assert held is not None
        waits.append(held[0])
        clock.now += held[0]
        assert rec.held("p1", MODEL, False) is None
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == BACKOFF_MAX_S


def test_a_healthy_worker_that_crashes_restarts_at_once_again() -> None:
    clock = Clock()
    rec = recovery(clock)
    for n in range(3):
        crash(rec, clock, f"w{n}")
    assert rec.held("p1", MODEL, False) is not None
    clock.now += 10
    crash(rec, clock, "healthy", lived=120.0)
    assert rec.held("p1", MODEL, False) is None


def test_a_restarted_pools_new_worker_under_an_old_id_is_a_new_worker() -> None:
    """A pool restarted numbers its workers from 0 again: the new w1 and w2 crash right
    after they got ready, the second is backed off; the old w1 and w2, ready minutes
    before and stopped since, do not make them look healthy."""
    clock = Clock()
    rec = recovery(clock)
    old = {w: worker(w, "ready", pid=n, started_at=1.0) for n, w in enumerate(("w1", "w2"))}
    rec.observe("p1", {}, old)
    clock.now += 300
    stopped = {w: {**d, "state": "stopped"} for w, d in old.items()}
    rec.observe("p1", old, stopped)
    before = stopped
    for n, w in enumerate(("w1", "w2")):  # the restarted pool's: same ids, new processes
        new = {**before, w: worker(w, "ready", pid=100 + n, started_at=400.0)}
        rec.observe("p1", before, new)
        clock.now += 0.5
        failed = {**new, w: {**new[w], "state": "failed", "exit_code": -9}}
        rec.observe("p1", new, failed)
        before = failed
    held = rec.held("p1", MODEL, False)
    assert held is not None and held[0] == 1.0, held


def test_a_crash_is_counted_once_and_only_for_a_worker_that_was_alive() -> None:
    clock = Clock()
    rec = recovery(clock)
    # an orchestrator restarted meets an old failed worker: not a crash of its time
    rec.observe("p1", {}, {"old": worker("old", "failed", exit_code=1)})
    # a worker it asked to stop, then reported failed: not a crash either
    rec.observe("p1", {"s": worker("s", "stopping")}, {"s": worker("s", "failed")})
    assert rec.crashes == {}
    crash(rec, clock, "w1")
    failed = {"w1": worker("w1", "failed", exit_code=-9)}
    rec.observe("p1", failed, failed)
    rec.crashed("p1", failed["w1"])  # the start's own poll saw it too
    assert rec.crashes[("p1", MODEL)].total == 1


def test_a_backed_off_start_is_a_wait_that_says_why_and_the_metrics_show_it() -> None:
    clock = Clock()
    metrics = CollectorRegistry()
    rec = recovery(clock, metrics)
    policy = BackedOffScheduler(StartPolicy(), rec)
    snapshot = Snapshot({"job": {"job_id": "j", "model": MODEL}, "pools": []})
    crash(rec, clock, "w1")
    assert policy.decide(snapshot).decisions[0].action == "start_worker"
    crash(rec, clock, "w2")
    verdict = policy.decide(snapshot)
    assert [d.action for d in verdict.decisions] == ["wait"]
    reason = verdict.decisions[0].reason or ""
    assert "crashed 2 time(s)" in reason and "exited with -9" in reason, reason
    assert "backed off, 1.0 s left" in reason and "backed off" in verdict.summary
    text = generate_latest(metrics).decode()
    assert 'rbees_worker_crashes_total{model="smollm2",pool_id="p1"} 2.0' in text
    assert 'rbees_worker_restart_backoff_seconds{model="smollm2",pool_id="p1"} 1.0' in text
    clock.now += 1.01
    assert policy.decide(snapshot).decisions[0].action == "start_worker"
    # an embedding worker of the model is another series
    embed = Snapshot({"job": {"job_id": "e", "model": MODEL, "embedding": True}, "pools": []})
    crash(rec, clock, "w3")
    assert policy.decide(snapshot).decisions[0].action == "wait"
    assert policy.decide(embed).decisions[0].action == "start_worker"


class Abandoned:
    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []

    async def abandon(self, run: Any, why: str) -> None:
        run.final = True
        self.runs.append((run.job_id, why))


async def test_the_runs_of_a_pool_that_turned_unavailable_are_abandoned() -> None:
    from rbees_core.api.pool import CpuEntry, PoolHeartbeat
    from rbees_core.orchestrator.book import Run

    clock = Clock()
    registry = PoolRegistry(heartbeat_interval_s=0.5, clock=clock)
    for pool_id in ("lost", "alive"):
        registry.heartbeat(PoolHeartbeat(pool_id=pool_id, host=pool_id, gpus=[], models=[],
                                         workers=[], cpu=CpuEntry(cores=2, ram_total_bytes=2**34,
                                                                 ram_free_bytes=2**33),
                                         seq=1, sent_at=0))
    rec = Recovery(Book(), registry, Logger("rbees-orcd"), clock=clock)
    runner = Abandoned()
    rec.runner = runner
    for job_id, pool_id in (("j1", "lost"), ("j2", "alive"), ("j3", "lost")):
        rec.book.runs[job_id] = Run(job_id=job_id, pool_id=pool_id, worker_id="w", uri="")
    await rec.sweep()
    assert runner.runs == []  # every pool is ready
    clock.now += 1.4  # within 3 heartbeats of 0.5 s: still ready
    registry.pools["alive"].last_seen = clock.now
    await rec.sweep()
    assert runner.runs == []
    clock.now += 0.2
    registry.pools["alive"].last_seen = clock.now
    await rec.sweep()
    assert sorted(job_id for job_id, _ in runner.runs) == ["j1", "j3"]
    assert "pool lost is unavailable" in runner.runs[0][1]
    await rec.sweep()  # ended once
    assert len(runner.runs) == 2


def test_the_next_sweep_comes_just_after_a_pool_with_runs_would_turn_unavailable() -> None:
    from rbees_core.api.pool import CpuEntry, PoolHeartbeat
    from rbees_core.orchestrator.book import Run
    from rbees_core.orchestrator.recovery import WATCH_EVERY_S

    clock = Clock()
    registry = PoolRegistry(heartbeat_interval_s=0.5, clock=clock)
    for pool_id in ("busy", "idle"):
        registry.heartbeat(PoolHeartbeat(pool_id=pool_id, host=pool_id, gpus=[], models=[],
                                         workers=[], cpu=CpuEntry(cores=2, ram_total_bytes=2**34,
                                                                 ram_free_bytes=2**33),
                                         seq=1, sent_at=0))
    rec = Recovery(Book(), registry, Logger("rbees-orcd"), clock=clock)
    assert rec.next_sweep_in() == WATCH_EVERY_S  # no run: the usual pace
    rec.book.runs["j1"] = Run(job_id="j1", pool_id="busy", worker_id="w", uri="")
    registry.pools["idle"].last_seen = clock.now - 1.45  # no run there: not watched
    assert rec.next_sweep_in() == WATCH_EVERY_S
    clock.now += 1.4  # 3 heartbeats of 0.5 s are due 0.1 s from now
    assert abs(rec.next_sweep_in() - 0.105) < 1e-9
    clock.now += rec.next_sweep_in()
    assert registry.status(registry.pools["busy"]) == "unavailable"
    assert rec.next_sweep_in() == WATCH_EVERY_S  # swept now; not again before the usual
