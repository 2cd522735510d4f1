"""rbees-orcd's failure handling: crashed workers restarted with backoff, lost pools' jobs.

A worker that crashes (its pool reports it ``failed``: it exited, was killed, or stopped
answering its health polls) is counted here per pool and model. While jobs for the model
wait, the policy asks for a new worker as usual; the first restart after a crash is at once,
each further crash before the worker was healthy for :data:`HEALTHY_AFTER_S` doubles the
wait before the next one (:data:`BACKOFF_FIRST_S` up to :data:`BACKOFF_MAX_S`). A start held
back is a ``wait`` decision whose reason says so (``rbees jobs why``), and the metrics show
the crashes and the time left (``rbees_worker_crashes_total``,
``rbees_worker_restart_backoff_seconds``). A model that fails to *load* is another matter:
the pool counts those and marks the model failed (:mod:`rbees_core.pool.load_marks`).

A pool that turns ``unavailable`` (missed heartbeats, :mod:`.registry`) cannot be reached
for its jobs' streams either: each job running there ends at once, one that produced no
token back to the queue (a retry, as a failure before the first token), one that did with
``WORKER_FAILED`` (``retriable: true``). Its queued jobs are decided again by the aging pass
(:meth:`.pool_control.PoolControl.age`), which the status change bumps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rbees_core.interfaces import Scheduler
from rbees_core.log import Logger
from rbees_core.scheduling import Decision, Snapshot, Verdict

if TYPE_CHECKING:
    from rbees_core.orchestrator.book import Book, Run
    from rbees_core.orchestrator.registry import PoolRegistry

#: the wait before the second restart of a model's worker that keeps crashing
BACKOFF_FIRST_S = 1.0
#: the longest wait between restarts
BACKOFF_MAX_S = 300.0
#: a worker ready this long before it crashed was healthy: the backoff starts over (a model
#: whose workers crash later than this restarts every load + 10 s at most: no hot loop)
HEALTHY_AFTER_S = 10.0
#: lost pools are looked for this often
WATCH_EVERY_S = 0.25
#: The longest the lost-pool watch waits for a run to start while there is none
IDLE_WATCH_S = 5.0
#: worker states with a process that a pool's ``failed`` report ends (a crash)
_LIVE = frozenset({"starting", "loading", "ready", "busy", "suspect", "draining"})
_READY = frozenset({"ready", "busy"})


def model_key(model: str, embedding: bool) -> str:
    """What crashes are counted by on a pool: the model, an embedding worker's apart."""
    return f"{model} (embedding)" if embedding else model


class Abandons(Protocol):
    """What ends a lost pool's runs: :meth:`.runner.Runner.abandon` (not imported: the runner
    imports pool control, which calls this module)."""

    async def abandon(self, run: Run, why: str) -> None: ...


@attrs.define
class Crashes:
    """The crashes of one model's workers on one pool."""

    #: crashes since the last healthy worker (the backoff's exponent)
    count: int = 0
    #: every crash counted
    total: int = 0
    #: monotonic time before which no worker is started for it
    not_before: float = 0.0
    #: the last crash, in words
    last: str = ""


