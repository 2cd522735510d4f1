"""The jobs one rbees-orcd process is handling: the state its parts share, in one object.

:class:`Book` holds what admission (:mod:`.admission`), the dispatcher (:mod:`.dispatcher`),
the runners (:mod:`.runner`) and pool control (:mod:`.pool_control`) all read or change:
each job's event channel, the runs being streamed, the jobs admitted here and not ended,
and the *version* that says when what a policy reads has changed. Everything durable is in
the store; a restart rebuilds this from it. One event loop, no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import attrs

from rbees_core.log import correlation_id
from rbees_core.orchestrator.channel import Channel, Deliver, Event
from rbees_core.orchestrator.queue import QueuedJob
from rbees_core.orchestrator.upstream import Exchange

#: a finished job's channel is forgotten this long after its end (late readers use the store)
RETIRE_AFTER_S = 30.0


def retrieved(task: asyncio.Task[Any]) -> None:
    """Marks a task's outcome as seen (asyncio logs an error never retrieved otherwise)."""
    if not task.cancelled():
        task.exception()


def credential_for(token: str | None, pool_id: str, generation: int = 0) -> str | None:
    """The credential rbees-orcd sends to pool ``pool_id`` and its workers: the pool's
    control token, derived from the operator ``token`` and the pool's join-token
    ``generation`` (:class:`~rbees_core.orchestrator.keys.KeyRing`; None without a token)."""
    from rbees_core.auth import pool_control_token

    return None if token is None else pool_control_token(token, pool_id, generation)


def request_headers(token: str | None) -> dict[str, str]:
    """Headers of a request to a pool or a worker: the token, and the correlation id of
    the request being served (when there is one)."""
    headers = {"X-Correlation-Id": correlation_id.get()} \
        if correlation_id.get() != "-" else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


@attrs.frozen
class Admitted:
    """What this process keeps of a job that it admitted, until the job ends."""

    #: the worker's request (prompt included): no read of the store before the first token
    body: dict[str, Any]
    #: whether the job is cancelled when its events' client goes (the rest of the spec is
    #: in the store; this spares an events request a read)
    cancel_on_disconnect: bool
    #: the correlation id of the request that submitted it: the runner's lines and its
    #: request to the worker carry it, however late the job is dispatched
    correlation_id: str | None = None


@attrs.define(eq=False)
class Run:
    """A dispatched job being streamed from its worker."""

    job_id: str
    pool_id: str
    worker_id: str
    uri: str
    #: the job's model (the ``model`` label of its TTFT and time-per-token observations)
    model: str = ""
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

    async def is_written(self) -> bool:
        """Whether the job exists in the store: False when the admission that carried its
        dispatch failed, and the run must end without a trace."""
        return self.written is None or await asyncio.shield(self.written)


@attrs.define(eq=False)
class Following:
    """One reader's view of a job's events (:meth:`Book.follow`): those after the point
    it asked for, then the live ones from ``live`` until a terminal one. ``live`` is None
    when the job had ended and been retired: ``backlog`` is then all there is. Followed
    with a ``deliver``, both are empty: every event went, or goes, to ``deliver``."""

    backlog: list[Event]
    live: asyncio.Queue[Event] | None
    #: the last event of the backlog is terminal (or the job has ended): nothing follows
    done: bool
    channel: Channel | None = None
    deliver: Deliver | None = None

    def close(self) -> None:
        """Stop receiving live events. Idempotent; call it when the reader goes."""
        if self.channel is not None:
            if self.live is not None:
                self.channel.unsubscribe(self.live)
            if self.deliver is not None:
                self.channel.detach(self.deliver)


class Book:
    """The shared job state of one rbees-orcd process (see the module's docstring).

    Created by :class:`~rbees_core.orchestrator.service.OrchestratorService` and handed to
    each of its parts. ``spawn`` runs the background tasks of them all, so that ``close``
    can cancel every one.
    """

    def __init__(self) -> None:
        #: job id -> its event channel, from admission until a while after its end
        self.channels: dict[str, Channel] = {}
        #: channels with events not yet written (each channel adds itself)
        self.dirty: set[Channel] = set()
        #: job id -> its run, from the claim of a slot until the runner ends
        self.runs: dict[str, Run] = {}
        #: jobs admitted by this process and not yet ended
        self.admitted: dict[str, Admitted] = {}
        #: job id -> its keep_alive in seconds (math.inf: forever), for the jobs that gave
        #: one, until dispatched (the worker's keep-alive then: :mod:`.keepalive`)
        self.keep_alive: dict[str, float] = {}
        #: jobs whose admission is not durable yet: the dispatcher leaves them alone
        self.admitting: set[str] = set()
        #: jobs taken out of a full queue to make room for an admission not yet durable:
        #: ended when it commits, put back in their places when it fails
        self.dropping: dict[str, QueuedJob] = {}
        #: bumped whenever something a policy reads changes; a job that was told to wait at
        #: the current version is not asked about again (admission stays cheap when 10,000
        #: jobs wait for a model no pool has)
        self.version = 0
        self.version_bumped_at = time.monotonic()
        #: job id -> the version at which the policy told it to wait
        self.waited_at: dict[str, int] = {}
        #: job id -> its last recorded decision, to record a repeated one only once
        self.last_decision: dict[str, str] = {}
        #: moving estimate of a job's duration, for predicted_start_ms
        self.job_seconds = 2.0
        self.wakeup = asyncio.Event()
        #: set when a run starts: the loops that watch runs (recovery) wait for it while
        #: there is none, rather than waking to find none
        self.run_started = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of this process (cancelled by :meth:`cancel_tasks`)."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def cancel_tasks(self) -> None:
        """Cancel every background task and every runner (at shutdown)."""
        for task in list(self.tasks):
            task.cancel()
        for run in list(self.runs.values()):
            if run.task is not None:
                run.task.cancel()

    def wake(self) -> None:
        """Ask the dispatcher for a round soon."""
        self.wakeup.set()

    def changed(self) -> None:
        """What a policy reads has changed: waiting jobs are decided again."""
        self.version += 1
        self.version_bumped_at = time.monotonic()
        self.wakeup.set()

    def channel(self, job_id: str) -> Channel:
        """The job's channel, made when this process has none (a job from before a
        restart, say)."""
        channel = self.channels.get(job_id)
        if channel is None:
            channel = self.channels[job_id] = Channel(job_id, dirty=self.dirty)
        return channel

    def follow(self, job_id: str, after: int, deliver: Deliver | None = None
               ) -> Following | None:
        """The job's events after event ``after``, then its live ones (given to
        ``deliver`` as they come, when there is one: :meth:`Channel.attach`); None when
        this process has no channel for the job (ended and retired, or never here)."""
        channel = self.channels.get(job_id)
        if channel is None:
            return None
        if deliver is not None:
            channel.attach(after, deliver)
            return Following([], None, channel.done, channel, deliver)
        backlog, live = channel.subscribe(after)
        return Following(backlog, live, channel.done, channel)

    def retire(self, job_id: str) -> None:
        """Forget an ended job, and its channel a little later (late subscribers use the
        store)."""
        self.last_decision.pop(job_id, None)
        self.admitted.pop(job_id, None)
        self.waited_at.pop(job_id, None)
        self.keep_alive.pop(job_id, None)

        async def later() -> None:
            await asyncio.sleep(RETIRE_AFTER_S)
            channel = self.channels.get(job_id)
            if channel is not None and not channel.subscribers:
                self.channels.pop(job_id, None)
        self.spawn(later())
