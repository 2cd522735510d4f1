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
committed; the ``*_async`` variants await the same without holding a thread. Writes are
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
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from rbees_core.api.common import ID_PATTERN
from rbees_core.api.orchestrator import (
    FINAL_STATUSES,
    JOB_STATUSES,
    JobError,
    JobList,
    JobRecord,
    Placement,
)
from rbees_core.errors import InvalidParamsError
from rbees_core.orchestrator._writer import Insert, Writer
from rbees_core.orchestrator.errors import (
    ORCHESTRATOR_RESTARTED,
    InvalidTransitionError,
    JobExistsError,
    JobNotFoundError,
    StoreError,
)
from rbees_core.orchestrator.jobs import (
    TERMINAL_EVENTS,
    TRANSITION_FIELDS,
    TRANSITIONS,
    JobSpec,
    NewJob,
    RecoveredJob,
    Recovery,
    StoredEvent,
    dumps,
    event_pairs,
)
from rbees_core.orchestrator.migrations import migrate
from rbees_core.schema import from_mapping

T = TypeVar("T")
Synchronous = Literal["NORMAL", "FULL"]
DEFAULT_PAGE = 50
MAX_PAGE = 1000

_JOB_COLUMNS = (
    "job_id", "status", "priority", "model", "prompt_sha256", "seed", "created_at",
    "queued_at", "dispatched_at", "started_at", "finished_at", "pool_id", "worker_id",
    "retry_count", "tokens_in", "tokens_out", "ttft_ms", "stop_reason", "error_code",
    "error_message",
)
_SELECT_JOB = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"
_SELECT_PAGE = f"SELECT seq, {', '.join(_JOB_COLUMNS)} FROM jobs"
_INSERT_JOB = (
    "INSERT INTO jobs (job_id, model, prompt, messages, prompt_sha256, params, priority, "
    "status, seed, created_at, queued_at, correlation_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)"
)
_INSERT_EVENT = "INSERT INTO events (job_id, event_id, event, data) VALUES (?, ?, ?, ?)"
_ID = re.compile(ID_PATTERN)


