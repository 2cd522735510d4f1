"""rbees-orcd's service: admission, dispatch, job runners, streams, pools. One event loop.

Flow of a job: ``submit`` (durable, then 202) -> the dispatcher asks the scheduler for the
head of the queue -> ``dispatched`` (durable, then announced) -> a runner streams the
worker's SSE, announcing each token at once and writing tokens in batches (the first one
before it is announced, so a restart knows the job produced output) -> ``end``/``error``
written with the final transition, then announced. A failure before the first token puts
the job back in the queue (at most 3 times, backoff 0.5/1/2 s); after it, the job fails
with ``WORKER_FAILED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import attrs
import httpx
import pluggy

from rbees_core import plugins
from rbees_core.api.orchestrator import TaskAccepted, TaskRequest
from rbees_core.api.pool import PoolHeartbeat
from rbees_core.errors import (
    ConflictError,
    InvalidParamsError,
    ModelNotFoundError,
    NotFoundError,
    RbeesError,
)
from rbees_core.log import Logger, correlation_id
from rbees_core.orchestrator import QUEUE_FULL_DROPPED, JobQueue, Store, new_job
from rbees_core.orchestrator.channel import Channel
from rbees_core.orchestrator.jobs import NewJob, execute_body
from rbees_core.orchestrator.metrics import OrchestratorMetrics
from rbees_core.orchestrator.queue import Pushed, QueuedJob
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.orchestrator.upstream import Exchange, Upstream, UpstreamError
from rbees_core.scheduling import Snapshot, Verdict

RETRY_BACKOFF_S = (0.5, 1.0, 2.0)
#: waiting jobs are decided again at least this often, even when nothing changed
POLICY_CLOCK_S = 30.0
MAX_RETRIES = 3
#: tokens after the first are written in batches this often. What they buy is the replay of a
#: job that failed at a restart; a commit costs about a millisecond of the loop, and at 0.1 s
#: the flushes took a third of rbees-orcd's CPU per relayed token (docs/benchmarks.md)
FLUSH_INTERVAL_S = 0.5
#: a dispatch round considers this many jobs from the head of the queue
DISPATCH_WINDOW = 64
WORKER_READ_TIMEOUT_S = 120.0
#: Worker error codes that say "try elsewhere" rather than "this job is bad".
RETRIABLE_WORKER_CODES = frozenset({"ALL_SLOTS_BUSY", "DRAINING", "NOT_READY", "WORKER_STOPPED",
                                    "DECODE_FAILED"})


class WorkerFailedBeforeTokenError(Exception):
    """The worker failed before the first token: the job may run elsewhere."""


@attrs.define
class OrcdSettings:
    db_path: str
    capacity: int = 1024
    policy: str = "reject"
    promote_after_s: float = 300.0
    heartbeat_interval_s: float = 5.0
    idle_timeout_s: float = 300.0
    scheduler: str = "least-loaded"
    scheduler_script: str | None = None
    token: str | None = None
    default_ctx_slots: int = 1


def retrieved(task: asyncio.Task[Any]) -> None:
    """Marks a task's outcome as seen (asyncio logs an error never retrieved otherwise)."""
    if not task.cancelled():
        task.exception()


@attrs.frozen
class Admitted:
    """What this process keeps of a job that it admitted, until the job ends."""

    #: the worker's request (prompt included): no read of the store before the first token
    body: dict[str, Any]
    #: whether the job is cancelled when its events' client goes (the rest of the spec is
    #: in the store; this spares an events request a read)
    cancel_on_disconnect: bool


@attrs.define(eq=False)
class Run:
    """A dispatched job being streamed from its worker."""

    job_id: str
    pool_id: str
    worker_id: str
    uri: str
    task: asyncio.Task[None] | None = None
    final: bool = False
    tokens: int = 0
    cancelled: bool = False
    created_at: float = 0.0
    last_token_at: float = 0.0
    queue_seq: int | None = None
    started: dict[str, Any] | None = None
    #: set when the job is sent to its worker while its admission is being written: True
    #: once written, False if that failed. Nothing the worker answers is acted on before.
    written: asyncio.Future[bool] | None = None
    #: the request to the worker (sent before the runner starts when a connection is open)
    exchange: Exchange | None = None

    @property
    def dispatched(self) -> dict[str, Any]:
        """The data of the job's ``dispatched`` event."""
        return {"job_id": self.job_id, "pool_id": self.pool_id, "worker_id": self.worker_id}