class Recovery:
    """Crash counting and lost pools. Created by the service; pool control calls
    :meth:`observe` with each heartbeat's workers and :meth:`crashed` for a start that
    failed, the scheduler wrapper (:class:`BackedOffScheduler`) :meth:`held`, the service
    runs :meth:`loop`."""

    def __init__(self, book: Book, registry: PoolRegistry, log: Logger, *,
                 metrics: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.book = book
        self.registry = registry
        self.log = log
        self.clock = clock
        self.runner: Abandons | None = None
        #: (pool_id, model key) -> its crashes
        self.crashes: dict[tuple[str, str], Crashes] = {}
        #: (pool_id, worker_id) of the crashes counted (a pool reports a failed worker
        #: until it forgets it)
        self.counted: set[tuple[str, str]] = set()
        #: (pool_id, worker_id) -> when it was first seen ready (monotonic)
        self.ready_at: dict[tuple[str, str], float] = {}
        #: (pool_id, worker_id) -> the process behind the id (pid, started_at): a pool
        #: restarted numbers its workers from 0 again, and a new worker-cpu-0 is not the
        #: old one (its crash is no crash of a worker ready for minutes)
        self.processes: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.counter: Counter | None = None
        if metrics is not None:
            self.counter = Counter("rbees_worker_crashes", "Worker crashes, by pool and model",
                                   ["pool_id", "model"], registry=metrics)
            metrics.register(_BackoffCollector(self))

    # -- crashes ---------------------------------------------------------------------------

    def observe(self, pool_id: str, before: dict[str, dict[str, Any]],
                after: dict[str, dict[str, Any]]) -> None:
        """A heartbeat of ``pool_id`` replaced its workers ``before`` by ``after``: count
        the workers it reports ``failed`` that were alive before."""
        now = self.clock()
        for worker_id, worker in after.items():
            key = (pool_id, worker_id)
            state = worker.get("state")
            process = (worker.get("pid"), worker.get("started_at"))
            if state in _LIVE and self.processes.get(key) != process:
                # a new process under an id seen before (its pool was restarted): what
                # was known of the old one is not its (a stale ready_at made each crash
                # of a crash loop look like that of a healthy worker: no backoff)
                self.processes[key] = process
                self.ready_at.pop(key, None)
                self.counted.discard(key)
            if state in _READY:
                self.ready_at.setdefault(key, now)
            elif state == "failed":
                was = before.get(worker_id)
                if was is not None and was.get("state") in _LIVE:
                    self.crashed(pool_id, worker)
        for worker_id in before.keys() - after.keys():  # forgotten by the pool
            self.ready_at.pop((pool_id, worker_id), None)
            self.counted.discard((pool_id, worker_id))
            self.processes.pop((pool_id, worker_id), None)

    def crashed(self, pool_id: str, worker: dict[str, Any]) -> None:
        """Count the crash of ``worker`` (a worker dict of a heartbeat: ``worker_id``,
        ``model_ref``, ``exit_code``, ``error``, ``embedding``?) on ``pool_id``, once."""
        worker_id = str(worker.get("worker_id"))
        if (pool_id, worker_id) in self.counted:
            return
        self.counted.add((pool_id, worker_id))
        now = self.clock()
        model = str(worker.get("model_ref"))
        crashes = self.crashes.setdefault(
            (pool_id, model_key(model, bool(worker.get("embedding")))), Crashes())
        ready_at = self.ready_at.pop((pool_id, worker_id), None)
        if ready_at is not None and now - ready_at >= HEALTHY_AFTER_S:
            crashes.count = 0  # it was healthy: this crash starts a new series
        delay = 0.0 if crashes.count == 0 else min(
            BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (crashes.count - 1))
        crashes.count += 1
        crashes.total += 1
        crashes.not_before = now + delay
        crashes.last = (f"worker {worker_id} "
                        + (f"exited with {worker['exit_code']}"
                           if worker.get("exit_code") is not None
                           else str(worker.get("error") or "failed")))
        if self.counter is not None:
            self.counter.labels(pool_id=pool_id, model=model).inc()
        self.log.warning("worker_crashed", pool_id=pool_id, worker_id=worker_id, model=model,
                         crashes=crashes.count, restart_in_s=delay, why=crashes.last)
        if delay > 0:  # waiting jobs are decided again once the wait is over
            self.book.spawn(self._changed_after(delay))
        self.book.changed()

    async def _changed_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self.book.changed()

    def held(self, pool_id: str, model: str, embedding: bool) -> tuple[float, Crashes] | None:
        """The seconds left before a worker for ``model`` may start on ``pool_id`` again and
        its crashes, or None when nothing holds it."""
        crashes = self.crashes.get((pool_id, model_key(model, embedding)))
        if crashes is None:
            return None
        left = crashes.not_before - self.clock()
        return (left, crashes) if left > 0 else None

    # -- lost pools --------------------------------------------------------------------------

    async def loop(self) -> None:
        """End the runs of the pools that turned unavailable: every WATCH_EVERY_S, and just
        after a pool with runs turns unavailable (:meth:`next_sweep_in`). With no run, it
        waits for one to start (an idle rbees-orcd woke four times a second for nothing)."""
        started = self.book.run_started
        while True:
            if not self.book.runs:
                started.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(started.wait(), IDLE_WATCH_S)
                continue
            await asyncio.sleep(self.next_sweep_in())
            await self.sweep()

    def next_sweep_in(self) -> float:
        """Seconds until the next sweep: :data:`WATCH_EVERY_S`, or less: until just past
        the moment the first pool with runs misses its last allowed heartbeat. A sweep
        every WATCH_EVERY_S alone ended a lost pool's jobs up to that much after 3
        missed heartbeats (1.77 s after a cut link at 0.5 s heartbeats; issue 22 asks 3
        heartbeats)."""
        registry = self.registry
        wait = WATCH_EVERY_S
        for pool_id in {run.pool_id for run in self.book.runs.values()}:
            entry = registry.pools.get(pool_id)
            if entry is not None:
                due = entry.last_seen + registry.missed * registry.interval - registry.clock()
                if due >= 0:  # a pool unavailable already was swept
                    wait = min(wait, due + 0.005)
        return wait

    async def sweep(self) -> None:
        """End each run on a pool that is not ``ready`` (or no longer registered)."""
        runner = self.runner
        if runner is None or not self.book.runs:
            return
        statuses = self.registry.statuses()
        lost = [run for run in list(self.book.runs.values())
                if statuses.get(run.pool_id, "gone") != "ready" and not run.final]
        for run in lost:
            status = statuses.get(run.pool_id, "gone")
            self.log.warning("job_pool_lost", job_id=run.job_id, pool_id=run.pool_id,
                             worker_id=run.worker_id, status=status, tokens=run.tokens)
            await runner.abandon(run, f"pool {run.pool_id} is {status}: its heartbeats stopped")


class BackedOffScheduler(Scheduler):
    """The configured policy, with its ``start_worker`` decisions held back while
    :class:`Recovery` backs off a crashing model there: each becomes a ``wait`` whose reason
    says why and for how long. What the dispatcher and ``why`` ask."""

    name: ClassVar[str] = "backed-off"

    def __init__(self, policy: Scheduler, recovery: Recovery) -> None:
        self.policy = policy
        self.recovery = recovery

    def decide(self, snapshot: Snapshot) -> Verdict:
        verdict = self.policy.decide(snapshot)
        if not self.recovery.crashes or not any(
                d.action == "start_worker" for d in verdict.decisions):
            return verdict
        job = snapshot.data.get("job") or {}
        decisions: list[Decision] = []
        held_any = ""
        for d in verdict.decisions:
            held = None
            if d.action == "start_worker" and d.pool_id:
                embedding = bool(d.embedding) or bool(job.get("embedding"))
                held = self.recovery.held(d.pool_id, d.model or str(job.get("model")),
                                          embedding)
            if held is None:
                decisions.append(d)
                continue
            left, crashes = held
            reason = (f"the worker for {d.model or job.get('model')} on {d.pool_id} crashed "
                      f"{crashes.count} time(s) in a row ({crashes.last}): restart backed off, "
                      f"{left:.1f} s left")
            held_any = reason
            decisions.append(Decision("wait", pool_id=d.pool_id, model=d.model,
                                      reason=reason))
        if not held_any:
            return verdict
        if any(d.action != "wait" for d in decisions):  # a stop alongside: keep it, no wait
            decisions = [d for d in decisions if d.action != "wait"]
        return attrs.evolve(verdict, decisions=decisions,
                            summary=f"{verdict.summary}; {held_any}" if verdict.summary
                            else held_any)

    def close(self) -> None:
        self.policy.close()


class _BackoffCollector(Collector):
    """``rbees_worker_restart_backoff_seconds{pool_id, model}``: the wait left before a
    crashing model's next worker may start (0 once over)."""

    def __init__(self, recovery: Recovery) -> None:
        self.recovery = recovery

    def collect(self) -> Iterator[Any]:
        gauge = GaugeMetricFamily("rbees_worker_restart_backoff_seconds",
                                  "Seconds before a crashed model's worker may start again",
                                  labels=["pool_id", "model"])
        now = self.recovery.clock()
        for (pool_id, model), crashes in sorted(self.recovery.crashes.items()):
            gauge.add_metric([pool_id, model], max(0.0, crashes.not_before - now))
        yield gauge
