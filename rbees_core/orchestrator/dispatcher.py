"""Dispatch: snapshot -> policy -> claim -> record.

The dispatcher takes the jobs at the head of the queue, asks the scheduler for each (jobs
alike, that the policy told to wait at the current version, are not asked about again),
claims the slot a verdict names, writes the dispatch, announces it and starts the job's
runner. Verdicts that ask for workers to start or stop go to pool control. A job admitted
at the head of the queue is decided by admission at once (:meth:`Dispatcher.place_now`).

A job never waits for what cannot come: its model marked failed wherever it could run ends
it with ``MODEL_LOAD_FAILED`` (before the policy is asked); a policy's ``fail`` decision, or
a wait that can never end (:func:`rbees_core.feasibility.never_placeable`, judged when the
policy says wait), with ``NO_CAPACITY``; its ``deadline_ms`` passed before it started, with
``DEADLINE_UNMET`` (:class:`~rbees_core.orchestrator.deadlines.Deadlines`: one heap, the
loop sleeps no longer than until the earliest deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import attrs

from rbees_core.errors import ConflictError, ModelLoadError, RbeesError
from rbees_core.feasibility import (
    NO_CAPACITY,
    UNKNOWN_MODEL,
    describe_failed_loads,
    failed_loads,
    never_placeable,
)
from rbees_core.interfaces import Scheduler
from rbees_core.log import Logger
from rbees_core.orchestrator.book import Book, Run
from rbees_core.orchestrator.deadlines import Deadlines
from rbees_core.orchestrator.downloads import MODEL_DOWNLOAD_FAILED, Downloads
from rbees_core.orchestrator.errors import DEADLINE_UNMET, QUEUE_FULL_DROPPED
from rbees_core.orchestrator.metrics import OrchestratorMetrics
from rbees_core.orchestrator.pool_control import PoolControl
from rbees_core.orchestrator.prefixes import PrefixBook, prefix_keys
from rbees_core.orchestrator.queue import JobQueue, QueuedJob
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.orchestrator.rounds import Ending, RoundPools
from rbees_core.orchestrator.runner import Runner
from rbees_core.orchestrator.shards import SHARDED, Shards, shard_for, shard_verdict
from rbees_core.orchestrator.store import Store
from rbees_core.scheduling import Candidate, Decision, Snapshot, Verdict, explain

#: a dispatch round considers this many jobs from the head of the queue
DISPATCH_WINDOW = 64
#: a round runs at least this often, woken or not
ROUND_EVERY_S = 0.5
#: records of prefixes held by workers that are gone are dropped this often
PRUNE_EVERY_S = 5.0
#: error codes of jobs that placement ended, which ``why`` quotes
_ENDED_BY_PLACEMENT = frozenset({ModelLoadError.code, NO_CAPACITY, DEADLINE_UNMET,
                                 MODEL_DOWNLOAD_FAILED})
#: worker states whose slots hold nothing any more
_GONE = frozenset({"stopped", "failed", "dead", "killed", "stopping"})


class Dispatcher:
    """Places queued jobs on workers. Created by the service; :meth:`loop` runs as one of
    the book's tasks, admission calls :meth:`place_now` and :meth:`announce`.

    ``provides(model)`` says whether a source can download a model no pool holds (None:
    never judge a job unplaceable); nothing is judged so during the first ``grace_s``
    seconds, while the pools of a restarted orchestrator report in."""

    def __init__(self, book: Book, store: Store, queue: JobQueue, registry: PoolRegistry,
                 scheduler: Scheduler, pools: PoolControl, runner: Runner,
                 metrics: OrchestratorMetrics, log: Logger, *,
                 provides: Callable[[str], bool] | None = None, grace_s: float = 0.0,
                 downloads: Downloads | None = None) -> None:
        self.book = book
        self.store = store
        self.queue = queue
        self.registry = registry
        self.scheduler = scheduler
        self.pools = pools
        self.shards = Shards(pools)  # sharded workers it is starting (issue 27)
        self.runner = runner
        self.metrics = metrics
        self.log = log
        #: verdicts of jobs told to wait at ``version``, by what makes jobs alike
        self._waiting: tuple[int, dict[tuple[str, str, str, bool], Verdict]] = (-1, {})
        #: what was sent to each worker lately: prefix-aware routing (the snapshot's
        #: ``prefix_match``)
        self.prefixes = PrefixBook()
        self._pruned_at = 0.0
        self._last_keys: tuple[str, list[tuple[bytes, int]]] = ("", [])
        self.provides = provides
        #: pull on first use (None: models no pool holds wait for an operator's download)
        self.downloads = downloads
        if downloads is not None:
            downloads.end_queued = self.end_queued
        #: start deadlines of queued jobs (admission and recovery add them)
        self.deadlines = Deadlines()
        #: the queue's estimate of a new job's wait, in ms (``Retry-After`` of DEADLINE_UNMET)
        self.estimate_ms: Callable[[], int] | None = None
        self._judge_after = time.monotonic() + grace_s

    def snapshot(self, job_id: str, pools: list[dict[str, Any]] | None = None) -> Snapshot:
        """The policy's input for ``job_id``; ``pools`` may be reused within one round."""
        now = time.time()
        queued = self.queue.get(job_id)
        assert queued is not None
        placement = None
        if queued.placement is not None:
            placement = attrs.asdict(queued.placement)
        job = {"job_id": job_id, "model": queued.model, "priority": queued.priority,
               "waited_s": max(0.0, now - queued.since), "retry_count": 0,
               "placement": placement}
        if queued.embedding:
            job["embedding"] = True
        if self.downloads is not None:
            job.update(self.downloads.job_fields(queued.model))
        head = [{"job_id": q.job_id, "model": q.model, "priority": q.priority,
                 "waited_s": max(0.0, now - q.since)} for q in self.queue.head(32)]
        if pools is None:
            pools = RoundPools(self.registry, self.downloads).get(
                batch=queued.priority == "batch")
        data = {"now": now, "job": job, "queue": head, "pools": pools,
                "throughput": {}, "worker_defaults": self.pools.worker_defaults}
        if len(self.prefixes):
            match = self.prefixes.matches(self._keys(job_id))
            if match:
                data["prefix_match"] = match
        return Snapshot(data)

    def _keys(self, job_id: str) -> list[tuple[bytes, int]]:
        """The prefix keys of a job this process admitted (none for one it recovered); the
        last job's are kept, for the claim that follows its decision."""
        if self._last_keys[0] == job_id:
            return self._last_keys[1]
        admitted = self.book.admitted.get(job_id)
        keys = prefix_keys(admitted.body) if admitted is not None else []
        self._last_keys = (job_id, keys)
        return keys

    def _prune(self) -> None:
        """Forget what workers that are gone held, and deadlines of jobs no longer queued
        (at most every PRUNE_EVERY_S)."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        self.deadlines.compact(self.queue)
        if not len(self.prefixes):
            return
        self.prefixes.keep_only({(e.pool_id, worker_id) for e in self.registry
                                 for worker_id, w in e.workers.items()
                                 if w.get("state") not in _GONE})

    def _sleep_s(self) -> float:
        """How long the loop may sleep: ROUND_EVERY_S, less when a deadline comes first."""
        due = self.deadlines.next_in(time.time())
        return ROUND_EVERY_S if due is None else min(ROUND_EVERY_S, max(0.002, due))

    async def _expire(self) -> None:
        """End the queued jobs whose start deadline has passed (``DEADLINE_UNMET``)."""
        now = time.time()
        for job_id, at in self.deadlines.due(now, self.queue, self.book.admitting.__contains__):
            queued = self.queue.remove(job_id)
            if queued is None:
                continue
            waited_ms = round((now - queued.since) * 1000)
            message = (f"not started within its deadline_ms of "
                       f"{round((at - queued.since) * 1000)}: it waited {waited_ms} ms in the "
                       "queue")
            extra = {"waited_ms": waited_ms}
            if self.estimate_ms is not None:
                extra["retry_after_ms"] = self.estimate_ms()
            self.log.info("job_deadline_unmet", job_id=job_id, model=queued.model,
                          waited_ms=waited_ms)
            with contextlib.suppress(ConflictError):  # ended meanwhile (cancelled)
                await self.end_queued(job_id, "failed", DEADLINE_UNMET, message, extra=extra)

    async def loop(self) -> None:
        """Dispatch rounds, each when woken (:meth:`Book.wake`) or every ROUND_EVERY_S."""
        wakeup = self.book.wakeup
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=self._sleep_s())
            wakeup.clear()
            if self._judge_after and time.monotonic() >= self._judge_after:
                # the pools had their grace to report in: jobs told to wait meanwhile are
                # judged now, not when something else next changes
                self._judge_after = 0.0
                self.book.changed()
            self.pools.age()
            self._prune()
            try:
                if len(self.deadlines):
                    await self._expire()
                await self._round()
            except Exception as exc:  # the loop must survive anything a round meets
                self.log.error("dispatch_round_failed", error=repr(exc))
            # one pass of the loop between rounds, no more: what happened meanwhile (a burst
            # of admissions) shares the next round, and a job admitted to an idle cluster is
            # dispatched within a millisecond (a timer, even of 1 ms, took 1-3 ms)
            await asyncio.sleep(0)

    async def _round(self) -> None:
        book = self.book
        pools = RoundPools(self.registry, self.downloads)
        for queued in self.queue.head(DISPATCH_WINDOW):
            if queued.job_id not in self.queue or queued.job_id in book.admitting:
                continue
            if book.waited_at.get(queued.job_id) == book.version:
                continue
            marks = pools.failed_loads(queued)
            if marks:  # its model never loads on any pool that has it: it ends now
                await self._end_failed_load(queued, marks)
                continue
            decision = self._decide(queued, pools)
            if isinstance(decision, Ending):
                await self._end_never(queued, decision)
            elif decision is not None:
                run = self._claim(queued.job_id, *decision)
                if run is not None:
                    await self._dispatch(run)
                    pools = RoundPools(self.registry, self.downloads)  # a slot was taken

    def place_now(self, job_id: str) -> Run | None:
        """Decide a job just admitted at the head of the queue; claim the slot the policy
        names (see :meth:`_claim`), or None: the dispatcher takes it from there."""
        queued = self.queue.get(job_id)
        if queued is None:
            return None
        pools = RoundPools(self.registry, self.downloads)
        if pools.failed_loads(queued):  # the dispatcher ends it once it is durable
            return None
        decision = self._decide(queued, pools)  # an Ending: the round ends it once durable
        return None if not isinstance(decision, tuple) else self._claim(job_id, *decision)

    def _decide(self, queued: QueuedJob, pools: RoundPools) -> tuple[str, str] | Ending | None:
        """The policy's verdict for a queued job: ``(pool_id, worker_id)`` to dispatch it
        to, an :class:`Ending` when it can never run, else None (it waits; workers the
        verdict asks for are started or stopped)."""
        book = self.book
        if self._waiting[0] != book.version:
            self._waiting = (book.version, {})
        waiting = self._waiting[1]  # jobs alike wait alike, until the version changes
        alike = (queued.model, queued.priority, repr(queued.placement), queued.embedding)
        verdict: Verdict | None = waiting.get(alike)
        failed = None if self.downloads is None else self.downloads.failure(queued.model)
        if failed is not None:  # its download failed lately: no new one yet
            return Ending(MODEL_DOWNLOAD_FAILED, failed)
        if verdict is None:  # jobs that wait like an earlier one: its record explains them
            t0 = time.perf_counter()
            snapshot = self.snapshot(queued.job_id,
                                     pools.get(batch=queued.priority == "batch"))
            verdict = self.scheduler.decide(snapshot)
            self.metrics.scheduling.observe(time.perf_counter() - t0)
            book.spawn(self._record(queued.job_id, verdict, snapshot.data))
        if verdict.summary.startswith(SHARDED):  # alike to one waiting for its shard
            return None
        fail = next((d for d in verdict.decisions if d.action == "fail"), None)
        if fail is not None or all(d.action == "wait" for d in verdict.decisions):
            ending = self._never(queued, pools, verdict) if fail is None else Ending(
                NO_CAPACITY, fail.reason or f"policy {verdict.policy} refused it")
            if ending is not None:
                sharded = self._shard(queued, pools, verdict)
                if sharded is None:
                    return ending
                verdict = sharded  # it waits for its sharded worker (orchestrator.shards)
            book.waited_at[queued.job_id] = book.version
            waiting[alike] = verdict
            return None
        for decision in verdict.decisions:
            if decision.action == "dispatch" and decision.pool_id and decision.worker_id:
                return decision.pool_id, decision.worker_id
            if decision.action == "start_worker" and decision.pool_id and decision.device:
                self.pools.start_worker(decision.pool_id, decision.device,
                                        decision.model or queued.model, slots=decision.slots,
                                        ctx=decision.ctx, threads=decision.threads,
                                        embedding=bool(decision.embedding) or queued.embedding,
                                        n_gpu_layers=decision.n_gpu_layers,
                                        tensor_split=decision.tensor_split)
                pools.taken = None  # the next job of this round sees the start
            elif decision.action == "stop_worker" and decision.pool_id and decision.worker_id:
                # stopping from now: the next decision counts its memory as being freed
                # and places nothing on it (its pool's next report says how it is)
                self.pools.stopping(decision.pool_id, decision.worker_id)
                pools.taken = None
                book.spawn(self.pools.stop_worker(decision.pool_id, decision.worker_id))
            elif decision.action == "download" and decision.pool_id \
                    and self.downloads is not None:
                self.downloads.start(decision.pool_id, decision.model or queued.model)
                pools.taken = None  # the next job of this round sees the download
        return None

    def _never(self, queued: QueuedJob, pools: RoundPools, verdict: Verdict) -> Ending | None:
        """The :class:`Ending` of a job told to wait that can never be placed, recorded as
        a ``fail`` decision after the policy's; None while it may (once per model and pin
        in a round)."""
        if self.provides is None or time.monotonic() < self._judge_after:
            return None
        placement = None if queued.placement is None else attrs.asdict(queued.placement)
        key = (queued.model, repr(placement))
        if key not in pools.never:
            found = never_placeable({"model": queued.model, "placement": placement},
                                    pools.get(), provided=self.provides(queued.model))
            pools.never[key] = None if found is None else Ending(NO_CAPACITY, found[1], found[0])
        ending = pools.never[key]
        if ending is not None:
            self.book.spawn(self._record(queued.job_id, Verdict(
                policy=verdict.policy, decisions=[Decision("fail", code=ending.code,
                                                           reason=ending.message)],
                candidates=verdict.candidates, summary=ending.message)))
        return ending

    def _shard(self, queued: QueuedJob, pools: RoundPools, verdict: Verdict) -> Verdict | None:
        """A job no pool can hold alone: when lending pools hold it together, start a
        sharded worker for it (:mod:`rbees_core.orchestrator.shards`) and record why; the
        verdict it waits with. None: no shard either (``NO_CAPACITY`` stands)."""
        placement = None if queued.placement is None else attrs.asdict(queued.placement)
        if placement and placement.get("pool"):
            return None  # pinned to one pool: a shard is not that pool
        if self.shards.reap():  # a sharded worker is gone: its servers' memory comes back
            return Verdict(policy=verdict.policy, decisions=[Decision("wait", reason=SHARDED)],
                           candidates=verdict.candidates, summary=SHARDED)
        plan = shard_for({"model": queued.model}, pools.get())
        if plan is None:
            return None
        self.shards.start(queued.model, plan)
        shard = shard_verdict(verdict, plan, queued.model)
        self.book.spawn(self._record(queued.job_id, shard))
        return shard

    def _claim(self, job_id: str, pool_id: str, worker_id: str) -> Run | None:
        """Take the job off the queue and a slot on the worker, in memory; None when the
        slot is gone. The dispatch is written next (:meth:`_dispatch`, or with the
        admission), then announced (:meth:`announce`)."""
        entry = self.registry.pools.get(pool_id)
        worker = entry.workers.get(worker_id) if entry else None
        waiting = self.queue.get(job_id)
        batch = waiting is not None and waiting.priority == "batch"
        if worker is None or self.registry.free_slots(pool_id, worker, batch=batch) <= 0:
            return None  # (a batch job leaves the slots kept for interactive ones)
        if waiting is not None and bool(worker.get("embedding")) is not waiting.embedding:
            # a policy's slip (a script's): embedding jobs and the rest never share workers
            self.log.error("dispatch_refused", job_id=job_id, pool_id=pool_id,
                           worker_id=worker_id, embedding=waiting.embedding)
            return None
        queued = self.queue.remove(job_id)
        if queued is None:
            return None
        self.registry.take(pool_id, worker_id)
        self.pools.busy(pool_id, worker_id, self.book.keep_alive.pop(job_id, None))
        self.prefixes.dispatched(pool_id, worker_id, job_id, self._keys(job_id))
        run = Run(job_id=job_id, pool_id=pool_id, worker_id=worker_id, uri=str(worker["uri"]),
                  model=queued.model, created_at=queued.since, queue_seq=queued.seq)
        self.book.runs[job_id] = run
        self.book.run_started.set()
        return run

    async def _dispatch(self, run: Run) -> None:
        """Write a claimed job's dispatch, then announce it and start streaming."""
        channel = self.book.channel(run.job_id)
        await self.store.transition_async(
            run.job_id, "dispatched", pool_id=run.pool_id, worker_id=run.worker_id,
            events=[*channel.take_unpersisted(), ("dispatched", run.dispatched)])
        self.announce(run)
        self.runner.start(run)

    async def _end_failed_load(self, queued: QueuedJob,
                               marks: list[tuple[str, dict[str, Any]]]) -> None:
        """End a queued job whose model is marked failed wherever it could run."""
        if self.queue.remove(queued.job_id) is None:
            return
        error = ModelLoadError(describe_failed_loads(queued.model or "the model", marks))
        self.log.error("job_model_load_failed", job_id=queued.job_id, model=queued.model,
                       pools=[pool_id for pool_id, _ in marks])
        try:
            await self.end_queued(queued.job_id, "failed", error.code, error.message)
        except ConflictError:  # ended meanwhile (cancelled)
            return

    async def _end_never(self, queued: QueuedJob, ending: Ending) -> None:
        """End a queued job that can never run (``NO_CAPACITY``)."""
        if self.queue.remove(queued.job_id) is None:
            return
        self.log.warning("job_never_placeable", job_id=queued.job_id, model=queued.model,
                       code=ending.code, reason=ending.message)
        with contextlib.suppress(ConflictError):  # ended meanwhile (cancelled)
            await self.end_queued(queued.job_id, "failed", ending.code, ending.message,
                                  extra=None if ending.kind is None else {"reason": ending.kind})

    async def end_queued(self, job_id: str, status: str, code: str, message: str, *,
                         extra: dict[str, Any] | None = None) -> None:
        """Write and announce the end of a job that never ran (taken off the queue by the
        caller): its ``error`` event (with ``extra``: the ``reason`` of ``NO_CAPACITY``,
        ``waited_ms`` and ``retry_after_ms`` of ``DEADLINE_UNMET``), then retire it. Raises
        what the store raises (:class:`ConflictError` when it has ended already)."""
        error: dict[str, Any] = {"job_id": job_id, "code": code, "message": message,
                                 "retriable": code in (QUEUE_FULL_DROPPED,
                                                       MODEL_DOWNLOAD_FAILED), **(extra or {})}
        channel = self.book.channel(job_id)
        await self.store.transition_async(job_id, status, error_code=code, error_message=message,
                                          events=[*channel.take_unpersisted(), ("error", error)])
        channel.publish("error", error, persisted=True)
        self.metrics.finished.labels(outcome=status).inc()
        self.book.waited_at.pop(job_id, None)
        self.book.retire(job_id)

    def announce(self, run: Run) -> None:
        """Publish a run's ``dispatched`` event, written already."""
        self.book.channel(run.job_id).publish("dispatched", run.dispatched, persisted=True)
        self.book.waited_at.pop(run.job_id, None)
        self.book.version += 1

    async def _record(self, job_id: str, verdict: Verdict,
                      snapshot: dict[str, Any] | None = None) -> None:
        """Keep the decision and the snapshot the policy read (None: rbees-orcd's own,
        no policy's), unless it repeats the job's previous one word for word."""
        key = json.dumps([[d.to_dict() for d in verdict.decisions], verdict.summary],
                         sort_keys=True)
        last = self.book.last_decision
        if last.get(job_id) == key:
            return
        last[job_id] = key
        with contextlib.suppress(RbeesError):
            await self.store.record_decision_async(job_id, verdict.to_dict(), snapshot)

    def current_verdict(self, job_id: str) -> Verdict | None:
        """What the policy would decide for a queued job now, else None."""
        if job_id not in self.queue:
            return None
        verdict: Verdict = self.scheduler.decide(self.snapshot(job_id))
        return verdict

    def _awaits_download(self, model: str) -> bool:
        """Whether ``model`` is one a source can download that no pool that is not offline
        holds or serves, and no download of it is under way."""
        if self.provides is None or not self.provides(model):
            return False
        found = never_placeable({"model": model}, self.registry.snapshot_pools(),
                                provided=False)
        return found is not None and found[0] == UNKNOWN_MODEL

    async def why(self, job_id: str) -> dict[str, Any]:
        """``GET /v2/tasks/{id}/decision``: the job's recorded decisions and, in words, what
        holds it now (queued) or the last one. Raises :class:`JobNotFoundError`."""
        decisions = await asyncio.to_thread(self.store.decisions, job_id)
        record = await asyncio.to_thread(self.store.get, job_id)
        marks = failed_loads(self.registry.snapshot_pools(), record.model) \
            if any(e.state.failed_models for e in self.registry) else []
        text = "no scheduling decision has been made for this job yet"
        current = self.current_verdict(job_id)
        if current is not None:  # still queued: explain what holds it now
            text = explain(current)
            decisions = [*decisions, {"decided_at": time.time(), **current.to_dict()}]
        elif decisions:
            latest = decisions[-1]
            verdict = Verdict(
                policy=str(latest.get("policy")),
                decisions=[Decision(**d) for d in latest.get("decisions", [])],
                candidates=[Candidate(**c) for c in latest.get("candidates", [])],
                summary=str(latest.get("summary") or ""), fallback=latest.get("fallback"),
                elapsed_ms=float(latest.get("elapsed_ms") or 0.0))
            text = explain(verdict)
        if record.error is not None and record.error.code in _ENDED_BY_PLACEMENT:
            text = f"{text} The job ended ({record.error.code}): {record.error.message}."
        elif marks:
            text = f"{text} {describe_failed_loads(record.model, marks)}."
        elif current is not None and self.downloads is not None \
                and self.downloads.describe(record.model):
            going = str(self.downloads.describe(record.model))
            if going not in text:
                text = f"{text} {_first_upper(going)}."
        elif current is not None and self._awaits_download(record.model):
            text = (f"{text} No pool has {record.model} on disk yet and no download of it "
                    "is under way: a source can download it, and the job waits until a pool "
                    f"can take the download (or `rbees pool models download {record.model} "
                    "--host HOST`).")
        return {"job_id": job_id, "decisions": decisions, "explanation": text,
                "failed_models": [{"pool_id": pool_id, **mark} for pool_id, mark in marks]}


def _first_upper(text: str) -> str:
    return text[:1].upper() + text[1:]
