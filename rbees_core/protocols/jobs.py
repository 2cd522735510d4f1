"""Jobs of a client protocol's request: the orchestrator facade, submit, follow, cancel, stream.

A protocol's route handler gets the facade with :func:`orchestrator`, submits the task
dict of its request with :func:`submit` (its jobs cancelled when the client goes), then
either collects the answer (:func:`collect`, with a :class:`~.chat.Turn` per job) or
streams it with a subclass of :class:`JobStream`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from rbees_core import sse
from rbees_core.api.orchestrator import TaskAccepted, TaskRequest
from rbees_core.errors import InvalidParamsError, RbeesError
from rbees_core.protocols.errors import from_invalid, from_rbees
from rbees_core.schema import from_mapping

if TYPE_CHECKING:
    import pluggy

#: A job's last event is one of these.
TERMINAL = frozenset({"end", "error"})
#: The event name of a ping on a stream's queue (no job event has it).
PINGED = ""
#: One job event as the facade hands it out: (event id, event name, data).
Event = tuple[int, str, dict[str, Any]]


class Following(Protocol):
    """One reader's view of a job's events: ``backlog``, then the ``live`` queue (None when
    the job has ended and ``backlog`` is all); ``close`` when done."""

    backlog: list[Event]
    live: asyncio.Queue[Event] | None

    def close(self) -> None: ...


class Settings(Protocol):
    """What protocols read of rbees-orcd's settings."""

    #: a protocol's job not started after this long ends ``DEADLINE_UNMET`` (503)
    max_queue_wait_s: float
    #: seconds of silence after which a stream gets a ping; 0: never
    sse_ping_interval_s: float


class Orchestrator(Protocol):
    """The part of rbees-orcd's service a protocol's routes may use (the object is
    ``request.app.state.orcd``; :func:`orchestrator` returns it typed as this)."""

    @property
    def settings(self) -> Settings: ...

    async def submit(self, request: TaskRequest, *, refuse_unknown: bool = False
                     ) -> TaskAccepted:
        """Admit a job. Raises :class:`~rbees_core.errors.RbeesError` (with
        ``refuse_unknown``: 404 for a model no pool holds and no source knows; 429 queue
        full, ...)."""

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job; False when it was already final."""

    async def follow(self, job_id: str, after: int, *,
                     deliver: Callable[[Event], object] | None = None) -> Following:
        """The job's events after event ``after``, then its live ones; with ``deliver``,
        each is given to it instead (in order, the live ones as they are published) and
        the ``Following`` is empty."""

    def models(self) -> list[dict[str, Any]]:
        """The models the cluster knows (the catalog's and the pools' on disk)."""

    def model_states(self) -> dict[str, str]:
        """Each model's state (``loaded``, ``on_disk``, ...) by id and reference."""

    @property
    def pm(self) -> pluggy.PluginManager:
        """rbees-orcd's plugin manager (its catalog: :func:`rbees_core.catalog.
        configured_catalog`; its model sources)."""

    def pool_records(self) -> list[dict[str, Any]]:
        """Every registered pool as ``GET /v2/pools`` shows it: its ``models`` (``id``,
        ``ref``, ``size_bytes``, ``sha256`` ...), its ``workers`` (``worker_id``,
        ``model_ref``, ``state``, ``device``, ``memory_bytes`` ...), ``registered_at``."""

    def pull(self, model: str) -> AsyncIterator[dict[str, Any]]:
        """Download a model to a pool (joining a download under way): its progress
        ``{model, pool_id, bytes, total, stage}``, the last with ``done: True``. Raises
        ``ModelNotFoundError``, ``UnavailableError`` before the first item, and
        ``RbeesError`` when the download fails."""

    async def remove_model(self, model: str) -> list[str]:
        """Delete a model's downloaded copies from every pool that holds it; their ids.
        Raises ``ModelNotFoundError`` (no pool holds it), ``ConflictError`` (a pool
        refused)."""

    def worker_expiry(self, pool_id: str, worker_id: str) -> float:
        """When (wall clock; ``math.inf``: never) an idle worker stops if no job comes."""


def orchestrator(request: Request) -> Orchestrator:
    """The orchestrator facade of the app serving ``request``."""
    orc: Orchestrator = request.app.state.orcd
    return orc


def job_task(orc: Orchestrator, task: dict[str, Any]) -> dict[str, Any]:
    """``task`` (a ``POST /v2/tasks`` body) as a protocol's job: the interactive lane,
    cancelled when its client goes, ended ``DEADLINE_UNMET`` (a 503) when not started after
    rbees-orcd's ``max_queue_wait_s``."""
    return {"priority": "interactive", "cancel_on_disconnect": True,
            "deadline_ms": round(orc.settings.max_queue_wait_s * 1000), **task}


async def submit(orc: Orchestrator, task: dict[str, Any], n: int = 1) -> list[str]:
    """Admit ``n`` jobs of ``task`` (with ``n`` > 1 the i-th gets seed + i); their ids.
    Raises :class:`RequestError`: 400 for a field :class:`TaskRequest` refuses (naming it),
    404 ``MODEL_NOT_FOUND`` for a model no pool holds and no source knows (as protocols'
    clients expect), and what else admission raised (the jobs admitted so far are then
    cancelled)."""
    job_ids: list[str] = []
    try:
        for i in range(n):
            body = dict(task)
            seed = body.get("seed")
            # one seed per choice; a seed that is no integer in range is left for
            # from_mapping to refuse with a 400 naming it
            if n > 1 and type(seed) is int and 0 <= seed < 2**63:
                body["seed"] = (seed + i) % 2**63
            req = from_mapping(TaskRequest, body)
            job_ids.append((await orc.submit(req, refuse_unknown=True)).job_id)
    except InvalidParamsError as exc:
        raise from_invalid(exc) from exc
    except RbeesError as exc:
        for job_id in job_ids:
            await orc.cancel(job_id)
        raise from_rbees(exc) from exc
    return job_ids


