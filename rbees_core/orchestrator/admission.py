"""Admission: a job in (submit), a failed admission undone (withdraw), a job out (cancel).

``submit`` makes a job durable with its ``queued`` event before it answers 202; at the head
of the queue, the job is also decided at once and its dispatch committed with its admission
(one write on the way to the first token), while the worker starts on it. A job dropped to
make room in a full queue is ended when the admission that dropped it commits, and put back
in its place when that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import attrs

from rbees_core.api.orchestrator import TaskAccepted, TaskRequest
from rbees_core.auth import current_principal
from rbees_core.durations import parse_keep_alive
from rbees_core.errors import (
    ConflictError,
    ForbiddenError,
    InvalidParamsError,
    ModelNotFoundError,
    RateLimitedError,
    RbeesError,
)
from rbees_core.log import Logger, correlation_id
from rbees_core.orchestrator.book import Admitted, Book, Run, retrieved
from rbees_core.orchestrator.channel import Channel
from rbees_core.orchestrator.dispatcher import DISPATCH_WINDOW, Dispatcher
from rbees_core.orchestrator.errors import QUEUE_FULL_DROPPED
from rbees_core.orchestrator.jobs import NewJob, execute_body, new_job
from rbees_core.orchestrator.metrics import OrchestratorMetrics
from rbees_core.orchestrator.queue import JobQueue, Pushed, QueuedJob
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.orchestrator.runner import Runner
from rbees_core.orchestrator.store import Store
from rbees_core.orchestrator.upstream import UpstreamError


class Admission:
    """Admits and cancels jobs. Created by the service, which forwards its ``submit`` and
    ``cancel`` here."""

    def __init__(self, book: Book, store: Store, queue: JobQueue, registry: PoolRegistry,
                 catalog: Any, dispatcher: Dispatcher, runner: Runner,
                 metrics: OrchestratorMetrics, log: Logger) -> None:
        self.book = book
        self.store = store
        self.queue = queue
        self.registry = registry
        self.catalog = catalog
        self.dispatcher = dispatcher
        self.runner = runner
        self.metrics = metrics
        self.log = log
        self._slots = (-1, 0)  # (version, ready worker slots), for predicted_start_ms

    def known_model(self, model: str) -> bool:
        """Whether the catalog names ``model``, a source can download it (an ``hf:``
        reference: pull on first use), or some pool holds or serves it."""
        if self.catalog.get(model) is not None:
            return True
        provides = self.dispatcher.provides
        if provides is not None and provides(model):
            return True
        for entry in self.registry:
            for w in entry.workers.values():
                if w.get("model_ref") == model:
                    return True
            for m in entry.state.models:
                if model in (m.get("ref"), m.get("id")):
                    return True
        return False

    def canonical(self, request: TaskRequest) -> TaskRequest:
        """``request`` with a catalog alias (``qwen2.5:7b``, an earlier id) replaced by its
        entry's id, which pools and workers know the model by. Raises
        :class:`InvalidParamsError` for a generation job on an embedding model (catalog
        ``kind = "embedding"``)."""
        entry = self.catalog.get(request.model)
        if entry is None:
            return request
        if getattr(entry, "kind", "chat") == "embedding" and not request.embedding:
            raise InvalidParamsError("model", f"{entry.id} is an embedding model: it "
                                     "serves embeddings (POST /v1/embeddings), not generation")
        return request if entry.id == request.model else attrs.evolve(request, model=entry.id)

    async def submit(self, request: TaskRequest, *, refuse_unknown: bool = False
                     ) -> TaskAccepted:
        """Admit a job; durable when it returns. Raises
        :class:`~rbees_core.orchestrator.errors.QueueFullError`, :class:`InvalidParamsError`
        (:meth:`canonical`) and what the store raises (the job is then withdrawn: nothing
        of it remains).

        A job for a model that no source knows and no pool holds is admitted like any
        other: the dispatcher ends it at once with ``NO_CAPACITY`` (reason
        ``unknown_model``), recorded and explained by its decision (``POST /v2/tasks``).
        With ``refuse_unknown`` (the ``/v1`` routes, whose clients expect OpenAI's answer
        at once and no job left behind) such a model is refused here instead with
        :class:`ModelNotFoundError` (404 ``model_not_found``)."""
        asked = request.model
        request = self.canonical(request)
        principal = current_principal.get()
        if principal is not None and not (principal.may_use_model(request.model)
                                          or principal.may_use_model(asked)):
            raise ForbiddenError(f"the key {principal.name!r} may not use model {asked!r}",
                                 details={"model": asked, "key": principal.name})
        if principal is not None and principal.max_jobs is not None \
                and self.store.active_jobs(principal.name) >= principal.max_jobs:
            raise RateLimitedError(f"key {principal.name!r} has {principal.max_jobs} jobs "
                                   "queued or running, its limit", retry_after_s=1)
        if principal is not None and principal.tpm is not None:
            now = time.time()
            used, first = self.store.tokens_since(principal.name, now - 60)
            if used >= principal.tpm:
                wait = max(1, math.ceil((first or now) + 60 - now))
                raise RateLimitedError(f"key {principal.name!r} used {used} tokens in the last "
                                       f"minute; its limit is {principal.tpm}",
                                       retry_after_s=wait)
        if refuse_unknown and not self.known_model(request.model):
            raise ModelNotFoundError(f"model {request.model!r} is not in the catalog and no "
                                     "pool has it", details={"model": request.model})
        book = self.book
        job = new_job(request, correlation_id=correlation_id.get(),
                      owner=None if principal is None else principal.name)
        book.admitted[job.job_id] = Admitted(execute_body(job), request.cancel_on_disconnect,
                                             job.correlation_id)
        if request.keep_alive is not None:
            book.keep_alive[job.job_id] = parse_keep_alive(request.keep_alive)
        pushed = self.queue.push(job.job_id, job.priority, model=job.model,
                                 placement=request.placement, embedding=request.embedding)
        if pushed.dropped is not None:
            book.dropping[pushed.dropped.job_id] = pushed.dropped
        if request.deadline_ms is not None:
            self.dispatcher.deadlines.add(job.job_id,
                                          pushed.job.since + request.deadline_ms / 1000)
        # the dispatcher leaves the job alone until it is durable with its `queued` event
        # (event 1, in the same transaction), so that `dispatched` can only follow it
        book.admitting.add(job.job_id)
        book.channels[job.job_id] = Channel(job.job_id, dirty=book.dirty)
        position = pushed.position
        queued = {"job_id": job.job_id, "queue_position": position,
                  "predicted_start_ms": self.predicted_start_ms(position)}
        # At the head of the queue, the job is decided now: placed at once, its dispatch is
        # committed with its admission, one write and no dispatcher round on the way to
        # its first token; and the worker starts on it while that write is made.
        run = self.dispatcher.place_now(job.job_id) if position == 0 else None
        if run is not None:
            run.written = asyncio.get_running_loop().create_future()
            with contextlib.suppress(UpstreamError):  # else the runner meets it again
                run.exchange = self.runner.execute(run, book.admitted[job.job_id].body)
                run.exchange.send_now()  # on an open connection: before the runner starts
            self.runner.start(run)
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
        admission = book.spawn(self._admit(job, queued, pushed, run, write))
        admission.add_done_callback(retrieved)  # also when nobody waits for it any more
        return await asyncio.shield(admission)

    def _withdraw(self, job_id: str, run: Run | None, dropped: QueuedJob | None) -> None:
        """Undo what :meth:`submit` prepared for a job whose admission failed; the job it
        dropped to make room, unless cancelled meanwhile, goes back to its place."""
        book = self.book
        book.admitting.discard(job_id)
        self.queue.remove(job_id)
        # never durable: neither put back nor ended, when a later admission dropped it too
        book.dropping.pop(job_id, None)
        if dropped is not None and book.dropping.pop(dropped.job_id, None) is not None:
            self.queue.push(dropped.job_id, dropped.priority, model=dropped.model,
                            placement=dropped.placement, seq=dropped.seq, since=dropped.since,
                            force=True, embedding=dropped.embedding)
            book.wake()  # it may be the head again
        if run is not None and run.written is not None:
            run.written.set_result(False)  # its runner gives the slot back
            if run.exchange is not None:
                run.exchange.close()  # the worker drops the job now
        book.channels.pop(job_id, None)
        book.admitted.pop(job_id, None)

    async def _admit(self, job: NewJob, queued: dict[str, Any], pushed: Pushed,
                     run: Run | None, write: asyncio.Future[Any]) -> TaskAccepted:
        """Await the admission's ``write`` that :meth:`submit` queued, then announce the job
        (or withdraw it)."""
        try:
            await write
        except BaseException:
            self._withdraw(job.job_id, run, pushed.dropped)
            raise
        book = self.book
        book.admitting.discard(job.job_id)
        book.channels[job.job_id].publish("queued", queued, persisted=True)
        self.metrics.admitted.inc()
        if run is not None and run.written is not None:
            self.dispatcher.announce(run)
            run.written.set_result(True)
        if pushed.dropped is not None and \
                book.dropping.pop(pushed.dropped.job_id, None) is not None:
            try:
                await self._end_queued(pushed.dropped.job_id, "failed", QUEUE_FULL_DROPPED,
                                       "dropped to make room: the queue was full")
            except RbeesError as exc:  # this job is admitted all the same
                self.log.error("drop_failed", job_id=pushed.dropped.job_id, error=repr(exc))
        position = pushed.position
        if position < DISPATCH_WINDOW:  # further back, it waits for those ahead of it
            book.wake()
        return TaskAccepted(job_id=job.job_id, status="queued", queue_position=position,
                            predicted_start_ms=queued["predicted_start_ms"],
                            events_url=f"/v2/tasks/{job.job_id}/events")

    def predicted_start_ms(self, position: int) -> int:
        """When a job at ``position`` in the queue may start, from the ready slots and the
        jobs' moving duration."""
        version, slots = self._slots
        if version != self.book.version:  # counted again only when the pools have changed
            slots = sum(max(1, int(w.get("slots_total") or 1)) for e in self.registry
                        for w in e.workers.values() if w.get("state") in ("ready", "busy"))
            self._slots = (self.book.version, slots)
        return int(position * self.book.job_seconds * 1000 / max(1, slots))

    async def _end_queued(self, job_id: str, status: str, code: str, message: str) -> None:
        await self.dispatcher.end_queued(job_id, status, code, message)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job; returns False when it was already final. No token after this.
        Raises :class:`~rbees_core.orchestrator.errors.JobNotFoundError`."""
        record = await asyncio.to_thread(self.store.get, job_id)
        if record.status in ("completed", "failed", "cancelled"):
            return False
        book = self.book
        dropping = book.dropping.pop(job_id, None) is not None  # not put back, not dropped
        if self.queue.remove(job_id) is not None or dropping or record.status == "queued":
            try:
                await self._end_queued(job_id, "cancelled", "CANCELLED",
                                       "cancelled by request")
            except ConflictError:  # ended while its record was read (dropped, say)
                return False
            return True
        run = book.runs.get(job_id)
        if run is None or run.final:
            return False
        await self.runner.cancel(run)
        return True
