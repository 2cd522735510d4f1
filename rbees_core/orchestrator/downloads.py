"""Pull on first use: rbees-orcd's downloads of models no pool holds.

A policy that finds no pool holding a job's model, which a source can download (the
snapshot's ``job.downloadable``), decides ``download`` (:mod:`rbees_core.scheduling`); the
dispatcher hands it to :meth:`Downloads.start`, which asks that pool for it
(pool-managerd's ``POST /v2/models/download``, SSE progress). One download per model: a
second decision for a model already downloading is ignored. While it runs, every queued
job for the model gets ``downloading`` events (``{model, pool_id, bytes, total}``, at most
:data:`PROGRESS_EVERY_S` apart), and the snapshot shows it as the pool's ``downloading``
(:meth:`Downloads.decorate`), so that policies wait for it and ``why`` says how far it is.
Once done, the pool holds the model (added to the snapshot until its heartbeat shows it)
and the normal path starts a worker. A failed download ends the jobs waiting for it with
``MODEL_DOWNLOAD_FAILED`` (retriable), and new jobs for that model end so too for
:data:`FAILED_HOLD_S`: no download is retried in a tight loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from rbees_core.api.pool import DownloadProgress
from rbees_core.errors import RbeesError
from rbees_core.log import Logger
from rbees_core.orchestrator.book import Book
from rbees_core.orchestrator.pool_control import PoolControl
from rbees_core.orchestrator.queue import JobQueue
from rbees_core.pulls import describe_download

#: the error code of jobs whose model's download failed
MODEL_DOWNLOAD_FAILED = "MODEL_DOWNLOAD_FAILED"
#: a job's ``downloading`` events come at most this often (4/s)
PROGRESS_EVERY_S = 0.25
#: after a failed download, jobs for that model end at once for this long (no new download)
FAILED_HOLD_S = 30.0
#: a finished download counts as on the pool's disk for this long, until a heartbeat tells
DONE_HOLD_S = 30.0

#: ``end_queued(job_id, status, code, message, extra=...)`` of the dispatcher
EndQueued = Callable[..., Awaitable[None]]


@attrs.define
class Download:
    """One model being downloaded to one pool."""

    model: str
    pool_id: str
    bytes: int = 0
    total: int | None = None
    started: float = attrs.field(factory=time.monotonic)
    published: float = 0.0
    #: the pool's stage: ``download`` while bytes arrive, ``verify`` while it hashes them
    stage: str = "download"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "pool_id": self.pool_id, "bytes": self.bytes,
                "total": self.total}


class Downloads:
    """rbees-orcd's downloads. Created by the service; the dispatcher calls :meth:`start`
    (a ``download`` decision), :meth:`decorate` (its snapshots), :meth:`job_fields`,
    :meth:`failure` and :meth:`describe` (``why``)."""

    def __init__(self, book: Book, queue: JobQueue, pools: PoolControl, log: Logger, *,
                 provides: Callable[[str], bool] | None = None,
                 size_of: Callable[[str], int | None] | None = None) -> None:
        self.book = book
        self.queue = queue
        self.pools = pools
        self.log = log
        self.provides = provides
        self.size_of = size_of
        #: set by the dispatcher: ends a queued job (its ``end_queued``)
        self.end_queued: EndQueued | None = None
        #: model -> the download in progress (one per model, whatever the pool)
        self.active: dict[str, Download] = {}
        #: model -> (monotonic time, message) of its last failed download
        self.failed: dict[str, tuple[float, str]] = {}
        #: model -> (pool_id, model entry, monotonic time) of a finished download
        self.done: dict[str, tuple[str, dict[str, Any], float]] = {}
        self._provided: dict[str, bool] = {}
        #: downloads asked of pools since start (tests and metrics read it)
        self.count = 0
        #: model -> the queues of those who follow its download (:meth:`watch`)
        self.watchers: dict[str, list[asyncio.Queue[tuple[str, dict[str, Any]]]]] = {}

    # -- what the dispatcher reads ---------------------------------------------------------

    def job_fields(self, model: str) -> dict[str, Any]:
        """The snapshot ``job`` fields of pull on first use: ``downloadable`` (a source can
        download ``model``) and ``download_bytes`` (its size, when the catalog knows)."""
        if self.provides is None:
            return {}
        known = self._provided.get(model)
        if known is None:
            known = self._provided[model] = bool(self.provides(model))
        if not known:
            return {}
        size = self.size_of(model) if self.size_of is not None else None
        return {"downloadable": True, **({"download_bytes": size} if size else {})}

    def decorate(self, pools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add downloads in progress (a pool's ``downloading``) and finished ones not yet in
        a heartbeat (its ``models``) to snapshot pools (changed in place; returned)."""
        if not self.active and not self.done:
            return pools
        now = time.monotonic()
        for model, (_, _, at) in list(self.done.items()):
            if now - at > DONE_HOLD_S:
                del self.done[model]
        by_id = {p.get("pool_id"): p for p in pools}
        for d in self.active.values():
            pool = by_id.get(d.pool_id)
            if pool is not None:
                pool.setdefault("downloading", []).append(
                    {"model": d.model, "bytes": d.bytes, "total": d.total})
        for model, (pool_id, entry, _) in self.done.items():
            pool = by_id.get(pool_id)
            if pool is None:
                continue
            models = pool.setdefault("models", [])
            if not any((isinstance(m, dict) and model in (m.get("id"), m.get("ref")))
                       or m == model for m in models):
                models.append(entry)
        return pools

    def failure(self, model: str) -> str | None:
        """The message of the model's download that failed within FAILED_HOLD_S, else
        None: a job for it ends with it rather than ask for another download."""
        failed = self.failed.get(model)
        if failed is None:
            return None
        if time.monotonic() - failed[0] > FAILED_HOLD_S:
            del self.failed[model]
            return None
        return failed[1]

    def describe(self, model: str) -> str | None:
        """``downloading X to pool P (n of m bytes)``, while it downloads."""
        d = self.active.get(model)
        if d is None:
            return None
        return describe_download(model, d.pool_id, d.to_dict())

    # -- following it ---------------------------------------------------------------------

    def watch(self, model: str) -> asyncio.Queue[tuple[str, dict[str, Any]]]:
        """A queue that gets the model's download as it goes: ``("progress", {model,
        pool_id, bytes, total, stage})`` (as often as the jobs' ``downloading`` events;
        ``stage``: ``download``, then ``verify`` while the pool hashes the file), then
        ``("done", {model, pool_id, bytes, total, id, ref})`` or ``("failed", {message})``.
        Called by the service's :meth:`pull` before it starts or joins the download; give
        the queue back with :meth:`unwatch`."""
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.watchers.setdefault(model, []).append(queue)
        return queue

    def unwatch(self, model: str, queue: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        """Stop following (see :meth:`watch`)."""
        queues = self.watchers.get(model, [])
        if queue in queues:
            queues.remove(queue)
        if not queues:
            self.watchers.pop(model, None)

    def _tell(self, model: str, kind: str, data: dict[str, Any]) -> None:
        for queue in self.watchers.get(model, ()):
            queue.put_nowait((kind, dict(data)))

    # -- doing it --------------------------------------------------------------------------

    def start(self, pool_id: str, model: str) -> None:
        """Ask ``pool_id`` to download ``model``, unless it downloads somewhere already or
        failed lately; a task of the book follows it."""
        if model in self.active or self.failure(model) is not None:
            return
        download = self.active[model] = Download(model=model, pool_id=pool_id,
                                                 total=self.size_of(model) if self.size_of
                                                 else None)
        self.count += 1
        self.log.info("model_download_requested", pool_id=pool_id, model=model)
        self.book.spawn(self._run(download))
        self.book.changed()

    async def _run(self, d: Download) -> None:
        try:
            client = self.pools.client_of(d.pool_id)
            if client is None:
                raise RbeesError(f"pool {d.pool_id} has no URL to download {d.model} to")
            done = await client.models_download(d.model, progress=lambda p: self._progress(d, p))
        except Exception as exc:  # the pool's refusal, a cut link, anything: it failed
            reason = exc.message if isinstance(exc, RbeesError) else repr(exc)
            message = f"downloading {d.model} to pool {d.pool_id} failed: {reason}"
            self.log.error("model_download_failed", pool_id=d.pool_id, model=d.model,
                           error=reason)
            self.failed[d.model] = (time.monotonic(), message)
            self.active.pop(d.model, None)
            self._tell(d.model, "failed", {"message": message})
            await self._fail_waiting(d.model, message)
            self.book.changed()
            return
        except BaseException:
            self.active.pop(d.model, None)
            self._tell(d.model, "failed", {"message": f"downloading {d.model} was cut short: "
                                                      "rbees-orcd is stopping"})
            raise
        self.active.pop(d.model, None)
        entry = {"id": done.id, "ref": done.ref, "size_bytes": done.size_bytes}
        if d.model not in (done.id, done.ref):  # tie the job's name to it
            entry["id"] = d.model if done.id is None else done.id
        self.done[d.model] = (d.pool_id, entry, time.monotonic())
        self.log.info("model_downloaded", pool_id=d.pool_id, model=d.model, ref=done.ref,
                      size_bytes=done.size_bytes, fetched=done.fetched,
                      seconds=round(time.monotonic() - d.started, 3))
        self._publish(d, force=True)
        self._tell(d.model, "done", {**d.to_dict(), "id": done.id, "ref": done.ref})
        self.book.changed()

    def _progress(self, d: Download, p: DownloadProgress) -> None:
        d.bytes = int(p.bytes_done)
        if p.bytes_total:
            d.total = int(p.bytes_total)
        force = p.stage != d.stage  # the first of a stage is never throttled away
        d.stage = p.stage
        self._publish(d, force=force)

    def _publish(self, d: Download, *, force: bool = False) -> None:
        """A ``downloading`` event to every queued job for the model (throttled)."""
        now = time.monotonic()
        if not force and now - d.published < PROGRESS_EVERY_S:
            return
        d.published = now
        data = d.to_dict()
        self._tell(d.model, "progress", {**data, "stage": d.stage})
        for queued in list(self.queue):
            if queued.model == d.model:
                self.book.channel(queued.job_id).publish("downloading", dict(data),
                                                         persisted=False)

    async def _fail_waiting(self, model: str, message: str) -> None:
        """End every queued job for ``model`` with MODEL_DOWNLOAD_FAILED."""
        if self.end_queued is None:
            return
        for queued in list(self.queue):
            if queued.model != model or self.queue.remove(queued.job_id) is None:
                continue
            try:
                await self.end_queued(queued.job_id, "failed", MODEL_DOWNLOAD_FAILED, message,
                                      extra={"retriable": True,
                                             "retry_after_ms": int(FAILED_HOLD_S * 1000)})
            except RbeesError:  # ended meanwhile (cancelled)
                continue
