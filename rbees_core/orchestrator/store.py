"""The orchestrator's durable state: jobs, their events and scheduling decisions, in SQLite.

Durability
----------
The database runs in WAL mode with ``synchronous=NORMAL`` by default: when a write method
returns, its transaction is committed to the write-ahead log, so it survives the death of
the process (SIGKILL, a crash). It is *not* guaranteed to survive a power cut or a kernel
crash: the last commits before one may roll back, and the database stays consistent.
``synchronous="FULL"`` adds an fsync to each commit, for durability against power loss at
a higher cost (group commit, below, shares one fsync among concurrent writers).

Threads
-------
A :class:`Store` is safe to use from any number of threads and from an asyncio loop.
Every write (:meth:`Store.admit`, :meth:`Store.transition`, :meth:`Store.append_events`,
:meth:`Store.record_decision`, :meth:`Store.recover`) is run by one writer thread that owns
the write connection. It takes all writes waiting at that moment, runs each in a savepoint
(a failing write does not disturb the others; consecutive admissions share one statement)
and commits them together: *group commit*. A write method blocks until its batch is
committed; the ``*_async`` variants await the same without holding a thread (the
operations, and the SQL, are in :mod:`rbees_core.orchestrator.store_writes`). Writes are
applied in the order they were submitted, so a transition submitted after an admit always
finds the job. WAL checkpoints run on a third thread (see
:mod:`rbees_core.orchestrator._writer`). Reads run on a connection per calling thread and
see every write whose method has returned; single-job reads take tens of microseconds and
may run on the event loop, a long replay is better sent to ``asyncio.to_thread``.

Events
------
Events follow CONTRACT section 3: per job, ``event_id`` counts from 1 and nothing may follow
an ``end`` or ``error`` event. ``token`` events keep ``tokens_out`` current, which is how
:meth:`Store.recover` knows whether a job produced tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from rbees_core.api.orchestrator import JOB_STATUSES, JobList, JobRecord
from rbees_core.errors import InvalidParamsError
from rbees_core.files import private_dir
from rbees_core.orchestrator._writer import Writer
from rbees_core.orchestrator.errors import JobNotFoundError, StoreError
from rbees_core.orchestrator.jobs import JobSpec, NewJob, Recovery, StoredEvent, event_pairs
from rbees_core.orchestrator.migrations import migrate
from rbees_core.orchestrator.store_writes import SELECT_JOB, SELECT_PAGE, Ops, record_of

T = TypeVar("T")
Synchronous = Literal["NORMAL", "FULL"]
DEFAULT_PAGE = 50
MAX_PAGE = 1000


class Store:
    """The orchestrator's SQLite database (one file; ``-wal`` and ``-shm`` beside it).

    Opening creates the file (mode 0600: it holds prompts) and applies pending migrations.
    Use it as a context manager or call :meth:`close`. ``clock`` gives the timestamps it
    records (Unix seconds). Raises :class:`StoreError` when the file cannot be used.
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: Synchronous = "NORMAL",
                 clock: Callable[[], float] = time.time, max_batch: int = 512) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self._clock = clock
        self._ops = Ops(clock)
        #: whether decisions keep their snapshot (``decision_retention = "0"``: not even
        #: encoded, for a cluster of hundreds of pools whose snapshots cost milliseconds)
        self.keep_snapshots = True
        self._lock = threading.Lock()
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        private_dir(self.path.parent)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: SQLite cannot use WAL here (journal_mode={mode})")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            # Well above the WAL's size when it restarts (RESTART_FRAMES pages, and the
            # commits of the second before): the restart, made by a commit on the loop, then
            # reuses the file instead of cutting it down first (1-2 ms, each time).
            conn.execute("PRAGMA journal_size_limit = 67108864")
            # Checkpoints (and their fsyncs) run on their own thread, off the commit path.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            migrate(conn)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{self.path}: cannot open the state database: {exc}") from exc
            raise
        # with FULL, a commit waits for an fsync: keep that off the caller's event loop
        self._writer = Writer(conn, self._connect, max_batch=max_batch,
                              inline=synchronous == "NORMAL")

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Finish the writes already submitted, then close every connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._writer.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes ----------------------------------------------------------------------------

    def admit(self, job: NewJob,
              events: Iterable[tuple[str, Mapping[str, Any]]] = ()) -> JobRecord:
        """Insert a new job as ``queued`` with its first ``events`` (ids from 1), in one
        transaction; durable when it returns.

        Raises :class:`JobExistsError` for a job id already used and
        :class:`InvalidParamsError` for an id that breaks the identifier rule.
        """
        return self._call(self._ops.admit_op(job, events))

    async def admit_async(
        self, job: NewJob, events: Iterable[tuple[str, Mapping[str, Any]]] = (), *,
        dispatched: tuple[str, str, Iterable[tuple[str, Mapping[str, Any]]]] | None = None,
    ) -> JobRecord:
        """:meth:`admit` for an asyncio loop: :meth:`admit_soon`, awaited."""
        return await self.admit_soon(job, events, dispatched=dispatched)

    def admit_soon(
        self, job: NewJob, events: Iterable[tuple[str, Mapping[str, Any]]] = (), *,
        dispatched: tuple[str, str, Iterable[tuple[str, Mapping[str, Any]]]] | None = None,
    ) -> asyncio.Future[JobRecord]:
        """Queue :meth:`admit` on the running loop now, ahead of every write queued after
        this call; the future resolves once it is committed. With ``dispatched=(pool_id,
        worker_id, events)`` the job is also moved to ``dispatched`` in the same
        transaction, as :meth:`transition` would; the record is then the dispatched one."""
        admit = self._ops.admit_op(job, events)
        if dispatched is None:
            return self._writer.submit_soon(admit)
        pool_id, worker_id, more = dispatched
        dispatch = self._ops.transition_op(job.job_id, "dispatched", more,
                                           {"pool_id": pool_id, "worker_id": worker_id})

        def both(conn: sqlite3.Connection) -> JobRecord:
            admit(conn)
            return dispatch(conn)

        return self._writer.submit_soon(both)

    def transition(self, job_id: str, status: str, *,
                   events: Iterable[tuple[str, Mapping[str, Any]]] = (),
                   **fields: Any) -> JobRecord:
        """Move a job to ``status``, set ``fields`` and append ``events``, in one transaction.

        The state machine is :data:`rbees_core.orchestrator.jobs.TRANSITIONS`. The store sets
        the timestamps: ``dispatched_at``, ``started_at``, ``finished_at`` (final states),
        and on a retry (``-> queued``) ``queued_at``, ``retry_count + 1`` and clears the
        dispatch fields. ``fields`` are among
        :data:`~rbees_core.orchestrator.jobs.TRANSITION_FIELDS`; ``dispatched`` needs
        ``pool_id`` and ``worker_id``, ``failed`` needs ``error_code``. ``events`` are
        appended after the change even when it is final (the terminal event goes here).
        Returns the updated record once committed. Raises :class:`JobNotFoundError`,
        :class:`InvalidTransitionError` (also for a retry of a job that produced tokens)
        and ValueError for bad ``fields``.
        """
        return self._call(self._ops.transition_op(job_id, status, events, fields))

    async def transition_async(self, job_id: str, status: str, *,
                               events: Iterable[tuple[str, Mapping[str, Any]]] = (),
                               **fields: Any) -> JobRecord:
        """:meth:`transition` for an asyncio loop."""
        return await self._writer.submit_async(
            self._ops.transition_op(job_id, status, events, fields))

    def append_events(self, job_id: str,
                      events: Iterable[tuple[str, Mapping[str, Any]]]) -> list[StoredEvent]:
        """Append ``[(event, data), ...]`` in one transaction; return them with their ids.

        Raises :class:`JobNotFoundError`, and :class:`InvalidTransitionError` when the job is
        final or an event would follow a terminal one.
        """
        return self._call(self._ops.append_op(job_id, event_pairs(events)))

    async def append_events_async(
        self, job_id: str, events: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> list[StoredEvent]:
        """:meth:`append_events` for an asyncio loop."""
        return await self._writer.submit_async(self._ops.append_op(job_id, event_pairs(events)))

    def record_decision(self, job_id: str, decision: Mapping[str, Any],
                        snapshot: Mapping[str, Any] | None = None) -> int:
        """Keep one scheduler decision (candidates, scores, rejections) and the snapshot it
        was made from (:mod:`rbees_core.orchestrator.decisions`: what replay re-decides;
        None for a decision no policy made); return its number.

        Raises :class:`JobNotFoundError`.
        """
        return self._call(self._ops.decision_op(
            job_id, decision, snapshot if self.keep_snapshots else None))

    async def record_decision_async(self, job_id: str, decision: Mapping[str, Any],
                                    snapshot: Mapping[str, Any] | None = None) -> int:
        """:meth:`record_decision` for an asyncio loop."""
        return await self._writer.submit_async(self._ops.decision_op(
            job_id, decision, snapshot if self.keep_snapshots else None))

    def recover(self) -> Recovery:
        """Apply CONTRACT section 5's restart rule; call once at start, before dispatching.

        Queued jobs stay queued in admission order. Dispatched or running jobs that produced
        no token are queued again with ``retry_count + 1``; those that produced tokens fail
        with ``ORCHESTRATOR_RESTARTED`` and get a terminal ``error`` event. An unfinished job
        whose terminal event is already stored is settled by that event instead.
        """
        return self._call(self._ops.recover_op)

    async def write_async(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` on the write connection in its own savepoint, committed with the
        writes beside it (for the tables other modules own: the batches of
        :mod:`rbees_core.orchestrator.batches`); returns its result once committed."""
        return await self._writer.submit_async(op)

    # -- reads -----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        """The job's record (no prompt); raises :class:`JobNotFoundError`."""
        row = self._read(SELECT_JOB + " WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id}", details={"job_id": job_id})
        return record_of(row)

    def spec(self, job_id: str) -> JobSpec:
        """What a worker needs to run the job, prompt included; never send it to clients."""
        row = self._read(
            "SELECT job_id, seq, model, priority, status, seed, params, prompt, messages, "
            "correlation_id FROM jobs WHERE job_id = ?", (job_id,),
        ).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id}", details={"job_id": job_id})
        jid, seq, model, priority, status, seed, params, prompt, messages, cid = row
        return JobSpec(job_id=jid, seq=seq, model=model, priority=priority, status=status,
                       seed=seed, params=json.loads(params), prompt=prompt,
                       messages=None if messages is None else json.loads(messages),
                       correlation_id=cid)

    def list_jobs(self, status: str | None = None, *, limit: int = DEFAULT_PAGE,
                  cursor: str | None = None, owner: str | None = None) -> JobList:
        """One page of jobs, newest first (``GET /v2/tasks``).

        ``status`` is one status or several separated by commas; ``limit`` is 1..1000;
        ``cursor`` is a previous page's ``next_cursor``; ``owner`` keeps one key's jobs
        (an ``inference``-only key's view). Raises :class:`InvalidParamsError`
        naming ``status``, ``limit`` or ``cursor``.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidParamsError("limit", f"must be an integer in 1..{MAX_PAGE}")
        where: list[str] = []
        args: list[Any] = []
        if status:
            wanted = [s.strip() for s in status.split(",")]
            bad = [s for s in wanted if s not in JOB_STATUSES]
            if bad:
                raise InvalidParamsError("status", f"unknown status {bad[0]!r}")
            where.append(f"status IN ({', '.join('?' * len(wanted))})")
            args.extend(wanted)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if cursor is not None:
            # ASCII digits that SQLite's 64-bit INTEGER holds ("²".isdigit() too)
            if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 19 \
                    or int(cursor) >= 2**63:
                raise InvalidParamsError("cursor", "is not a cursor this server gave")
            where.append("seq < ?")
            args.append(int(cursor))
        sql = SELECT_PAGE
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._read(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return JobList(jobs=[record_of(r[1:]) for r in rows],
                       next_cursor=str(rows[-1][0]) if more else None)

    def events_after(self, job_id: str, last_event_id: int = 0, *,
                     limit: int | None = None) -> list[StoredEvent]:
        """The job's events with ``event_id > last_event_id``, in order (SSE resume).

        Raises :class:`JobNotFoundError` for an unknown job.
        """
        sql = "SELECT event_id, event, data FROM events WHERE job_id = ? AND event_id > ? " \
              "ORDER BY event_id"
        args: tuple[Any, ...] = (job_id, last_event_id)
        if limit is not None:
            sql += " LIMIT ?"
            args = (*args, limit)
        rows = self._read(sql, args).fetchall()
        if not rows and self._read("SELECT 1 FROM jobs WHERE job_id = ?",
                                   (job_id,)).fetchone() is None:
            raise JobNotFoundError(f"no job {job_id}", details={"job_id": job_id})
        return [StoredEvent(event_id=r[0], event=r[1], data=r[2]) for r in rows]

    def decisions(self, job_id: str) -> list[dict[str, Any]]:
        """The job's recorded decisions, oldest first, each with ``decided_at``."""
        rows = self._read("SELECT decided_at, decision FROM decisions WHERE job_id = ? "
                          "ORDER BY decision_id", (job_id,)).fetchall()
        if not rows and self._read("SELECT 1 FROM jobs WHERE job_id = ?",
                                   (job_id,)).fetchone() is None:
            raise JobNotFoundError(f"no job {job_id}", details={"job_id": job_id})
        return [{"decided_at": at, **json.loads(text)} for at, text in rows]

    def active_jobs(self, owner: str) -> int:
        """How many of ``owner``'s jobs are queued, dispatched or running (a key's
        ``max_jobs``)."""
        row = self._read("SELECT count(*) FROM jobs WHERE owner = ? AND status IN "
                         "('queued', 'dispatched', 'running')", (owner,)).fetchone()
        return int(row[0])

    def tokens_since(self, owner: str, since: float) -> tuple[int, float | None]:
        """Prompt and completion tokens of ``owner``'s jobs that ended after ``since`` (Unix
        s), and when the first of them ended (a key's ``tpm``)."""
        row = self._read("SELECT coalesce(sum(coalesce(tokens_in, 0) + tokens_out), 0), "
                         "min(finished_at) FROM jobs WHERE owner = ? AND finished_at > ?",
                         (owner, since)).fetchone()
        return int(row[0]), row[1]

    def count_by_status(self) -> dict[str, int]:
        """Number of jobs in each status (every status present, zeros included)."""
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for status, n in self._read("SELECT status, count(*) FROM jobs GROUP BY status", ()):
            counts[status] = n
        return counts

    def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` on the write connection (in the writer's transaction) and return its
        result; for the small tables beside the jobs (API keys: :mod:`.keys`)."""
        return self._call(op)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only query on this thread's reader connection."""
        return self._read(sql, args).fetchall()

    # -- the writer thread -----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=10.0)
        conn.execute("PRAGMA busy_timeout = 10000")
        return conn

    def _call(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return self._writer.submit(op).result()

    def _read(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self._closed:
                    raise StoreError("the state database is closed")
                conn = self._connect()
                conn.execute("PRAGMA query_only = 1")
                self._readers.append(conn)
            self._local.conn = conn
        try:
            return conn.execute(sql, args)
        except sqlite3.ProgrammingError as exc:
            raise StoreError(f"state database unusable: {exc}") from exc