class Jobs:
    """Follows jobs' events and puts ``(index, event, data)`` on :attr:`queue` in arrival
    order (``index``: the job's place in ``job_ids``), until each job's terminal event."""

    def __init__(self, orc: Orchestrator, job_ids: Sequence[str]) -> None:
        self.orc = orc
        self.job_ids = list(job_ids)
        self.queue: asyncio.Queue[tuple[int, str, dict[str, Any]]] = asyncio.Queue()
        self.followings: list[Following | None] = [None] * len(self.job_ids)
        self.ended = [False] * len(self.job_ids)
        self.tasks = [asyncio.create_task(self._follow(i, j)) for i, j in enumerate(job_ids)]

    async def _follow(self, index: int, job_id: str) -> None:
        # the facade hands each event to the sink as it is published: no task between the
        # channel and self.queue: a task wake-up per token less (rbees-orcd 537 -> 474 us of
        # CPU per relayed token over 512-token streamed chats, mean of 4)
        following = await self.orc.follow(job_id, 0, deliver=self._sink(index))
        self.followings[index] = following
        if self.ended[index]:
            following.close()

    def _sink(self, index: int) -> Callable[[Event], None]:
        put = self.queue.put_nowait

        def deliver(item: Event) -> None:
            _, event, data = item
            if self.ended[index]:
                return
            put((index, event, data))
            if event in TERMINAL:
                self._stop(index)
        return deliver

    def _stop(self, index: int) -> None:
        self.ended[index] = True
        following = self.followings[index]
        if following is not None:
            following.close()

    async def cancel(self) -> None:
        """Stop following and cancel every job (those already final stay as they are)."""
        for task in self.tasks:
            task.cancel()
        for index in range(len(self.job_ids)):
            self._stop(index)
        for job_id in self.job_ids:
            with contextlib.suppress(RbeesError):
                await self.orc.cancel(job_id)


async def cancel_on_disconnect(request: Request, jobs: Jobs) -> None:
    """Run beside a non-streamed answer: when the client goes away, cancel its jobs, queued
    or running, and put a ``CANCELLED`` error for each on the queue so the handler waiting
    for them is let go. (A :class:`JobStream` watches for it itself.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    await jobs.cancel()
    for index in range(len(jobs.job_ids)):
        jobs.queue.put_nowait((index, "error", {"code": "CANCELLED",
                                                "message": "the client went away"}))


async def collect(request: Request, jobs: Jobs,
                  feed: Callable[[int, str, dict[str, Any]], object]) -> dict[str, Any] | None:
    """Wait for every job's terminal event, handing each event to ``feed(index, event,
    data)`` (e.g. a :class:`~.chat.Turn` per job); the jobs are cancelled if the client
    goes. Returns the first ``error`` event's data, or None when all ended."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, jobs))
    error: dict[str, Any] | None = None
    done = 0
    try:
        while done < len(jobs.job_ids):
            index, event, data = await jobs.queue.get()
            feed(index, event, data)
            if event in TERMINAL:
                done += 1
                if event == "error":
                    error = error or data
    finally:
        watcher.cancel()
    return error


class JobStream:
    """A streamed answer (an ASGI app) over :class:`Jobs`: :meth:`head`, then per job event
    :meth:`event`'s bytes, a :attr:`ping` after ``ping_s`` of silence, :meth:`tail` once
    every job ended. When the client goes away (or the socket fails) the jobs are cancelled.

    A protocol subclasses it and overrides :meth:`event` (and :meth:`head`, :meth:`tail`,
    :attr:`media_type`, :attr:`ping` as it needs: NDJSON has no comments, so ``None``)."""

    media_type = b"text/event-stream; charset=utf-8"
    ping: bytes | None = sse.PING

    def __init__(self, jobs: Jobs, *, ping_s: float = 15.0) -> None:
        self.jobs, self.ping_s = jobs, ping_s

    def head(self) -> bytes:
        """What is sent before any job event."""
        return b""

    def event(self, index: int, event: str, data: dict[str, Any]) -> bytes:
        """The bytes for job ``index``'s ``event`` (possibly none)."""
        raise NotImplementedError

    def tail(self) -> bytes:
        """What is sent after every job ended."""
        return b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", self.media_type),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        gone = asyncio.Event()
        cancel: Callable[[], Any] = self.jobs.cancel

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            await cancel()

        watcher = asyncio.create_task(watch())
        pinger = sse.Pinger(self.jobs.queue, (-1, PINGED, {}),
                            self.ping_s if self.ping is not None else 0)
        try:
            head = self.head()
            if head:
                await send({"type": "http.response.body", "body": head, "more_body": True})
            done = 0
            while done < len(self.jobs.job_ids) and not gone.is_set():
                index, event, data = await self.jobs.queue.get()
                if event == PINGED:
                    chunk = self.ping or b""
                else:
                    chunk = self.event(index, event, data)
                    done += event in TERMINAL
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    pinger.touch()
            if not gone.is_set():
                await send({"type": "http.response.body", "body": self.tail(),
                            "more_body": False})
        except OSError:
            await cancel()
        finally:
            pinger.close()
            watcher.cancel()


__all__ = ["PINGED", "TERMINAL", "Event", "Following", "JobStream", "Jobs", "Orchestrator",
           "Settings", "cancel_on_disconnect", "collect", "job_task", "orchestrator", "submit"]
