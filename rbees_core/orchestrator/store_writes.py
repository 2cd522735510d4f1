"""The store's writes: each builds an operation the writer thread runs in a savepoint.

:class:`~rbees_core.orchestrator.store.Store` validates a write's arguments on the caller's
thread by building its operation here (``admit_op``, ``transition_op``, ...), then submits
it to its writer (:mod:`rbees_core.orchestrator._writer`), which runs it on the write
connection and commits it with the writes waiting beside it. Also the SQL both the writes
and the store's reads use. Nothing here touches a connection outside an operation.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rbees_core.api.common import ID_PATTERN
from rbees_core.api.orchestrator import FINAL_STATUSES, JobError, JobRecord, Placement
from rbees_core.errors import InvalidParamsError
from rbees_core.orchestrator._writer import Insert
from rbees_core.orchestrator.decisions import encode_snapshot
from rbees_core.orchestrator.errors import (
    ORCHESTRATOR_RESTARTED,
    InvalidTransitionError,
    JobExistsError,
    JobNotFoundError,
)
from rbees_core.orchestrator.jobs import (
    TERMINAL_EVENTS,
    TRANSITION_FIELDS,
    TRANSITIONS,
    NewJob,
    RecoveredJob,
    Recovery,
    StoredEvent,
    dumps,
    event_pairs,
)
from rbees_core.schema import from_mapping

JOB_COLUMNS = (
    "job_id", "status", "priority", "model", "prompt_sha256", "seed", "created_at",
    "queued_at", "dispatched_at", "started_at", "finished_at", "pool_id", "worker_id",
    "retry_count", "tokens_in", "tokens_out", "ttft_ms", "stop_reason", "error_code",
    "error_message", "owner",
)
SELECT_JOB = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"
SELECT_PAGE = f"SELECT seq, {', '.join(JOB_COLUMNS)} FROM jobs"
INSERT_JOB = (
    "INSERT INTO jobs (job_id, model, prompt, messages, prompt_sha256, params, priority, "
    "status, seed, created_at, queued_at, correlation_id, owner) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)"
)
INSERT_EVENT = "INSERT INTO events (job_id, event_id, event, data) VALUES (?, ?, ?, ?)"
_ID = re.compile(ID_PATTERN)


def record_of(row: tuple[Any, ...]) -> JobRecord:
    """A job's record from a row of :data:`SELECT_JOB`."""
    values = dict(zip(JOB_COLUMNS, row, strict=True))
    code, message = values.pop("error_code"), values.pop("error_message")
    error = JobError(code=code, message=message or "") if code else None
    return JobRecord(error=error, **values)


class Ops:
    """The write operations of one store; ``clock`` gives the timestamps they record.

    Each ``*_op`` method checks its arguments now (raising what the matching
    :class:`~rbees_core.orchestrator.store.Store` method documents) and returns the
    operation for the writer thread, which raises the rest when it runs.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def admit_op(self, job: NewJob, events: Iterable[tuple[str, Mapping[str, Any]]]
                 ) -> Insert[JobRecord]:
        if not _ID.fullmatch(job.job_id):
            raise InvalidParamsError("job_id", f"must match {ID_PATTERN}")
        if job.priority not in ("interactive", "batch"):
            raise InvalidParamsError("priority", "must be interactive or batch")
        created = self._clock() if job.created_at is None else job.created_at
        digest = job.prompt_sha256
        row = (job.job_id, job.model, job.prompt,
               None if job.messages is None else dumps(job.messages), digest, dumps(job.params),
               job.priority, job.seed, created, created, job.correlation_id, job.owner)
        record = JobRecord(job_id=job.job_id, status="queued", priority=job.priority,
                           model=job.model, prompt_sha256=digest, seed=job.seed,
                           created_at=created, queued_at=created, owner=job.owner)
        statements: list[tuple[str, tuple[Any, ...]]] = [(INSERT_JOB, row)]
        for event_id, (name, data) in enumerate(event_pairs(events), start=1):
            statements.append((INSERT_EVENT, (job.job_id, event_id, name, dumps(dict(data)))))
        return Insert(tuple(statements), record, lambda exc: JobExistsError(
            f"job {job.job_id} already exists", details={"job_id": job.job_id}))

    def transition_op(self, job_id: str, status: str,
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
            row = conn.execute(SELECT_JOB + " WHERE job_id = ?", (job_id,)).fetchone()
            return record_of(row)

        return op

    def append_op(self, job_id: str, pairs: list[tuple[str, Mapping[str, Any]]]
                  ) -> Callable[[sqlite3.Connection], list[StoredEvent]]:
        def op(conn: sqlite3.Connection) -> list[StoredEvent]:
            status, _ = self._status(conn, job_id)
            if status in FINAL_STATUSES:
                raise InvalidTransitionError(f"job {job_id} is {status}: no more events",
                                             details={"job_id": job_id, "status": status})
            return self._append(conn, job_id, pairs)

        return op

    def decision_op(self, job_id: str, decision: Mapping[str, Any],
                    snapshot: Mapping[str, Any] | None = None
                    ) -> Callable[[sqlite3.Connection], int]:
        payload = dumps(dict(decision))

        def op(conn: sqlite3.Connection) -> int:
            self._status(conn, job_id)
            # encoded here, on the writer's thread: the snapshot is not changed after the
            # decision (each round takes a new one), and the event loop is spared the zlib
            blob = None if snapshot is None else encode_snapshot(snapshot)
            row = conn.execute(
                "SELECT coalesce(max(decision_id), 0) FROM decisions WHERE job_id = ?", (job_id,)
            ).fetchone()
            decision_id = int(row[0]) + 1
            conn.execute("INSERT INTO decisions (job_id, decision_id, decided_at, decision, "
                         "snapshot) VALUES (?, ?, ?, ?, ?)",
                         (job_id, decision_id, self._clock(), payload, blob))
            return decision_id

        return op

    def recover_op(self, conn: sqlite3.Connection) -> Recovery:
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
                         placement=_placement(params), deadline_ms=_deadline_ms(params),
                         embedding=json.loads(params).get("input") is not None)
            for job_id, seq, priority, model, created_at, retries, params in conn.execute(
                "SELECT job_id, seq, priority, model, created_at, retry_count, params "
                "FROM jobs WHERE status = 'queued' ORDER BY seq"
            )
        ]
        return Recovery(queued=queued, requeued=requeued, failed=failed, settled=settled)

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
        conn.executemany(INSERT_EVENT,
                         [(job_id, e.event_id, e.event, e.data) for e in stored])
        if tokens:
            conn.execute("UPDATE jobs SET tokens_out = max(tokens_out + ?, ?) WHERE job_id = ?",
                         (0 if top >= 0 else tokens, top + 1, job_id))
        return stored


def _placement(params: str) -> Placement | None:
    raw = json.loads(params).get("placement")
    return None if raw is None else from_mapping(Placement, raw)


def _deadline_ms(params: str) -> int | None:
    raw = json.loads(params).get("deadline_ms")
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None