def _record(row: tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_JOB_COLUMNS, row, strict=True))
    code, message = values.pop("error_code"), values.pop("error_message")
    error = JobError(code=code, message=message or "") if code else None
    return JobRecord(error=error, **values)


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
        self._lock = threading.Lock()
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        return self._call(self._admit_op(job, events))

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
        admit = self._admit_op(job, events)
        if dispatched is None:
            return self._writer.submit_soon(admit)
        pool_id, worker_id, more = dispatched
        dispatch = self._transition_op(job.job_id, "dispatched", more,
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
        return self._call(self._transition_op(job_id, status, events, fields))

    async def transition_async(self, job_id: str, status: str, *,
                               events: Iterable[tuple[str, Mapping[str, Any]]] = (),
                               **fields: Any) -> JobRecord:
        """:meth:`transition` for an asyncio loop."""
        return await self._writer.submit_async(
            self._transition_op(job_id, status, events, fields))

    def append_events(self, job_id: str,
                      events: Iterable[tuple[str, Mapping[str, Any]]]) -> list[StoredEvent]:
        """Append ``[(event, data), ...]`` in one transaction; return them with their ids.

        Raises :class:`JobNotFoundError`, and :class:`InvalidTransitionError` when the job is
        final or an event would follow a terminal one.
        """
        return self._call(self._append_op(job_id, event_pairs(events)))

    async def append_events_async(
        self, job_id: str, events: Iterable[tuple[str, Mapping[str, Any]]]
    ) -> list[StoredEvent]:
        """:meth:`append_events` for an asyncio loop."""
        return await self._writer.submit_async(self._append_op(job_id, event_pairs(events)))

    def record_decision(self, job_id: str, decision: Mapping[str, Any]) -> int:
        """Keep one scheduler decision (candidates, scores, rejections); return its number.

        Raises :class:`JobNotFoundError`.
        """
        return self._call(self._decision_op(job_id, decision))

    async def record_decision_async(self, job_id: str, decision: Mapping[str, Any]) -> int:
        """:meth:`record_decision` for an asyncio loop."""
        return await self._writer.submit_async(self._decision_op(job_id, decision))

    def recover(self) -> Recovery:
        """Apply CONTRACT section 5's restart rule; call once at start, before dispatching.

        Queued jobs stay queued in admission order. Dispatched or running jobs that produced
        no token are queued again with ``retry_count + 1``; those that produced tokens fail
        with ``ORCHESTRATOR_RESTARTED`` and get a terminal ``error`` event. An unfinished job
        whose terminal event is already stored is settled by that event instead.
        """
        return self._call(self._recover_op)

    # -- reads -----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        """The job's record (no prompt); raises :class:`JobNotFoundError`."""
        row = self._read(_SELECT_JOB + " WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id}", details={"job_id": job_id})
        return _record(row)

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
                  cursor: str | None = None) -> JobList:
        """One page of jobs, newest first (``GET /v2/tasks``).

        ``status`` is one status or several separated by commas; ``limit`` is 1..1000;
        ``cursor`` is a previous page's ``next_cursor``. Raises :class:`InvalidParamsError`
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
        if cursor is not None:
            if not cursor.isdigit() or len(cursor) > 19:
                raise InvalidParamsError("cursor", "is not a cursor this server gave")
            where.append("seq < ?")
            args.append(int(cursor))
        sql = _SELECT_PAGE
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._read(sql, (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return JobList(jobs=[_record(r[1:]) for r in rows],
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

    def count_by_status(self) -> dict[str, int]:
        """Number of jobs in each status (every status present, zeros included)."""
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for status, n in self._read("SELECT status, count(*) FROM jobs GROUP BY status", ()):
            counts[status] = n
        return counts

    # -- write operations (run on the writer thread) ---------------------------------------

    def _admit_op(self, job: NewJob, events: Iterable[tuple[str, Mapping[str, Any]]]
                  ) -> Insert[JobRecord]:
        if not _ID.fullmatch(job.job_id):
            raise InvalidParamsError("job_id", f"must match {ID_PATTERN}")
        if job.priority not in ("interactive", "batch"):
            raise InvalidParamsError("priority", "must be interactive or batch")
        created = self._clock() if job.created_at is None else job.created_at
        digest = job.prompt_sha256
        row = (job.job_id, job.model, job.prompt,
               None if job.messages is None else dumps(job.messages), digest, dumps(job.params),
               job.priority, job.seed, created, created, job.correlation_id)
        record = JobRecord(job_id=job.job_id, status="queued", priority=job.priority,
                           model=job.model, prompt_sha256=digest, seed=job.seed,
                           created_at=created, queued_at=created)
        statements: list[tuple[str, tuple[Any, ...]]] = [(_INSERT_JOB, row)]
        for event_id, (name, data) in enumerate(event_pairs(events), start=1):
            statements.append((_INSERT_EVENT, (job.job_id, event_id, name, dumps(dict(data)))))
        return Insert(tuple(statements), record, lambda exc: JobExistsError(
            f"job {job.job_id} already exists", details={"job_id": job.job_id}))

    def _transition_op(self, job_id: str, status: str,
                       events: Iterable[tuple[str, Mapping[str, Any]]],
                       fields: dict[str, Any]) -> Callable[[sqlite3.Connection], JobRecord]:
        if status not in TRANSITIONS:
            raise ValueError(f"unknown status {status!r}")
        unknown = set(fields) - TRANSITION_FIELDS
        if unknown:
            raise ValueError(f"transition cannot set {sorted(unknown)}")
        if status == "dispatched" and not (fields.get("pool_id") and fields.get("worker_id")):
            raise ValueError("a dispatch names pool_id and worker_id")
        if status == "failed" and not fields.get("error_code"):
            raise ValueError("a failure has an error_code")
        pairs = event_pairs(events)

        def op(conn: sqlite3.Connection) -> JobRecord:
            current, tokens_out = self._status(conn, job_id)
            if status not in TRANSITIONS[current]:
                raise InvalidTransitionError(
                    f"job {job_id} is {current}; it cannot become {status}",
                    details={"job_id": job_id, "status": current, "requested": status},
                )
            if status == "queued" and tokens_out > 0:
                raise InvalidTransitionError(
                    f"job {job_id} has produced tokens; it cannot be queued again",
                    details={"job_id": job_id, "status": current, "requested": status},
                )
            self._set_status(conn, job_id, status, fields)
            if pairs:
                self._append(conn, job_id, pairs)
            row = conn.execute(_SELECT_JOB + " WHERE job_id = ?", (job_id,)).fetchone()
            return _record(row)

        return op

    def _append_op(self, job_id: str, pairs: list[tuple[str, Mapping[str, Any]]]
                   ) -> Callable[[sqlite3.Connection], list[StoredEvent]]:
        def op(conn: sqlite3.Connection) -> list[StoredEvent]:
            status, _ = self._status(conn, job_id)
            if status in FINAL_STATUSES:
                raise InvalidTransitionError(f"job {job_id} is {status}: no more events",
                                             details={"job_id": job_id, "status": status})
            return self._append(conn, job_id, pairs)

        return op

    def _decision_op(self, job_id: str, decision: Mapping[str, Any]
                     ) -> Callable[[sqlite3.Connection], int]:
        payload = dumps(dict(decision))

        def op(conn: sqlite3.Connection) -> int:
            self._status(conn, job_id)
            row = conn.execute(
                "SELECT coalesce(max(decision_id), 0) FROM decisions WHERE job_id = ?", (job_id,)
            ).fetchone()
            decision_id = int(row[0]) + 1
            conn.execute("INSERT INTO decisions VALUES (?, ?, ?, ?)",
                         (job_id, decision_id, self._clock(), payload))
            return decision_id

        return op

    def _recover_op(self, conn: sqlite3.Connection) -> Recovery:
        requeued: list[str] = []
        failed: list[str] = []
        settled: list[str] = []
        unfinished = conn.execute(
            "SELECT job_id, status, tokens_out FROM jobs "
            "WHERE status IN ('queued', 'dispatched', 'running') ORDER BY seq"
        ).fetchall()
        for job_id, status, tokens_out in unfinished:
            last = conn.execute(
                "SELECT event, data FROM events WHERE job_id = ? ORDER BY event_id DESC LIMIT 1",
                (job_id,),
            ).fetchone()
            if last is not None and last[0] in TERMINAL_EVENTS:
                self._settle(conn, job_id, last[0], json.loads(last[1]))
                settled.append(job_id)
            elif status == "queued":
                continue
            elif tokens_out > 0:
                message = "the orchestrator restarted while the job was generating"
                self._set_status(conn, job_id, "failed", {
                    "error_code": ORCHESTRATOR_RESTARTED, "error_message": message,
                })
                self._append(conn, job_id, [("error", {
                    "job_id": job_id, "code": ORCHESTRATOR_RESTARTED, "message": message,
                    "retriable": True,
                })])
                failed.append(job_id)
            else:
                self._set_status(conn, job_id, "queued", {})
                requeued.append(job_id)
        queued = [
            RecoveredJob(job_id=job_id, seq=seq, priority=priority, model=model,
                         created_at=created_at, retry_count=retries,
                         placement=_placement(params))
            for job_id, seq, priority, model, created_at, retries, params in conn.execute(
                "SELECT job_id, seq, priority, model, created_at, retry_count, params "
                "FROM jobs WHERE status = 'queued' ORDER BY seq"
            )
        ]
        return Recovery(queued=queued, requeued=requeued, failed=failed, settled=settled)

    # -- helpers (writer thread) -----------------------------------------------------------

    @staticmethod
    def _status(conn: sqlite3.Connection, job_id: str) -> tuple[str, int]:
        row = conn.execute("SELECT status, tokens_out FROM jobs WHERE job_id = ?",
                           (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id}", details={"job_id": job_id})
        return str(row[0]), int(row[1])

    def _set_status(self, conn: sqlite3.Connection, job_id: str, status: str,
                    fields: Mapping[str, Any]) -> None:
        now = self._clock()
        sets: dict[str, Any] = {"status": status, **fields}
        extra = ""
        if status == "dispatched":
            sets["dispatched_at"] = now
        elif status == "running":
            sets["started_at"] = now
        elif status == "queued":
            sets.update(queued_at=now, dispatched_at=None, started_at=None, pool_id=None,
                        worker_id=None)
            extra = ", retry_count = retry_count + 1"
        else:
            sets["finished_at"] = now
        assignments = ", ".join(f"{name} = ?" for name in sets)
        conn.execute(f"UPDATE jobs SET {assignments}{extra} WHERE job_id = ?",
                     (*sets.values(), job_id))

    def _settle(self, conn: sqlite3.Connection, job_id: str, event: str,
                data: Mapping[str, Any]) -> None:
        if event == "end":
            fields = {k: data[k] for k in ("tokens_in", "tokens_out", "ttft_ms", "stop_reason")
                      if k in data}
            self._set_status(conn, job_id, "completed", fields)
        else:
            self._set_status(conn, job_id, "failed", {
                "error_code": str(data.get("code") or "FAILED"),
                "error_message": str(data.get("message") or ""),
            })

    @staticmethod
    def _append(conn: sqlite3.Connection, job_id: str,
                pairs: list[tuple[str, Mapping[str, Any]]]) -> list[StoredEvent]:
        last = conn.execute(
            "SELECT event_id, event FROM events WHERE job_id = ? ORDER BY event_id DESC LIMIT 1",
            (job_id,),
        ).fetchone()
        ended = last is not None and last[1] in TERMINAL_EVENTS
        next_id = 1 if last is None else int(last[0]) + 1
        stored: list[StoredEvent] = []
        tokens, top = 0, -1
        for name, data in pairs:
            if ended:
                raise InvalidTransitionError(
                    f"job {job_id} has ended: no event may follow its terminal event",
                    details={"job_id": job_id, "event": name},
                )
            stored.append(StoredEvent(event_id=next_id, event=name, data=dumps(dict(data))))
            next_id += 1
            ended = name in TERMINAL_EVENTS
            if name == "token":
                tokens += 1
                index = data.get("i")
                if isinstance(index, int) and not isinstance(index, bool):
                    top = max(top, index)
        conn.executemany(_INSERT_EVENT,
                         [(job_id, e.event_id, e.event, e.data) for e in stored])
        if tokens:
            conn.execute("UPDATE jobs SET tokens_out = max(tokens_out + ?, ?) WHERE job_id = ?",
                         (0 if top >= 0 else tokens, top + 1, job_id))
        return stored

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


def _placement(params: str) -> Placement | None:
    raw = json.loads(params).get("placement")
    return None if raw is None else from_mapping(Placement, raw)
