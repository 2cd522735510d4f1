"""The durable side of OpenAI's Batch API: uploaded files, batches and their lines, in the
orchestrator's SQLite store (tables ``files``, ``batches``, ``batch_lines``; schema v6).

Who calls it: the ``/v1/files`` and ``/v1/batches`` routes
(:mod:`rbees_core.programs.orcd_batches`) and the batch runner
(:mod:`rbees_core.programs.orcd_batch_runner`), both on rbees-orcd's event loop.

Exactly once
------------
A line is answered by :meth:`BatchStore.answer`, which writes its result only while it has
none (``UPDATE ... WHERE result IS NULL``): a replay after a restart, or a second runner,
cannot write it twice, and it tells its caller whether it wrote. The output and error
files are made from the lines' results in one transaction with the batch's final status
(:meth:`BatchStore.finish`), so a batch is either finished with every answer in its files
or not finished at all. A line's jobs carry :func:`line_correlation` as their
``correlation_id``, so a
job admitted just before a crash (its id not yet written to the line) is found again
(:meth:`BatchStore.jobs_of_line`) instead of run a second time.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import attrs

from rbees_core.orchestrator.store import Store

#: Statuses from which a batch moves no more.
FINAL_BATCH = frozenset({"failed", "completed", "expired", "cancelled"})
#: Timestamp column set when a batch enters each status.
STAMP = {"in_progress": "in_progress_at", "finalizing": "finalizing_at",
         "completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
         "cancelling": "cancelling_at", "cancelled": "cancelled_at"}
BATCH_COLUMNS = (
    "batch_id", "status", "endpoint", "input_file_id", "completion_window", "metadata",
    "errors", "created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at",
    "failed_at", "expired_at", "cancelling_at", "cancelled_at", "output_file_id",
    "error_file_id", "owner", "owner_models",
)

#: the columns of a :class:`StoredFile`, in its order
_FILE = "file_id, purpose, filename, length(content), created_at, owner"


def new_id(prefix: str) -> str:
    """A fresh object id such as ``batch_3f2a...`` (OpenAI's prefixes, rbees' id rule)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def line_correlation(batch_id: str, line: int) -> str:
    """The correlation id of a line's jobs (``batch-<hex>-<line>``: the id rule of
    ``X-Correlation-Id``, which has no ``_``)."""
    return f"{batch_id.replace('_', '-')}-{line}"


@attrs.frozen
class StoredFile:
    """An uploaded or produced file (its content is read apart: :meth:`BatchStore.content`)."""

    file_id: str
    purpose: str
    filename: str
    bytes: int
    created_at: float
    #: the name of the key that uploaded it (a batch's output: the batch's), None without
    #: credentials: an ``inference``-only key sees its own files only
    owner: str | None = None


@attrs.frozen
class Line:
    """One request line of a batch: its place (from 0), ``custom_id``, the request object
    (``method``, ``url``, ``body``), its jobs' ids once submitted, and whether it has its
    answer (``ok``: None while unanswered, else whether it went to the output file)."""

    line: int
    custom_id: str
    request: dict[str, Any]
    job_ids: list[str] | None
    ok: bool | None


@attrs.frozen
class Counts:
    """A batch's ``request_counts``."""

    total: int
    completed: int
    failed: int