class OrchestratorService:
    def __init__(self, settings: OrcdSettings, pm: pluggy.PluginManager, log: Logger) -> None:
        self.settings = settings
        self.pm = pm
        self.log = log
        self.store = Store(settings.db_path)
        self.queue = JobQueue(capacity=settings.capacity, policy=settings.policy,  # type: ignore[arg-type]
                              promote_after_s=settings.promote_after_s)
        self.registry = PoolRegistry(heartbeat_interval_s=settings.heartbeat_interval_s)
        self.metrics = OrchestratorMetrics(self)
        from rbees_core.catalog import configured_catalog

        self.catalog = configured_catalog(pm)  # read once: admission must stay cheap
        self.channels: dict[str, Channel] = {}
        self.dirty: set[Channel] = set()  # channels with events not yet written
        self.runs: dict[str, Run] = {}
        self.starting: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.idle_since: dict[tuple[str, str], float] = {}
        self.started_by_us: set[tuple[str, str]] = set()
        self.last_decision: dict[str, str] = {}
        self.admitting: set[str] = set()
        #: jobs taken out of a full queue to make room for an admission not yet durable:
        #: ended when it commits, put back in their places when it fails
        self.dropping: dict[str, QueuedJob] = {}
        #: jobs admitted by this process and not yet ended
        self.admitted: dict[str, Admitted] = {}
        #: bumped whenever something a policy reads changes; a job that was told to wait at
        #: the current version is not asked about again (admission stays cheap when 10,000
        #: jobs wait for a model no pool has)
        self.version = 0
        self.waited_at: dict[str, int] = {}
        self._version_bumped_at = time.monotonic()
        self.job_seconds = 2.0  # moving estimate of a job's duration, for predicted_start_ms
        self._slots = (-1, 0)  # (version, ready worker slots), for predicted_start_ms
        self._aged_at = 0.0
        self._statuses: dict[str, str] = {}
        #: verdicts of jobs told to wait at ``version``, by what makes jobs alike
        self._waiting: tuple[int, dict[tuple[str, str, str], Verdict]] = (-1, {})
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=WORKER_READ_TIMEOUT_S))
        self._upstream = Upstream(connect_timeout=10.0, read_timeout=WORKER_READ_TIMEOUT_S)
        schedulers = plugins.schedulers(pm)
        if settings.scheduler not in schedulers:
            raise RbeesError(f"no scheduler named {settings.scheduler!r} is installed "
                             f"(installed: {', '.join(sorted(schedulers)) or 'none'})")
        from rbees_core.config import SchedulerConfig

        self.scheduler = schedulers[settings.scheduler].from_config(SchedulerConfig(
            policy=settings.scheduler, script=settings.scheduler_script))

    # -- lifecycle -------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        recovery = await asyncio.to_thread(self.store.recover)
        for job in recovery.queued:
            history = [(e.event_id, e.event, e.payload())
                       for e in self.store.events_after(job.job_id, 0)]
            channel = self.channels[job.job_id] = Channel(job.job_id, history, self.dirty)
            if not history:  # admitted, but its queued event had not been written yet
                channel.publish("queued", {"job_id": job.job_id, "queue_position": 0,
                                           "predicted_start_ms": 0}, persisted=False)
            self.queue.push(job.job_id, job.priority, model=job.model,
                            placement=job.placement, since=job.created_at, force=True)
        self.log.info("recovered", queued=len(recovery.queued), requeued=len(recovery.requeued),
                      failed=len(recovery.failed), settled=len(recovery.settled))
        self._spawn(self._dispatch_loop())
        self._spawn(self._flush_loop())
        self._spawn(self._idle_loop())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for run in list(self.runs.values()):
            if run.task is not None:
                run.task.cancel()
        await asyncio.sleep(0)
        await self._flush()
        await self._client.aclose()
        self._upstream.close()
        await asyncio.to_thread(self.scheduler.close)
        await asyncio.to_thread(self.store.close)

    def wake(self) -> None:
        self._wake.set()

    # -- admission -------------------------------------------------------------------------

    def known_model(self, model: str) -> bool:
        if self.catalog.get(model) is not None:
            return True
        for entry in self.registry:
            for w in entry.workers.values():
                if w.get("model_ref") == model:
                    return True
            for m in entry.state.models:
                if model in (m.get("ref"), m.get("id")):
                    return True
        return False

    async def submit(self, request: TaskRequest) -> TaskAccepted:
        if not self.known_model(request.model):
            raise ModelNotFoundError(f"model {request.model!r} is not in the catalog and no "
                                     "pool has it", details={"model": request.model})
        job = new_job(request, correlation_id=correlation_id.get())
        self.admitted[job.job_id] = Admitted(execute_body(job), request.cancel_on_disconnect)
        pushed = self.queue.push(job.job_id, job.priority, model=job.model,
                                 placement=request.placement)
        if pushed.dropped is not None:
            self.dropping[pushed.dropped.job_id] = pushed.dropped
        # the dispatcher leaves the job alone until it is durable with its `queued` event
        # (event 1, in the same transaction), so that `dispatched` can only follow it
        self.admitting.add(job.job_id)
        self.channels[job.job_id] = Channel(job.job_id, dirty=self.dirty)
        position = pushed.position
        queued = {"job_id": job.job_id, "queue_position": position,
                  "predicted_start_ms": self.predicted_start_ms(position)}
        # At the head of the queue, the job is decided now: placed at once, its dispatch is
        # committed with its admission, one write and no dispatcher round on the way to
        # its first token; and the worker starts on it while that write is made.
        run = self._place_now(job.job_id) if position == 0 else None
        if run is not None:
            run.written = asyncio.get_running_loop().create_future()
            with contextlib.suppress(UpstreamError):  # else the runner meets it again
                run.exchange = self._execute(run, self.admitted[job.job_id].body)
                run.exchange.send_now()  # on an open connection: before the runner starts
            run.task = self._spawn(self._run(run))
        # Queued now, the write goes in ahead of any made for this job later (the placement
        # decision just taken is recorded by a task). It and what follows it run to their
        # end even when the caller is cancelled (a server shutting down): the write
        # commits all the same, and a durable job that this process had forgotten would
        # wait for its next restart.
        try:
            write = self.store.admit_soon(job, [("queued", queued)], dispatched=None
                                          if run is None else (run.pool_id, run.worker_id,
                                                               [("dispatched", run.dispatched)]))
        except BaseException:
            self._withdraw(job.job_id, run, pushed.dropped)
            raise
        admission = self._spawn(self._admit(job, queued, pushed, run, write))
        admission.add_done_callback(retrieved)  # also when nobody waits for it any more
        return await asyncio.shield(admission)

    def _withdraw(self, job_id: str, run: Run | None, dropped: QueuedJob | None) -> None:
        """Undo what :meth:`submit` prepared for a job whose admission failed; the job it
        dropped to make room, unless cancelled meanwhile, goes back to its place."""
        self.admitting.discard(job_id)
        self.queue.remove(job_id)
        # never durable: neither put back nor ended, when a later admission dropped it too
        self.dropping.pop(job_id, None)
        if dropped is not None and self.dropping.pop(dropped.job_id, None) is not None:
            self.queue.push(dropped.job_id, dropped.priority, model=dropped.model,
                            placement=dropped.placement, seq=dropped.seq, since=dropped.since,
                            force=True)
            self.wake()  # it may be the head again
        if run is not None and run.written is not None:
            run.written.set_result(False)  # its runner gives the slot back
            if run.exchange is not None:
                run.exchange.close()  # the worker drops the job now
        self.channels.pop(job_id, None)
        self.admitted.pop(job_id, None)

    async def _admit(self, job: NewJob, queued: dict[str, Any], pushed: Pushed,
                     run: Run | None, write: asyncio.Future[Any]) -> TaskAccepted:
        """Await the admission's ``write`` that :meth:`submit` queued, then announce the job
        (or withdraw it)."""
        try:
            await write
        except BaseException:
            self._withdraw(job.job_id, run, pushed.dropped)
            raise
        self.admitting.discard(job.job_id)
        self.channels[job.job_id].publish("queued", queued, persisted=True)
        self.metrics.admitted.inc()
        if run is not None and run.written is not None:
            self._announce(run)
            run.written.set_result(True)
        if pushed.dropped is not None and \
                self.dropping.pop(pushed.dropped.job_id, None) is not None:
            try:
                await self._end_queued(pushed.dropped.job_id, "failed", QUEUE_FULL_DROPPED,
                                       "dropped to make room: the queue was full")
            except RbeesError as exc:  # this job is admitted all the same
                self.log.error("drop_failed", job_id=pushed.dropped.job_id, error=repr(exc))
        position = pushed.position
        if position < DISPATCH_WINDOW:  # further back, it waits for those ahead of it
            self.wake()
        return TaskAccepted(job_id=job.job_id, status="queued", queue_position=position,
                            predicted_start_ms=queued["predicted_start_ms"],
                            events_url=f"/v2/tasks/{job.job_id}/events")

    def predicted_start_ms(self, position: int) -> int:
        version, slots = self._slots
        if version != self.version:  # counted again only when the pools have changed
            slots = sum(max(1, int(w.get("slots_total") or 1)) for e in self.registry
                        for w in e.workers.values() if w.get("state") in ("ready", "busy"))
            self._slots = (self.version, slots)
        return int(position * self.job_seconds * 1000 / max(1, slots))

    async def _end_queued(self, job_id: str, status: str, code: str, message: str) -> None:
        error = {"job_id": job_id, "code": code, "message": message,
                 "retriable": code == QUEUE_FULL_DROPPED}
        channel = self._channel(job_id)
        await self.store.transition_async(job_id, status, error_code=code, error_message=message,
                                          events=[*channel.take_unpersisted(), ("error", error)])
        channel.publish("error", error, persisted=True)
        self.metrics.finished.labels(outcome=status).inc()
        self._retire(job_id)

    def _channel(self, job_id: str) -> Channel:
        channel = self.channels.get(job_id)
        if channel is None:
            channel = self.channels[job_id] = Channel(job_id, dirty=self.dirty)
        return channel

    def _retire(self, job_id: str) -> None:
        """Forget a finished job's channel a little later (late subscribers use the store)."""
        self.last_decision.pop(job_id, None)
        self.admitted.pop(job_id, None)
        self.waited_at.pop(job_id, None)

        async def later() -> None:
            await asyncio.sleep(30)
            channel = self.channels.get(job_id)
            if channel is not None and not channel.subscribers:
                self.channels.pop(job_id, None)
        self._spawn(later())

    # -- cancel ----------------------------------------------------------------------------

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job; returns False when it was already final. No token after this."""
        record = await asyncio.to_thread(self.store.get, job_id)
        if record.status in ("completed", "failed", "cancelled"):
            return False
        dropping = self.dropping.pop(job_id, None) is not None  # not put back, not dropped
        if self.queue.remove(job_id) is not None or dropping or record.status == "queued":
            try:
                await self._end_queued(job_id, "cancelled", "CANCELLED",
                                       "cancelled by request")
            except ConflictError:  # ended while its record was read (dropped, say)
                return False
            return True
        run = self.runs.get(job_id)
        if run is None or run.final:
            return False
        run.cancelled = True
        run.final = True
        await self._finish(run, "cancelled", "CANCELLED", {
            "job_id": job_id, "code": "CANCELLED", "message": "cancelled by request",
            "retriable": False})
        self._spawn(self._tell_worker_cancel(run))
        if run.task is not None:
            run.task.cancel()
        return True

    async def _tell_worker_cancel(self, run: Run) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self._client.post(f"{run.uri}/v2/cancel", json={"job_id": run.job_id},
                                    headers=self._auth(), timeout=5)

    def _auth(self) -> dict[str, str]:
        token = self.settings.token
        headers = {"X-Correlation-Id": correlation_id.get()} \
            if correlation_id.get() != "-" else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    # -- pools -----------------------------------------------------------------------------

    def changed(self) -> None:
        self.version += 1
        self._version_bumped_at = time.monotonic()
        self.wake()

    def heartbeat(self, beat: PoolHeartbeat) -> None:
        entry = self.registry.pools.get(beat.pool_id)
        before = None if entry is None else (self.registry.status(entry), _shape(entry.workers))
        entry, new = self.registry.heartbeat(beat)
        if new:
            self.log.info("pool_registered", pool_id=beat.pool_id, url=beat.url)
        status = self.registry.status(entry)
        if before != (status, _shape(entry.workers)):
            self.changed()
            # counted here: the aging pass bumps the version only for what no heartbeat
            # announced (with 1,000 pools registered, each bump costs a decision of 10-20 ms
            # of the loop). Only here: a beat that changed nothing (a late one, ignored)
            # must not hide from the aging pass a status that aging changed meanwhile.
            self._statuses[beat.pool_id] = status

    def deregister(self, pool_id: str) -> bool:
        found = self.registry.remove(pool_id)
        self._statuses.pop(pool_id, None)
        if found:
            self.log.info("pool_deregistered", pool_id=pool_id)
            self.changed()
        return found

    def drain_pool(self, pool_id: str) -> None:
        entry = self.registry.pools.get(pool_id)
        if entry is None:
            raise NotFoundError(f"no pool {pool_id!r}", details={"pool_id": pool_id})
        entry.draining = True
        self.changed()

    # -- dispatch --------------------------------------------------------------------------

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
        head = [{"job_id": q.job_id, "model": q.model, "priority": q.priority,
                 "waited_s": max(0.0, now - q.since)} for q in self.queue.head(32)]
        if pools is None:
            pools = self.registry.snapshot_pools()
        return Snapshot({"now": now, "job": job, "queue": head, "pools": pools,
                         "throughput": {}})

    async def _dispatch_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            self._wake.clear()
            self._age_pools()
            try:
                await self._dispatch_round()
            except Exception as exc:  # the loop must survive anything a round meets
                self.log.error("dispatch_round_failed", error=repr(exc))
            # one pass of the loop between rounds, no more: what happened meanwhile (a burst
            # of admissions) shares the next round, and a job admitted to an idle cluster is
            # dispatched within a millisecond (a timer, even of 1 ms, took 1-3 ms)
            await asyncio.sleep(0)

    def _age_pools(self) -> None:
        """Pools age without events: missed heartbeats make one unavailable, then offline.
        Twice a second, a status changed by aging bumps the version so waiting jobs are
        decided again (one changed by a heartbeat has bumped it already); so does the
        passing of POLICY_CLOCK_S, for policies that read the clock."""
        now = time.monotonic()
        if now - self._aged_at < 0.5:
            return
        self._aged_at = now
        statuses = self.registry.statuses()
        if statuses != self._statuses or now - self._version_bumped_at > POLICY_CLOCK_S:
            self._statuses = statuses
            self.version += 1
            self._version_bumped_at = now

    async def _dispatch_round(self) -> None:
        pools = _Pools(self.registry)
        for queued in self.queue.head(DISPATCH_WINDOW):
            if queued.job_id not in self.queue or queued.job_id in self.admitting:
                continue
            if self.waited_at.get(queued.job_id) == self.version:
                continue
            decision = self._decide(queued, pools)
            if decision is not None:
                run = self._claim(queued.job_id, *decision)
                if run is not None:
                    await self._dispatch(run)
                    pools = _Pools(self.registry)  # a slot was taken

    def _decide(self, queued: QueuedJob, pools: _Pools) -> tuple[str, str] | None:
        """The policy's verdict for a queued job: ``(pool_id, worker_id)`` to dispatch it
        to, else None (it waits; workers the verdict asks for are started or stopped)."""
        if self._waiting[0] != self.version:
            self._waiting = (self.version, {})
        waiting = self._waiting[1]  # jobs alike wait alike, until the version changes
        alike = (queued.model, queued.priority, repr(queued.placement))
        verdict: Verdict | None = waiting.get(alike)
        if verdict is None:  # jobs that wait like an earlier one: its record explains them
            t0 = time.perf_counter()
            verdict = self.scheduler.decide(self.snapshot(queued.job_id, pools.get()))
            self.metrics.scheduling.observe(time.perf_counter() - t0)
            self._spawn(self._record(queued.job_id, verdict))
        if all(d.action == "wait" for d in verdict.decisions):
            self.waited_at[queued.job_id] = self.version
            waiting[alike] = verdict
            return None
        for decision in verdict.decisions:
            if decision.action == "dispatch" and decision.pool_id and decision.worker_id:
                return decision.pool_id, decision.worker_id
            if decision.action == "start_worker" and decision.pool_id and decision.device:
                self._start_worker(decision.pool_id, decision.device,
                                   decision.model or queued.model)
            elif decision.action == "stop_worker" and decision.pool_id and decision.worker_id:
                self._spawn(self._stop_worker(decision.pool_id, decision.worker_id))
        return None

    def current_verdict(self, job_id: str) -> Verdict | None:
        """What the policy would decide for a queued job now (for ``why``), else None."""
        if job_id not in self.queue:
            return None
        verdict: Verdict = self.scheduler.decide(self.snapshot(job_id))
        return verdict

    async def _record(self, job_id: str, verdict: Verdict) -> None:
        """Keep the decision, unless it repeats the job's previous one word for word."""
        key = json.dumps([[d.to_dict() for d in verdict.decisions], verdict.summary],
                         sort_keys=True)
        if self.last_decision.get(job_id) == key:
            return
        self.last_decision[job_id] = key
        with contextlib.suppress(RbeesError):
            await self.store.record_decision_async(job_id, verdict.to_dict())

    def _start_worker(self, pool_id: str, device: str, model: str) -> None:
        key = (pool_id, model)
        if key in self.starting:
            return
        self.starting[key] = self._spawn(self._start_worker_task(pool_id, device, model))

    async def _start_worker_task(self, pool_id: str, device: str, model: str) -> None:
        entry = self.registry.pools.get(pool_id)
        try:
            if entry is None or not entry.state.url:
                raise RbeesError(f"pool {pool_id} has no URL to start a worker on")
            answer = await self._client.post(
                f"{entry.state.url}/v2/workers/start", headers=self._auth(),
                json={"model_ref": model, "device": device})
            if answer.status_code != 202:
                raise RbeesError(f"pool {pool_id} refused to start {model}: {answer.text[:300]}")
            worker_id = answer.json()["worker_id"]
            self.started_by_us.add((pool_id, worker_id))
            self.log.info("worker_start_requested", pool_id=pool_id, worker_id=worker_id,
                          model=model, device=device)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                got = await self._client.get(f"{entry.state.url}/v2/workers/{worker_id}",
                                             headers=self._auth())
                worker = got.json()
                if worker.get("state") in ("ready", "busy"):
                    self.registry.set_worker(pool_id, worker)
                    break
                if worker.get("state") in ("failed", "stopped"):
                    raise RbeesError(f"worker {worker_id} on {pool_id} {worker.get('state')}: "
                                     f"{worker.get('error')}")
                await asyncio.sleep(0.05)
        except (RbeesError, httpx.HTTPError, ValueError) as exc:
            self.log.error("worker_start_failed", pool_id=pool_id, model=model, error=str(exc))
            await asyncio.sleep(1.0)  # do not hammer a pool that refuses
        finally:
            self.starting.pop((pool_id, model), None)
            self.changed()

    async def _stop_worker(self, pool_id: str, worker_id: str) -> None:
        entry = self.registry.pools.get(pool_id)
        if entry is None or not entry.state.url:
            return
        with contextlib.suppress(httpx.HTTPError):
            await self._client.post(f"{entry.state.url}/v2/workers/{worker_id}/stop",
                                    headers=self._auth())
        worker = entry.workers.get(worker_id)
        if worker is not None:
            worker["state"] = "stopping"
        self.log.info("worker_stop_requested", pool_id=pool_id, worker_id=worker_id)

    def _place_now(self, job_id: str) -> Run | None:
        """Decide a job just admitted at the head of the queue; claim the slot the policy
        names (see :meth:`_claim`), or None: the dispatcher takes it from there."""
        queued = self.queue.get(job_id)
        if queued is None:
            return None
        decision = self._decide(queued, _Pools(self.registry))
        return None if decision is None else self._claim(job_id, *decision)

    def _claim(self, job_id: str, pool_id: str, worker_id: str) -> Run | None:
        """Take the job off the queue and a slot on the worker, in memory; None when the
        slot is gone. The dispatch is written next (:meth:`_dispatch`, or with the
        admission), then announced (:meth:`_announce`)."""
        entry = self.registry.pools.get(pool_id)
        worker = entry.workers.get(worker_id) if entry else None
        if worker is None or self.registry.free_slots(pool_id, worker) <= 0:
            return None
        queued = self.queue.remove(job_id)
        if queued is None:
            return None
        self.registry.take(pool_id, worker_id)
        self.idle_since.pop((pool_id, worker_id), None)
        run = Run(job_id=job_id, pool_id=pool_id, worker_id=worker_id, uri=str(worker["uri"]),
                  created_at=queued.since, queue_seq=queued.seq)
        self.runs[job_id] = run
        return run

    async def _dispatch(self, run: Run) -> None:
        """Write a claimed job's dispatch, then announce it and start streaming."""
        channel = self._channel(run.job_id)
        await self.store.transition_async(
            run.job_id, "dispatched", pool_id=run.pool_id, worker_id=run.worker_id,
            events=[*channel.take_unpersisted(), ("dispatched", run.dispatched)])
        self._launch(run)

    def _launch(self, run: Run) -> None:
        self._announce(run)
        run.task = self._spawn(self._run(run))

    def _announce(self, run: Run) -> None:
        self._channel(run.job_id).publish("dispatched", run.dispatched, persisted=True)
        self.waited_at.pop(run.job_id, None)
        self.version += 1

    @staticmethod
    async def _written(run: Run) -> bool:
        """Whether the job of a run exists in the store: False when the admission that
        carried its dispatch failed, and the run must end without a trace."""
        return run.written is None or await asyncio.shield(run.written)

    # -- runners ---------------------------------------------------------------------------

    async def _run(self, run: Run) -> None:
        admitted = self.admitted.get(run.job_id)
        if admitted is not None:
            body = admitted.body
        else:  # admitted before a restart
            body = (await asyncio.to_thread(self.store.spec, run.job_id)).execute_body()
        try:
            await self._stream(run, body)
        except WorkerFailedBeforeTokenError as exc:
            if await self._written(run):
                await self._retry(run, str(exc))
        except asyncio.CancelledError:
            raise
        except (UpstreamError, ValueError) as exc:
            if run.final or not await self._written(run):
                pass  # already ended, or never admitted: nothing to record
            elif run.tokens == 0:
                await self._retry(run, f"{type(exc).__name__}: {exc}")
            else:
                run.final = True
                self.log.warning("worker_failed_mid_stream", job_id=run.job_id,
                                 pool_id=run.pool_id, worker_id=run.worker_id,
                                 error=f"{type(exc).__name__}: {exc}")
                await self._finish(run, "failed", "WORKER_FAILED", {
                    "job_id": run.job_id, "code": "WORKER_FAILED",
                    "message": f"worker {run.worker_id} on {run.pool_id} failed mid-stream: "
                               f"{type(exc).__name__}", "retriable": True})
        finally:
            if run.exchange is not None:  # a no-op unless the runner never read the answer
                run.exchange.close()
            self.registry.give_back(run.pool_id, run.worker_id)
            if not any(r.pool_id == run.pool_id and r.worker_id == run.worker_id
                       for r in self.runs.values() if r is not run):
                self.idle_since[(run.pool_id, run.worker_id)] = time.monotonic()
            if self.runs.get(run.job_id) is run:
                self.runs.pop(run.job_id, None)
            self.changed()

    async def _stream(self, run: Run, body: dict[str, Any]) -> None:
        channel = self._channel(run.job_id)
        exchange = run.exchange = run.exchange or self._execute(run, body)
        async with exchange as answer:
            if not await self._written(run):
                return
            if answer.status != 200:
                raw = await answer.read()
                try:
                    code = json.loads(raw)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = f"HTTP_{answer.status}"
                if code in RETRIABLE_WORKER_CODES or answer.status >= 500:
                    raise WorkerFailedBeforeTokenError(f"worker answered {code}")
                run.final = True
                await self._finish(run, "failed", code, {
                    "job_id": run.job_id, "code": code,
                    "message": f"the worker refused the job: {raw[:300]!r}",
                    "retriable": False})
                return
            async for event, data in answer.events():
                if run.final:
                    return
                await self._on_worker_event(run, channel, event, data)
            if not run.final:
                raise UpstreamError("the worker's stream ended without end/error")

    def _execute(self, run: Run, body: dict[str, Any]) -> Exchange:
        return self._upstream.post(f"{run.uri}/v2/execute", body, self._auth())

    async def _on_worker_event(self, run: Run, channel: Channel, event: str,
                               data: dict[str, Any]) -> None:
        if event == "started":
            # written with the first token (or the end): one durable write, not two, before
            # the first token can be announced
            run.started = data
        elif event == "token":
            run.tokens += 1
            if run.tokens == 1:  # durable before announced: a restart must know we produced
                await self._mark_running(run, channel, [("token", data)])
                if run.final:
                    return
                channel.publish("token", data, persisted=True)
                self.metrics.first_token(run)
            else:
                channel.publish("token", data, persisted=False)
                self.metrics.token(run)
        elif event == "metrics":
            channel.publish("metrics", data, persisted=False)
        elif event == "end":
            run.final = True
            await self._mark_running(run, channel, [])
            await self._finish(run, "completed", None, data)
        elif event == "error":
            code = str(data.get("code", "WORKER_ERROR"))
            if run.tokens == 0 and code in RETRIABLE_WORKER_CODES:
                raise WorkerFailedBeforeTokenError(f"worker error {code}")
            run.final = True
            await self._mark_running(run, channel, [])
            await self._finish(run, "failed", code, data)

    async def _mark_running(self, run: Run, channel: Channel,
                            more: list[tuple[str, dict[str, Any]]]) -> None:
        """Write ``running`` with the worker's ``started`` event (and ``more``), then
        announce them; a no-op once done."""
        if run.started is None:
            if more:
                await self.store.append_events_async(run.job_id,
                                                     [*channel.take_unpersisted(), *more])
            return
        started, run.started = run.started, None
        await self.store.transition_async(
            run.job_id, "running",
            events=[*channel.take_unpersisted(), ("started", started), *more])
        channel.publish("started", started, persisted=True)

    async def _finish(self, run: Run, status: str, code: str | None,
                      data: dict[str, Any]) -> None:
        channel = self._channel(run.job_id)
        terminal = "end" if status == "completed" else "error"
        fields: dict[str, Any] = {}
        if status == "completed":
            fields = {"tokens_in": data.get("tokens_in"), "tokens_out": data.get("tokens_out"),
                      "ttft_ms": data.get("ttft_ms"), "stop_reason": data.get("stop_reason")}
            fields = {k: v for k, v in fields.items() if v is not None}
            if data.get("decode_ms") and data.get("tokens_out"):
                seconds = float(data["decode_ms"]) / 1000
                self.job_seconds = 0.8 * self.job_seconds + 0.2 * seconds
        elif code is not None:
            fields = {"error_code": code, "error_message": str(data.get("message", ""))[:1000]}
        data = {**data, "job_id": run.job_id}
        pending = channel.take_unpersisted()
        try:
            await self.store.transition_async(run.job_id, status,
                                              events=[*pending, (terminal, data)], **fields)
        except RbeesError as exc:
            self.log.error("finish_failed", job_id=run.job_id, error=exc.message)
        channel.publish(terminal, data, persisted=True)
        self.metrics.finished.labels(outcome=status).inc()
        self._retire(run.job_id)

    async def _retry(self, run: Run, why: str) -> None:
        if run.final:
            return
        record = await asyncio.to_thread(self.store.get, run.job_id)
        self.log.warning("dispatch_failed", job_id=run.job_id, pool_id=run.pool_id,
                         worker_id=run.worker_id, retry=record.retry_count + 1, error=why)
        if record.retry_count >= MAX_RETRIES:
            run.final = True
            await self._finish(run, "failed", "WORKER_FAILED", {
                "job_id": run.job_id, "code": "WORKER_FAILED", "retriable": True,
                "message": f"gave up after {MAX_RETRIES} retries: {why}"})
            return
        # the worker is suspect until the pool's next report says otherwise
        entry = self.registry.pools.get(run.pool_id)
        if entry is not None and run.worker_id in entry.workers:
            entry.workers[run.worker_id]["state"] = "suspect"
        await self.store.transition_async(run.job_id, "queued")
        self.runs.pop(run.job_id, None)
        run.final = True
        await asyncio.sleep(RETRY_BACKOFF_S[min(record.retry_count, len(RETRY_BACKOFF_S) - 1)])
        spec = await asyncio.to_thread(self.store.spec, run.job_id)
        self.queue.push(run.job_id, spec.priority, model=spec.model, seq=run.queue_seq,
                        placement=spec.placement, since=run.created_at, force=True)
        self.changed()

    # -- background ------------------------------------------------------------------------

    async def _flush(self) -> None:
        self.metrics.settle()
        dirty = list(self.dirty)  # the set stays the one every channel holds
        self.dirty.clear()
        writes = {channel.job_id: self.store.append_events_async(channel.job_id, pending)
                  for channel in dirty if (pending := channel.take_unpersisted())}
        # submitted together, they are committed together: one transaction per flush
        outcomes = await asyncio.gather(*writes.values(), return_exceptions=True)
        for job_id, outcome in zip(writes, outcomes, strict=True):
            if isinstance(outcome, RbeesError):
                self.log.warning("flush_failed", job_id=job_id, error=outcome.message)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self._flush()

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for key, since in list(self.idle_since.items()):
                if key in self.started_by_us and now - since > self.settings.idle_timeout_s:
                    self.idle_since.pop(key, None)
                    self.started_by_us.discard(key)
                    await self._stop_worker(*key)


__all__ = ["ConflictError", "InvalidParamsError", "OrcdSettings", "OrchestratorService"]


class _Pools:
    """The pools' snapshot for a policy, taken on first use: with 1,000 pools it costs
    1-2 ms, and most jobs are answered by the verdict of one alike (:meth:`_decide`)."""

    def __init__(self, registry: PoolRegistry) -> None:
        self.registry = registry
        self.taken: list[dict[str, Any]] | None = None

    def get(self) -> list[dict[str, Any]]:
        if self.taken is None:
            self.taken = self.registry.snapshot_pools()
        return self.taken


def _shape(workers: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What of a pool's workers a policy cares about (not health timestamps)."""
    return sorted((w, v.get("state"), v.get("model_ref"), v.get("slots_total"))
                  for w, v in workers.items())
