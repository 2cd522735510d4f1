"""rbees-orcd's service: the one object its routes talk to. One event loop.

Flow of a job: :meth:`OrchestratorService.submit` (durable, then 202; :mod:`.admission`)
-> the dispatcher asks the scheduler for the head of the queue (:mod:`.dispatcher`) ->
``dispatched`` (durable, then announced) -> a runner streams the worker's SSE, announcing
each token at once and writing tokens in batches (:mod:`.runner`) -> ``end``/``error``
written with the final transition, then announced. Pools report by heartbeat and are
driven by :mod:`.pool_control`. The state these parts share is one :class:`Book`.

The routes use only this facade: jobs (``submit``, ``cancel``, ``follow``, ``job``,
``jobs``, ``decision``), pools (``heartbeat``, ``pools``, ``call_pool``, ...), models and
metrics. Its parts are public attributes for tests and tools, not for routes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pluggy

from rbees_core import plugins
from rbees_core.api.orchestrator import JobList, JobRecord, TaskAccepted, TaskRequest
from rbees_core.api.pool import PoolHeartbeat
from rbees_core.auth import current_principal, visible_to
from rbees_core.config import PlacementConfig
from rbees_core.durations import parse_keep_alive
from rbees_core.errors import (
    ConflictError,
    InvalidParamsError,
    ModelNotFoundError,
    RbeesError,
    TransportError,
    UnavailableError,
)
from rbees_core.feasibility import source_can_provide
from rbees_core.log import Logger
from rbees_core.orchestrator.admission import Admission
from rbees_core.orchestrator.book import Book, Following, retrieved
from rbees_core.orchestrator.channel import Channel, Deliver
from rbees_core.orchestrator.decisions import Retention, recorded, replay_job
from rbees_core.orchestrator.dispatcher import Dispatcher
from rbees_core.orchestrator.downloads import Downloads
from rbees_core.orchestrator.errors import JobNotFoundError
from rbees_core.orchestrator.keys import KeyRing, UsageCollector
from rbees_core.orchestrator.metrics import OrchestratorMetrics
from rbees_core.orchestrator.pool_control import PoolControl
from rbees_core.orchestrator.queue import JobQueue
from rbees_core.orchestrator.recovery import BackedOffScheduler, Recovery
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.orchestrator.runner import Runner
from rbees_core.orchestrator.store import Store
from rbees_core.orchestrator.upstream import Upstream
from rbees_core.tls import client_context

WORKER_READ_TIMEOUT_S = 120.0


@attrs.define
class OrcdSettings:
    db_path: str
    capacity: int = 1024
    policy: str = "reject"
    promote_after_s: float = 300.0
    heartbeat_interval_s: float = 5.0
    #: missed heartbeats after which a pool is unavailable; silence after which offline
    heartbeat_grace: int = 3
    offline_after_s: float = 60.0
    idle_timeout_s: float = 300.0
    #: seconds an idle worker stays loaded when its latest job gave no keep_alive
    #: (math.inf: forever); None: ``idle_timeout_s``
    keep_alive_s: float | None = None
    #: an OpenAI request's job not started after this long ends DEADLINE_UNMET (503)
    max_queue_wait_s: float = 600.0
    scheduler: str = "least-loaded"
    scheduler_script: str | None = None
    token: str | None = None
    default_ctx_slots: int = 1
    #: seconds of silence after which a stream (/v1, /v2/tasks/{id}/events) gets a
    #: ``: ping`` comment frame; 0: never
    sse_ping_interval_s: float = 15.0
    #: ``[placement]``: slots, context and cores of the workers this process starts
    placement: PlacementConfig = attrs.field(factory=PlacementConfig)
    #: how long a decision's snapshot is kept (replay); None: forever
    decision_retention_s: float | None = 7 * 86400.0


class OrchestratorService:
    """rbees-orcd's job and pool handling behind its HTTP API (CONTRACT section 5).

    Made by ``rbees-orcd`` (:func:`rbees_core.programs.orcd.run`) and by in-process tests;
    :meth:`start` recovers the store's jobs and starts the background loops, :meth:`close`
    ends them. Raises :class:`~rbees_core.errors.UnknownPluginError` when the configured
    scheduler is not installed and :class:`~rbees_core.orchestrator.errors.StoreError` when
    the database cannot be used.
    """

    def __init__(self, settings: OrcdSettings, pm: pluggy.PluginManager, log: Logger) -> None:
        self.settings = settings
        self.pm = pm
        self.log = log
        scheduler = plugins.lookup(pm, plugins.SCHEDULERS, settings.scheduler)
        from rbees_core.catalog import configured_catalog
        from rbees_core.config import SchedulerConfig

        self.store = Store(settings.db_path)
        self.store.keep_snapshots = settings.decision_retention_s != 0
        self.keys = KeyRing(self.store, settings.token)  # credentials: rbees_core.auth
        self.queue = JobQueue(capacity=settings.capacity, policy=settings.policy,  # type: ignore[arg-type]
                              promote_after_s=settings.promote_after_s)
        self.registry = PoolRegistry(heartbeat_interval_s=settings.heartbeat_interval_s,
                                     unavailable_after_missed=settings.heartbeat_grace,
                                     offline_after_s=settings.offline_after_s)
        self.registry.worker_ctx = settings.placement.ctx
        self.registry.interactive_slots = settings.placement.interactive_slots
        self.book = Book()
        self.metrics = OrchestratorMetrics(self.queue, self.registry, self.book.runs)
        self.metrics.registry.register(UsageCollector(self.keys))  # type: ignore[arg-type]
        self.scheduler = scheduler.from_config(SchedulerConfig(
            policy=settings.scheduler, script=settings.scheduler_script))
        own = self.scheduler.metrics()  # the policy's series (a script's failures)
        if own is not None:
            self.metrics.registry.register(own)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=WORKER_READ_TIMEOUT_S),
                                         verify=client_context())
        self._upstream = Upstream(connect_timeout=10.0, read_timeout=WORKER_READ_TIMEOUT_S)
        self.pools = PoolControl(self.book, self.registry, log, self._client,
                                 token=settings.token, idle_timeout_s=settings.idle_timeout_s,
                                 generations=self.keys.join_generations,
                                 worker_defaults=settings.placement.defaults(),
                                 keep_alive_s=settings.keep_alive_s,
                                 queued_models=lambda: {q.model for q in self.queue})
        self.runner = Runner(self.book, self.store, self.queue, self.registry, self.pools,
                             self.metrics, log, self._upstream, self._client,
                             token=settings.token, generations=self.keys.join_generations)
        catalog = configured_catalog(pm)  # read once: admission stays cheap
        sources = plugins.model_sources(pm)
        def provides(model: str) -> bool:
            return source_can_provide(model, catalog, sources)

        def size_of(model: str) -> int | None:
            entry = catalog.get(model)
            return None if entry is None else getattr(entry, "size_bytes", None)

        self.downloads = Downloads(self.book, self.queue, self.pools, log, provides=provides,
                                   size_of=size_of)
        self.recovery = Recovery(self.book, self.registry, log, metrics=self.metrics.registry)
        self.recovery.runner = self.runner
        self.pools.recovery = self.recovery
        self.dispatcher = Dispatcher(
            self.book, self.store, self.queue, self.registry,
            BackedOffScheduler(self.scheduler, self.recovery), self.pools,
            self.runner, self.metrics, log, provides=provides,
            grace_s=settings.heartbeat_grace * settings.heartbeat_interval_s,
            downloads=self.downloads)
        self.admission = Admission(self.book, self.store, self.queue, self.registry,
                                   catalog, self.dispatcher, self.runner, self.metrics, log)
        self.dispatcher.estimate_ms = lambda: self.admission.predicted_start_ms(len(self.queue))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover the store's unfinished jobs (CONTRACT section 5's restart rule), then
        start dispatching, flushing and stopping idle workers."""
        recovery = await asyncio.to_thread(self.store.recover)
        book = self.book
        for job in recovery.queued:
            history = [(e.event_id, e.event, e.payload())
                       for e in self.store.events_after(job.job_id, 0)]
            channel = book.channels[job.job_id] = Channel(job.job_id, history, book.dirty)
            if not history:  # admitted, but its queued event had not been written yet
                channel.publish("queued", {"job_id": job.job_id, "queue_position": 0,
                                           "predicted_start_ms": 0}, persisted=False)
            self.queue.push(job.job_id, job.priority, model=job.model,
                            placement=job.placement, since=job.created_at, force=True,
                            embedding=job.embedding)
            keep = self.store.spec(job.job_id).params.get("keep_alive")
            if keep is not None:
                with contextlib.suppress(InvalidParamsError):
                    book.keep_alive[job.job_id] = parse_keep_alive(keep)
            if job.deadline_ms is not None:  # past already: the first round ends it
                self.dispatcher.deadlines.add(job.job_id,
                                              job.created_at + job.deadline_ms / 1000)
        self.log.info("recovered", queued=len(recovery.queued), requeued=len(recovery.requeued),
                      failed=len(recovery.failed), settled=len(recovery.settled))
        book.spawn(self.dispatcher.loop())
        book.spawn(self.runner.flush_loop())
        book.spawn(self.pools.idle_loop())
        book.spawn(self.recovery.loop())
        book.spawn(Retention(self.store.write_async, self.settings.decision_retention_s,
                             self.log).loop())

    async def close(self) -> None:
        """Stop every task and runner, write what is pending, close the connections and
        the store."""
        self.book.cancel_tasks()
        await asyncio.sleep(0)
        await self.runner.flush()
        await self._client.aclose()
        self._upstream.close()
        await asyncio.to_thread(self.scheduler.close)
        await asyncio.to_thread(self.store.close)

    # -- jobs ------------------------------------------------------------------------------

    async def submit(self, request: TaskRequest, *, refuse_unknown: bool = False
                     ) -> TaskAccepted:
        """Admit a job (``POST /v2/tasks``; the ``/v1`` routes with ``refuse_unknown``);
        see :meth:`Admission.submit`."""
        return await self.admission.submit(request, refuse_unknown=refuse_unknown)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job; False when it was already final. Raises
        :class:`~rbees_core.orchestrator.errors.JobNotFoundError`."""
        await self._visible(job_id)
        return await self.admission.cancel(job_id)

    async def _visible(self, job_id: str) -> JobRecord | None:
        """Raise ``JobNotFoundError`` when the request's principal may not see the job (an
        ``inference``-only key and another key's job: it looks absent, as nothing of it may
        leak); the record when it was read for that."""
        principal = current_principal.get()
        if principal is None or principal.sees_all_jobs:
            return None
        record = await asyncio.to_thread(self.store.get, job_id)
        if not visible_to(principal, record.owner):
            raise JobNotFoundError(f"no job {job_id}", details={"job_id": job_id})
        return record

    async def follow(self, job_id: str, after: int, *, deliver: Deliver | None = None
                     ) -> Following:
        """The job's events after event ``after``, then (while it runs here) its live ones:
        what ``GET /v2/tasks/{id}/events`` and the OpenAI endpoints relay. With ``deliver``
        every one of them is handed to it, in order, the live ones as they are published
        (the ``Following`` is then empty). Call :meth:`Following.close` when done. Raises
        :class:`~rbees_core.orchestrator.errors.JobNotFoundError` for an unknown job."""
        await self._visible(job_id)
        following = self.book.follow(job_id, after, deliver)
        if following is not None:
            return following
        # finished and retired: the store has everything
        events = await asyncio.to_thread(self.store.events_after, job_id, after)
        backlog = [(e.event_id, e.event, e.payload()) for e in events]
        if deliver is not None:
            for item in backlog:
                deliver(item)
            backlog = []
        return Following(backlog, None, True)

    async def cancels_on_disconnect(self, job_id: str) -> bool:
        """Whether the job asked to be cancelled when its events' client goes. Raises
        :class:`~rbees_core.orchestrator.errors.JobNotFoundError` for an unknown job."""
        await self._visible(job_id)
        admitted = self.book.admitted.get(job_id)
        if admitted is not None and job_id not in self.book.admitting:  # admitted here
            return admitted.cancel_on_disconnect  # no read on the way to the first token
        spec = await asyncio.to_thread(self.store.spec, job_id)
        return bool(spec.params.get("cancel_on_disconnect"))

    async def job(self, job_id: str) -> JobRecord:
        """One job's record (no prompt). Raises ``JobNotFoundError`` (also for another
        key's job when the request's key has only ``inference``)."""
        record = await self._visible(job_id)
        return record if record is not None else await asyncio.to_thread(self.store.get,
                                                                          job_id)

    async def jobs(self, status: str | None, *, limit: int, cursor: str | None) -> JobList:
        """A page of jobs, newest first; see :meth:`Store.list_jobs` (and what it raises).
        An ``inference``-only key's page holds its own jobs only."""
        principal = current_principal.get()
        owner = None if principal is None or principal.sees_all_jobs else principal.name
        return await asyncio.to_thread(self.store.list_jobs, status, limit=limit,
                                       cursor=cursor, owner=owner)

    async def decision(self, job_id: str) -> dict[str, Any]:
        """The scheduler's reasoning for a job (see :meth:`Dispatcher.why`) and ``owner``,
        the name of the key that submitted it."""
        record = await self.job(job_id)
        return {**await self.dispatcher.why(job_id), "owner": record.owner}

    async def recorded_decisions(self, *, since: float, until: float | None, limit: int,
                                 cursor: str | None) -> dict[str, Any]:
        """``GET /v2/decisions``: a page of decisions with their snapshots; see
        :func:`~rbees_core.orchestrator.decisions.recorded` (and what it raises)."""
        return await asyncio.to_thread(recorded, self.store.query, since=since, until=until,
                                       limit=limit, cursor=cursor)

    async def replay_job(self, job_id: str, policy: str | None) -> dict[str, Any]:
        """``GET /v2/tasks/{id}/replay``: the job's recorded decisions re-decided by the
        registered policy ``policy`` (:func:`~rbees_core.orchestrator.decisions.replay_job`,
        and what it raises); ``JobNotFoundError`` as :meth:`job`."""
        await self.job(job_id)
        return await asyncio.to_thread(replay_job, self.store.query, self.pm, job_id, policy)

    # -- pools -----------------------------------------------------------------------------

    def heartbeat(self, beat: PoolHeartbeat) -> None:
        """A pool's heartbeat (the first registers it)."""
        self.pools.heartbeat(beat)

    def deregister(self, pool_id: str) -> bool:
        """Forget a pool; False when it was not registered."""
        return self.pools.deregister(pool_id)

    def drain_pool(self, pool_id: str) -> None:
        """Place no more jobs on a pool. Raises :class:`NotFoundError`."""
        self.pools.drain(pool_id)

    def pool_records(self) -> list[dict[str, Any]]:
        """Every registered pool as ``GET /v2/pools`` shows it."""
        return [self.registry.record(entry) for entry in self.registry]

    def pool_record(self, pool_id: str) -> dict[str, Any]:
        """One pool as ``GET /v2/pools/{id}`` shows it. Raises :class:`NotFoundError`."""
        return self.registry.record(self.pools.entry(pool_id))

    def pool_url(self, pool_id: str) -> str:
        """Where a pool's API answers. Raises :class:`NotFoundError`, and
        :class:`ConflictError` for a pool that registered no URL."""
        return self.pools.url(pool_id)

    async def call_pool(self, pool_id: str, method: str, path: str,
                        body: dict[str, Any] | None = None, *,
                        stream: bool = False) -> httpx.Response:
        """Forward an operator's call to a pool's API; see :meth:`PoolControl.call_pool`."""
        return await self.pools.call_pool(pool_id, method, path, body, stream=stream)

    async def retry_model(self, model: str, pool_id: str | None = None
                          ) -> list[dict[str, Any]]:
        """``POST /v2/models/retry``: clear a model's failed marks on the pools; see
        :meth:`PoolControl.retry_model`."""
        return await self.pools.retry_model(model, pool_id)

    async def pull(self, model: str) -> AsyncIterator[dict[str, Any]]:
        """Download ``model`` (a catalog id or a reference) to a pool, as an operator asks
        (Ollama's ``/api/pull``): its progress as ``{model, pool_id, bytes, total, stage}``
        (``download``, then ``verify`` while the pool hashes the file), the last one with
        ``done: True``. A model some pool holds is done at once; a download
        of it under way (pull on first use) is joined, never doubled; otherwise the pool
        pull on first use would pick (:func:`rbees_core.pulls.download_choice`) gets
        it, through the same :class:`Downloads`, so queued jobs for the model see its
        ``downloading`` events too. Raises, before the first item,
        :class:`ModelNotFoundError` (no source can download it) and
        :class:`UnavailableError` (no ready pool can take it, or its download failed
        within the last 30 s); later, :class:`RbeesError` with the pool's reason when the
        download fails."""
        from rbees_core.pulls import download_choice

        downloads = self.downloads
        if model in downloads.done or self.model_state(model) in ("downloaded", "loaded"):
            size = downloads.size_of(model) if downloads.size_of is not None else None
            yield {"model": model, "pool_id": None, "bytes": size, "total": size,
                   "done": True}
            return
        queue = downloads.watch(model)
        try:
            if model not in downloads.active:
                failed = downloads.failure(model)
                if failed is not None:
                    raise UnavailableError(failed)
                fields = downloads.job_fields(model)
                if not fields.get("downloadable"):
                    raise ModelNotFoundError(
                        f"model {model!r} is not in the catalog and no installed source can "
                        "download it", details={"model": model})
                pools = downloads.decorate(self.registry.snapshot_pools())
                pool_id, lost = download_choice({"model": model, **fields}, pools)
                if pool_id is None:
                    why = "; ".join(lost.values()) or "no pool is registered"
                    raise UnavailableError(f"no pool can download {model} now: {why}")
                downloads.start(pool_id, model)
            while True:
                kind, data = await queue.get()
                if kind == "failed":
                    raise RbeesError(str(data["message"]), details={"model": model})
                yield {**data, "done": kind == "done"}
                if kind == "done":
                    return
        finally:
            downloads.unwatch(model, queue)

    async def remove_model(self, model: str) -> list[str]:
        """Delete the downloaded copies of ``model`` (a catalog id or a reference) from
        every pool whose heartbeat shows it (Ollama's ``/api/delete``); the ids of those
        pools. Raises :class:`ModelNotFoundError` when no pool holds it, and
        :class:`ConflictError` with the pool's reason when a pool refuses (a worker has it
        loaded; a copy a package provides, which pip removes); a pool that cannot be
        reached raises its :class:`TransportError`."""
        from rbees_core.catalog import configured_catalog

        entry = configured_catalog(self.pm).get(model)
        names = {model} | ({entry.id, *entry.sources} if entry is not None else set())
        holders = [pool.pool_id for pool in self.registry
                   if any(m.get("id") in names or m.get("ref") in names
                          for m in pool.state.models)]
        if not holders:
            raise ModelNotFoundError(f"no pool holds model {model!r}",
                                     details={"model": model})
        for pool_id in holders:
            client = self.pools.client_of(pool_id)
            if client is None:
                raise ConflictError(f"pool {pool_id} registered no URL to delete {model} on")
            try:
                await client.models_remove(model)
            except (TransportError, ModelNotFoundError):
                raise
            except RbeesError as exc:  # the pool answered: it will not delete it
                raise ConflictError(f"pool {pool_id} did not delete {model}: {exc.message}",
                                    details={"model": model, "pool_id": pool_id}) from exc
        self.downloads.done.pop(model, None)
        return holders

    def worker_expiry(self, pool_id: str, worker_id: str) -> float:
        """When (wall clock, ``math.inf``: never) an idle worker stops if no job comes;
        see :meth:`KeepAlive.expires_at`. For Ollama's ``/api/ps``."""
        return self.pools.keepalive.expires_at((pool_id, worker_id))

    def worker_stopping(self, pool_id: str, worker_id: str) -> None:
        """A pool accepted to stop one of its workers: place nothing more on it."""
        self.pools.stopping(pool_id, worker_id)

    # -- models and metrics ----------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """``GET /v2/models``: the catalog's models (id, name, ``kind``: ``chat`` or
        ``embedding``), each with the pools that have it on disk (``downloaded``) and those
        with a live worker for it (``loaded``)."""
        from rbees_core.catalog import configured_catalog

        out = []
        for entry in configured_catalog(self.pm).entries:
            where: dict[str, list[str]] = {"downloaded": [], "loaded": []}
            for pool in self.registry:
                if any(entry.id in (m.get("id"), m.get("ref")) for m in pool.state.models):
                    where["downloaded"].append(pool.pool_id)
                if any(w.get("model_ref") in (entry.id, *entry.sources)
                       for w in pool.workers.values() if w.get("state") in ("ready", "busy")):
                    where["loaded"].append(pool.pool_id)
            out.append({"id": entry.id, "name": entry.name, "kind": entry.kind, **where})
        return out

    def model_states(self) -> dict[str, str]:
        """``GET /v1/models``: every model the cluster knows, by id, with what it can do now:
        ``loaded`` (a live worker serves it), ``downloaded`` (a pool holds it, no worker
        yet: the first job starts one) or ``not_on_any_pool`` (only in the catalog). A
        model a pool holds or serves under a reference of a catalog entry (its ``sources``)
        is listed under the entry's id; another reference under itself."""
        from rbees_core.catalog import configured_catalog

        rank = {"not_on_any_pool": 0, "downloaded": 1, "loaded": 2}
        states: dict[str, str] = {}
        catalog = configured_catalog(self.pm)

        def mark(ref: Any, state: str) -> None:
            if not ref:
                return
            entry = catalog.get(str(ref)) or catalog.by_source(str(ref))
            ident = entry.id if entry is not None else str(ref)
            if rank[state] > rank.get(states.get(ident, ""), -1):
                states[ident] = state

        for entry in catalog.entries:
            mark(entry.id, "not_on_any_pool")
        for pool in self.registry:
            for m in pool.state.models:
                mark(m.get("id") or m.get("ref"), "downloaded")
            for w in pool.workers.values():
                live = w.get("state") in ("ready", "busy")
                mark(w.get("model_ref"), "loaded" if live else "downloaded")
        return dict(sorted(states.items()))

    def model_state(self, ref: str) -> str | None:
        """``GET /v1/models/{id}``: the state (as :meth:`model_states`) of a catalog id or a
        model reference, a source of a catalog entry included; None for a model unknown."""
        from rbees_core.catalog import configured_catalog

        states = self.model_states()
        if ref in states:
            return states[ref]
        catalog = configured_catalog(self.pm)
        entry = catalog.get(ref) or catalog.by_source(ref)  # an alias, or a source
        return states.get(entry.id) if entry is not None else None

    def scrape(self) -> bytes:
        """The Prometheus exposition of ``GET /metrics``."""
        from prometheus_client import generate_latest

        self.metrics.settle()
        return generate_latest(self.metrics.registry)


__all__ = ["ConflictError", "Following", "InvalidParamsError", "OrcdSettings",
           "OrchestratorService", "retrieved"]