class BatchStore:
    """Files, batches and lines over the orchestrator's :class:`Store` (its writer thread,
    its read connections). ``clock`` gives the timestamps it records (Unix seconds)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    # -- files -----------------------------------------------------------------------------

    async def add_file(self, purpose: str, filename: str, content: bytes,
                       owner: str | None = None) -> StoredFile:
        """Keep an uploaded (or produced) file of ``owner``; durable when it returns."""
        file_id, now = new_id("file"), self._clock()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO files (file_id, purpose, filename, created_at, content, "
                         "owner) VALUES (?, ?, ?, ?, ?, ?)",
                         (file_id, purpose, filename, now, content, owner))

        await self.store.write_async(op)
        return StoredFile(file_id, purpose, filename, len(content), now, owner)

    def file(self, file_id: str) -> StoredFile | None:
        """A file's object, None when there is none."""
        rows = self.store.query(f"SELECT {_FILE} FROM files WHERE file_id = ?", (file_id,))
        return StoredFile(*rows[0]) if rows else None

    def files(self, *, after: str | None, limit: int, newest_first: bool = True,
              purpose: str | None = None, owner: str | None = None
              ) -> tuple[list[StoredFile], bool]:
        """A page of files (``GET /v1/files``) after the file ``after`` in that order, of
        ``purpose`` and ``owner`` when given; and whether more follow."""
        where: list[str] = []
        args: list[Any] = []
        if after is not None:
            where.append(f"seq {'<' if newest_first else '>'} coalesce((SELECT seq FROM "
                         f"files WHERE file_id = ?), {0 if newest_first else 2 ** 62})")
            args.append(after)
        for column, value in (("purpose", purpose), ("owner", owner)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {_FILE} FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        rows = self.store.query(sql, (*args, limit + 1))
        return [StoredFile(*r) for r in rows[:limit]], len(rows) > limit

    async def delete_file(self, file_id: str) -> bool:
        """Delete a file (``DELETE /v1/files/{id}``); False when there was none. A batch
        made of it runs on (its lines are its own); one whose output it was keeps the id."""

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM files WHERE file_id = ?", (file_id,))
            return cur.rowcount > 0

        deleted: bool = await self.store.write_async(op)
        return deleted

    def content(self, file_id: str) -> bytes | None:
        """A file's bytes, None when there is none."""
        rows = self.store.query("SELECT content FROM files WHERE file_id = ?", (file_id,))
        return bytes(rows[0][0]) if rows else None

    # -- batches ---------------------------------------------------------------------------

    async def add_batch(self, *, endpoint: str, input_file_id: str, completion_window: str,
                        window_s: float, metadata: dict[str, str] | None,
                        lines: list[tuple[str, dict[str, Any]]], owner: str | None = None,
                        owner_models: list[str] | None = None) -> dict[str, Any]:
        """A new batch (``validating``) with its ``lines`` (``(custom_id, request)``, in
        file order; custom ids distinct), in one transaction; its row. ``owner`` and
        ``owner_models``: the key that made it and the models it may use (None: any)."""
        batch_id, now = new_id("batch"), self._clock()

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO batches (batch_id, status, endpoint, input_file_id, "
                "completion_window, metadata, created_at, expires_at, owner, owner_models) "
                "VALUES (?, 'validating', ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch_id, endpoint, input_file_id, completion_window,
                 None if metadata is None else json.dumps(metadata), now, now + window_s,
                 owner, None if owner_models is None else json.dumps(owner_models)))
            conn.executemany(
                "INSERT INTO batch_lines (batch_id, line, custom_id, request) "
                "VALUES (?, ?, ?, ?)",
                [(batch_id, i, cid, json.dumps(req)) for i, (cid, req) in enumerate(lines)])

        await self.store.write_async(op)
        row = self.batch(batch_id)
        assert row is not None
        return row

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        """A batch's row (column name to value), None when there is none."""
        rows = self.store.query(f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches "
                                "WHERE batch_id = ?", (batch_id,))
        return dict(zip(BATCH_COLUMNS, rows[0], strict=True)) if rows else None

    def batches(self, *, after: str | None, limit: int, owner: str | None = None
                ) -> tuple[list[dict[str, Any]], bool]:
        """A page of batches, newest first, after the batch ``after`` (of ``owner`` when
        given); and whether more follow."""
        args: list[Any] = []
        where: list[str] = []
        if after is not None:
            where.append("seq < coalesce((SELECT seq FROM batches WHERE batch_id = ?), 0)")
            args.append(after)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self.store.query(f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches{clause} "
                                "ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        page = [dict(zip(BATCH_COLUMNS, r, strict=True)) for r in rows[:limit]]
        return page, len(rows) > limit

    def unfinished(self) -> list[str]:
        """The ids of batches not yet final, oldest first (the runner's work)."""
        marks = ", ".join("?" * len(FINAL_BATCH))
        return [r[0] for r in self.store.query(
            f"SELECT batch_id FROM batches WHERE status NOT IN ({marks}) ORDER BY seq",
            tuple(sorted(FINAL_BATCH)))]

    def counts(self, batch_id: str) -> Counts:
        """The batch's request counts."""
        total, done, failed = self.store.query(
            "SELECT count(*), coalesce(sum(ok = 1), 0), coalesce(sum(ok = 0), 0) "
            "FROM batch_lines WHERE batch_id = ?", (batch_id,))[0]
        return Counts(int(total), int(done), int(failed))

    async def set_status(self, batch_id: str, status: str, *, only_from: tuple[str, ...] = (),
                         errors: list[dict[str, Any]] | None = None) -> bool:
        """Move a batch to ``status`` (stamping its time), only from ``only_from`` when
        given and never from a final status; whether it moved."""
        now = self._clock()
        column = STAMP.get(status)

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT status FROM batches WHERE batch_id = ?",
                               (batch_id,)).fetchone()
            if row is None or row[0] in FINAL_BATCH or (only_from and row[0] not in only_from):
                return False
            sets = "status = ?" + (f", {column} = ?" if column else "")
            args: list[Any] = [status] + ([now] if column else [])
            if errors is not None:
                sets += ", errors = ?"
                args.append(json.dumps(errors))
            conn.execute(f"UPDATE batches SET {sets} WHERE batch_id = ?", (*args, batch_id))
            return True

        return await self.store.write_async(op)

    # -- lines -----------------------------------------------------------------------------

    def open_lines(self, batch_id: str) -> list[Line]:
        """The batch's unanswered lines, in file order."""
        rows = self.store.query("SELECT line, custom_id, request, job_ids, ok FROM batch_lines "
                                "WHERE batch_id = ? AND result IS NULL ORDER BY line",
                                (batch_id,))
        return [Line(n, cid, json.loads(req), None if jobs is None else json.loads(jobs),
                     None if ok is None else bool(ok)) for n, cid, req, jobs, ok in rows]

    def jobs_of_line(self, batch_id: str, line: int) -> list[str]:
        """The jobs admitted for a line (by their correlation id), oldest first: those of
        an admission whose ids were not yet written to the line when rbees-orcd died."""
        return [r[0] for r in self.store.query(
            "SELECT job_id FROM jobs WHERE correlation_id = ? ORDER BY seq",
            (line_correlation(batch_id, line),))]

    async def set_jobs(self, batch_id: str, line: int, job_ids: list[str] | None) -> None:
        """Record the jobs now answering a line (None: none; it is to be submitted)."""
        text = None if job_ids is None else json.dumps(job_ids)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE batch_lines SET job_ids = ? WHERE batch_id = ? AND line = ? "
                         "AND result IS NULL", (text, batch_id, line))

        await self.store.write_async(op)

    async def answer(self, batch_id: str, line: int, ok: bool, result: dict[str, Any]) -> bool:
        """Write a line's answer (an output line when ``ok``, an error line otherwise)
        unless it has one; whether this call wrote it."""
        text = json.dumps(result, ensure_ascii=False)

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE batch_lines SET ok = ?, result = ? WHERE batch_id = ? "
                               "AND line = ? AND result IS NULL", (int(ok), text, batch_id, line))
            return cur.rowcount == 1

        return await self.store.write_async(op)

    async def finish(self, batch_id: str, status: str, rest: Callable[[Line], dict[str, Any]]
                     ) -> bool:
        """End a batch with ``status`` (``completed``, ``cancelled`` or ``expired``) in one
        transaction: each unanswered line gets ``rest(line)`` as its error line, the
        output file (the ``ok`` lines' results, in file order) and the error file (the
        others') are written when not empty, and their ids set. False when the batch was
        already final."""
        now = self._clock()
        out_id, err_id = new_id("file"), new_id("file")

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT status, owner FROM batches WHERE batch_id = ?",
                               (batch_id,)).fetchone()
            if row is None or row[0] in FINAL_BATCH:
                return False
            for n, cid, req, jobs, _ok in conn.execute(
                    "SELECT line, custom_id, request, job_ids, ok FROM batch_lines "
                    "WHERE batch_id = ? AND result IS NULL", (batch_id,)).fetchall():
                line = Line(n, cid, json.loads(req), None if jobs is None else json.loads(jobs),
                            None)
                conn.execute("UPDATE batch_lines SET ok = 0, result = ? WHERE batch_id = ? "
                             "AND line = ?", (json.dumps(rest(line)), batch_id, n))
            files: dict[str, str | None] = {}
            for ok, file_id, column in ((1, out_id, "output_file_id"),
                                        (0, err_id, "error_file_id")):
                results = [r[0] for r in conn.execute(
                    "SELECT result FROM batch_lines WHERE batch_id = ? AND ok = ? "
                    "ORDER BY line", (batch_id, ok))]
                files[column] = None
                if results:
                    content = ("\n".join(results) + "\n").encode()
                    purpose = "batch_output"
                    conn.execute("INSERT INTO files (file_id, purpose, filename, created_at, "
                                 "content, owner) VALUES (?, ?, ?, ?, ?, ?)",
                                 (file_id, purpose, f"{batch_id}_{column[:-8]}.jsonl", now,
                                  content, row[1]))
                    files[column] = file_id
            conn.execute(f"UPDATE batches SET status = ?, {STAMP[status]} = ?, "
                         "output_file_id = ?, error_file_id = ? WHERE batch_id = ?",
                         (status, now, files["output_file_id"], files["error_file_id"],
                          batch_id))
            return True

        return await self.store.write_async(op)


__all__ = ["FINAL_BATCH", "BatchStore", "Counts", "Line", "StoredFile", "line_correlation",
           "new_id"]
