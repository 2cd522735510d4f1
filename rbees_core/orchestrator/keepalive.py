"""Keep-alive of workers: how long an idle worker stays loaded (Ollama's ``keep_alive``).

A job may say ``keep_alive`` (``POST /v2/tasks`` and the ``/v1`` endpoints): a duration
(``"5m"``, ``"30s"``, ``"1h30m"``, ``"250ms"``), a number of seconds, ``0`` (unload the
worker right after the job) or a negative value (``-1``, ``"-1m"``: keep it loaded until
something else stops it). The latest job dispatched to a worker sets its keep-alive; a job
that gives none gets rbees-orcd's default (``keep_alive`` in ``[orchestrator]``, else
``--keep-alive`` / ``RBEES_KEEP_ALIVE``, else ``--idle-timeout``).

Every worker that a pool's heartbeat shows is covered, whoever started it. What is kept is
in memory, derived again after a restart of rbees-orcd: a worker first seen idle by this
process counts as idle since then, with the default keep-alive (the keep-alive of jobs run
before the restart is not kept). A worker is never stopped while a job runs on it or is
dispatched to it (counted by this process) or its pool reports slots in use that no job of
this process explains (M0 jobs, another orchestrator), while it is not ``ready``/``busy``
(starting, loading, stopping, ...), or while a queued job waits for its model (it is about
to be used again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

#: how often idle workers are checked (``keep_alive: 0`` is acted on at once)
CHECK_EVERY_S = 0.2
#: how often while no worker is known at all (a dispatch wakes the check at once)
IDLE_CHECK_S = 1.0
#: how long after a job of this process ended a pool's report of the worker in use may be
#: that job's, seen late (heartbeats and the pool's health polls lag)
REPORT_LAG_S = 10.0

Key = tuple[str, str]


class KeepAlive:
    """Which idle workers to stop, and when. Made by :class:`PoolControl`; the dispatcher
    tells it each dispatch (:meth:`dispatched`), the runner each worker that ran out of
    jobs (:meth:`ended`); :meth:`loop` (a task of the book) stops the expired ones.

    ``workers`` lists, each time it is called, every worker known now as (pool_id, worker
    dict, jobs in flight there); ``waiting(pool_id, model_ref)`` says whether a queued job
    wants the model of a worker of that pool;
    ``stop`` stops one worker.
    """

    def __init__(self, default_s: float, *,
                 workers: Callable[[], Iterable[tuple[str, dict[str, Any], int]]],
                 waiting: Callable[[str, str], bool],
                 stop: Callable[[str, str], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default_s = default_s
        self.workers = workers
        self.waiting = waiting
        self.stop = stop
        self.clock = clock
        #: (pool_id, worker_id) -> since when (clock) it has had no job
        self.idle_since: dict[Key, float] = {}
        #: (pool_id, worker_id) -> the keep-alive its latest job set (None: the default)
        self.keep: dict[Key, float | None] = {}
        #: (pool_id, worker_id) -> when (clock) the last job this process sent there ended
        self.ended_at: dict[Key, float] = {}
        #: set when a worker with ``keep_alive: 0`` ran out of jobs, or a job was placed:
        #: :meth:`loop` looks now
        self._due = asyncio.Event()
        #: whether the last check saw any worker (none: it checks every IDLE_CHECK_S)
        self._seen_any = True

    def dispatched(self, key: Key, keep_s: float | None) -> None:
        """A job was placed on the worker: not idle; its keep-alive is the worker's now."""
        self.idle_since.pop(key, None)
        self.keep[key] = keep_s
        if not self._seen_any:
            self._due.set()

    def ended(self, key: Key) -> None:
        """The worker's last job ended: its idle time starts now (with ``keep_alive: 0``,
        :meth:`loop` stops it without waiting for its next check)."""
        self.idle_since[key] = self.ended_at[key] = self.clock()
        if self.keep.get(key) == 0:
            self._due.set()

    def last_used(self, key: Key) -> float | None:
        """When (wall clock) the worker was last used or first seen idle; None when in
        use or never seen idle."""
        since = self.idle_since.get(key)
        if since is None:
            return None
        return time.time() - (self.clock() - since)

    def expires_at(self, key: Key) -> float:
        """When (wall clock) the worker's keep-alive ends if no job comes: its idle time
        plus the keep-alive its latest job set (or the default); for a worker in use now,
        as if its jobs ended now; ``math.inf`` for one kept until something else stops it.
        Read by Ollama's ``/api/ps`` (the service's :meth:`worker_expiry`)."""
        now = self.clock()
        keep = self.keep.get(key)
        if keep is None:
            keep = self.default_s
        since = self.idle_since.get(key, now)
        return time.time() + (since + keep - now)

    def expired(self) -> list[Key]:
        """The workers to stop now; starts the idle time of workers seen for the first
        time idle, and forgets the workers gone."""
        now = self.clock()
        seen: set[Key] = set()
        out: list[Key] = []
        for pool_id, worker, in_flight in self.workers():
            key = (pool_id, str(worker.get("worker_id")))
            seen.add(key)
            # "busy" too: a pool's report lags the end of the jobs this process counts
            if in_flight or worker.get("state") not in ("ready", "busy") \
                    or worker.get("expected") or self._used_by_others(key, worker, now):
                self.idle_since.pop(key, None)
                continue
            since = self.idle_since.setdefault(key, now)
            keep = self.keep.get(key)
            if keep is None:
                keep = self.default_s
            if now - since >= keep and not self.waiting(pool_id, str(worker.get("model_ref"))):
                out.append(key)
        self._seen_any = bool(seen)
        for gone in [k for k in self.idle_since if k not in seen]:
            self.idle_since.pop(gone, None)
        for gone in [k for k in self.keep if k not in seen]:
            self.keep.pop(gone, None)
        for gone in [k for k in self.ended_at if k not in seen]:
            self.ended_at.pop(gone, None)
        return out

    def _used_by_others(self, key: Key, worker: dict[str, Any], now: float) -> bool:
        """Whether the pool reports slots of the worker in use that no job of this process
        explains: jobs of ``rbees jobs submit`` without a daemon (M0), another orchestrator,
        a client of the worker itself. Such a worker is not idle (stopping it cut an M0
        stream). A report within :data:`REPORT_LAG_S` of this process's last job there
        ending may be that job's, seen late: ``keep_alive: 0`` still stops at once."""
        total, free = worker.get("slots_total"), worker.get("slots_free")
        if not isinstance(total, int) or not isinstance(free, int) or free >= total:
            return False
        return now - self.ended_at.get(key, -REPORT_LAG_S) >= REPORT_LAG_S

    async def loop(self) -> None:
        """Stop each expired worker, checking every :data:`CHECK_EVERY_S` (every
        :data:`IDLE_CHECK_S` while no worker is known), and at once when a worker with
        ``keep_alive: 0`` ran out of jobs (:meth:`ended`)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._due.wait(),
                                       CHECK_EVERY_S if self._seen_any else IDLE_CHECK_S)
            self._due.clear()
            for key in self.expired():
                self.idle_since.pop(key, None)
                self.keep.pop(key, None)
                await self.stop(*key)
