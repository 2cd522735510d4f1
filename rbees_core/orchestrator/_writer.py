"""Group commit for SQLite: one writer thread, one transaction per batch of waiting writes.

An *op* is a callable ``op(conn) -> result`` run inside the writer's transaction, each in a
savepoint so that one failing op is rolled back alone. Runs of :class:`Insert` ops with the
same SQL go in with one ``executemany``. Callers get a :class:`concurrent.futures.Future`
that resolves once the batch's ``COMMIT`` has returned.

Writes from an asyncio loop (:meth:`Writer.submit_soon`) skip the thread: the ops submitted
during one pass of the loop are committed together at the end of that pass, on the loop's
own thread. Handing each write to a thread and back costs two thread wake-ups, most of an
admission's latency when the loop is otherwise idle; a commit in WAL mode with
``synchronous=NORMAL`` writes to the WAL without an fsync, so it blocks the loop for less.
The connection is used under one lock, so writes from threads and from the loop never
interleave.

Checkpoints: a second thread copies the WAL into the database (PASSIVE, with its fsyncs)
while commits go on. Under a steady stream of commits such a checkpoint never catches up
with the last frames, and SQLite only restarts the WAL from its beginning once every frame
is copied, so the WAL would grow without bound. When it exceeds :data:`RESTART_FRAMES`, the
checkpointer therefore runs one more pass holding the connection's lock: no commit comes
in meanwhile, it copies the few frames written since its last pass, and the next commit
starts the WAL over. The loop does not wait for that lock (a few ms, an fsync among them):
its writes stay queued and it tries again a millisecond later, serving requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from rbees_core.orchestrator.errors import StoreError

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
#: Checkpoint the WAL into the database after this many commits, or this often.
CHECKPOINT_EVERY = 200
#: Commits (in CHECKPOINT_EVERY) after which, the checkpointer not having got through in
#: that time (starved of the CPU or of the GIL by a burst of commits), the committing
#: thread copies the WAL itself, so that the WAL stays bounded whatever the scheduling
BEHIND_CHECKPOINTS = 3
CHECKPOINT_INTERVAL_S = 1.0
#: WAL size (pages) above which the checkpointer finishes a pass with commits held off, so
#: that the WAL restarts.
RESTART_FRAMES = 4096
#: How soon the loop tries its commit again when the connection is taken.
RETRY_S = 0.001
_STOP = object()


class Insert(Generic[T]):
    """INSERTs that may be batched with their neighbours; yields ``result`` when committed.

    ``statements`` are ``(sql, row)`` pairs run in order. Neighbours with the same SQL, in
    the same order, go in with one ``executemany`` per statement. ``on_conflict`` turns an
    IntegrityError of these rows into the error its caller gets.
    """

    __slots__ = ("key", "on_conflict", "result", "statements")

    def __init__(self, statements: tuple[tuple[str, tuple[Any, ...]], ...], result: T,
                 on_conflict: Callable[[sqlite3.IntegrityError], Exception]) -> None:
        self.statements, self.result, self.on_conflict = statements, result, on_conflict
        self.key = tuple(sql for sql, _ in statements)

    def __call__(self, conn: sqlite3.Connection) -> T:
        try:
            for sql, row in self.statements:
                conn.execute(sql, row)
        except sqlite3.IntegrityError as exc:
            raise self.on_conflict(exc) from exc
        return self.result


def _same_insert(op: Op, first: Insert[Any]) -> bool:
    return isinstance(op, Insert) and op.key == first.key


def _settle(waiter: asyncio.Future[Any], done: Future[Any]) -> None:
    """Give a loop's ``waiter`` the outcome of the committed ``done``, from any thread."""
    loop = waiter.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not loop:  # the store closed from another thread
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle, waiter, done)
        return
    if waiter.cancelled():
        return
    error = done.exception()
    if error is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(done.result())


def _op_error(exc: Exception) -> Exception:
    """What the caller of a failed op gets: its own error, or a StoreError for SQLite's."""
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"state database error: {exc}")
    return exc


class Writer:
    """Owns ``conn`` (autocommit mode) from construction until :meth:`close`."""

    def __init__(self, conn: sqlite3.Connection, connect: Callable[[], sqlite3.Connection],
                 *, max_batch: int = 512, inline: bool = True) -> None:
        self._conn = conn
        self._connect = connect
        self._max_batch = max_batch
        self._inline = inline
        self._ops: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._loop_ops: list[tuple[Op, Future[Any], asyncio.Future[Any]]] = []
        #: the loop on which a commit of ``_loop_ops`` is scheduled (None: none is)
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._commits = 0
        #: ``_commits`` when the WAL was last copied into the database
        self._checkpointed_at = 0
        self._checkpoint_due = threading.Event()
        #: cleared while the checkpointer waits for the connection or holds it: writers then
        #: stand back, or a steady stream of commits could keep it from the lock for good
        self._no_restart = threading.Event()
        self._no_restart.set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rbees-store-writer",
                                        daemon=True)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                              name="rbees-store-checkpoint", daemon=True)
        self._thread.start()
        self._checkpointer.start()

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Queue ``op``; raises :class:`StoreError` once closed."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise StoreError("the state database is closed")
            self._ops.put((op, future))
        return future

    def submit_soon(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``op`` now for the transaction committed at the end of this pass of the
        running loop (or on the writer thread when the writer was made with
        ``inline=False``): ops are committed in the order of these calls. The future gets
        the result once committed. Raises :class:`StoreError` once closed."""
        if not self._inline:
            return asyncio.wrap_future(self.submit(op))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise StoreError("the state database is closed")
            # also when a commit was due on another loop, one closed before it ran
            if self._scheduled_on is not loop:
                loop.call_soon(self._commit_loop_ops)
                self._scheduled_on = loop
            self._loop_ops.append((op, Future(), waiter))
        return waiter

    async def submit_async(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """:meth:`submit_soon`, awaited."""
        return await self.submit_soon(op)

    def _commit_loop_ops(self, block: bool = False) -> None:
        """Commit the loop's queued writes; when the connection is taken (a checkpoint
        finishing the WAL, a thread's commit) and ``block`` is false, try again in
        :data:`RETRY_S` instead of stalling the loop."""
        if not self._loop_ops:
            with self._lock:
                if not self._loop_ops:
                    self._scheduled_on = None
                    return
        # a checkpointer asking for the connection goes first; close() waits at the lock
        may_take = block or self._no_restart.is_set()
        if not (may_take and self._conn_lock.acquire(blocking=block)):
            loop = asyncio.get_running_loop()
            loop.call_later(RETRY_S, self._commit_loop_ops)
            with self._lock:
                self._scheduled_on = loop
            return
        try:
            with self._lock:
                work, self._loop_ops = self._loop_ops, []
                self._scheduled_on = None
            if work:
                self._commit([(op, future) for op, future, _ in work])
        finally:
            self._conn_lock.release()
        for _, future, waiter in work:
            _settle(waiter, future)

    def close(self) -> None:
        """Commit what was submitted, stop both threads, truncate the WAL, close. May be
        called from a thread other than the loop's."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # nothing is queued after this, on the loop or not
        self._commit_loop_ops(block=True)  # a loop's writes made before its next pass
        self._ops.put(_STOP)
        self._thread.join()
        self._stopping.set()
        self._checkpoint_due.set()
        self._checkpointer.join()
        # A reader in another process may hold the WAL; the next open checkpoints it then.
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._ops.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._ops.get_nowait())
                except queue.Empty:
                    break
            work = [item for item in batch if item is not _STOP]
            stop = len(work) < len(batch)
            if work:
                self._no_restart.wait()
                with self._conn_lock:
                    self._commit(work)

    def _commit(self, work: list[tuple[Op, Future[Any]]]) -> None:
        """Commit ``work`` as one transaction (the caller holds the connection's lock); every
        future is resolved when this returns, whatever happened."""
        try:
            self._commit_batch(work)
        except BaseException as exc:  # keep serving: a dead writer would hang every caller
            error = StoreError(f"state database writer failed: {exc!r}")
            if self._conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            for _, future in work:
                if not future.done():
                    future.set_exception(error)

    def _commit_batch(self, work: list[tuple[Op, Future[Any]]]) -> None:
        conn = self._conn
        live = [(op, future) for op, future in work if future.set_running_or_notify_cancel()]
        if not live:
            return
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            if len(live) == 1:  # alone in its transaction: no savepoint needed
                op, future = live[0]
                try:
                    outcomes.append((future, op(conn), None))
                except Exception as exc:
                    conn.execute("ROLLBACK")
                    future.set_exception(_op_error(exc))
                    return
            else:
                self._run_ops(live, outcomes)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(f"state database error: {exc}")
            for _, future in live:
                if not future.done():
                    future.set_exception(error)
            return
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0:
            self._checkpoint_due.set()
        if self._commits - self._checkpointed_at >= BEHIND_CHECKPOINTS * CHECKPOINT_EVERY:
            # the caller holds the connection: no commit comes until the WAL is copied, and
            # the next one starts it again from its beginning
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self._checkpointed_at = self._commits
        for future, result, error_or_none in outcomes:
            if error_or_none is None:
                future.set_result(result)
            else:
                future.set_exception(error_or_none)

    def _run_ops(self, live: list[tuple[Op, Future[Any]]],
                 outcomes: list[tuple[Future[Any], Any, BaseException | None]]) -> None:
        """Each op in its savepoint; a run of like inserts at once."""
        i = 0
        while i < len(live):
            op, future = live[i]
            if isinstance(op, Insert):
                j = i + 1
                while j < len(live) and _same_insert(live[j][0], op):
                    j += 1
                if j - i > 1 and self._insert_many(live[i:j], outcomes):
                    i = j
                    continue
            outcomes.append((future, *self._one(op)))
            i += 1

    def _one(self, op: Op) -> tuple[Any, BaseException | None]:
        conn = self._conn
        conn.execute("SAVEPOINT op")
        try:
            result = op(conn)
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return None, _op_error(exc)
        conn.execute("RELEASE op")
        return result, None

    def _insert_many(self, run: list[tuple[Any, Future[Any]]],
                     outcomes: list[tuple[Future[Any], Any, BaseException | None]]) -> bool:
        """Insert a run at once; False (nothing done) when a row conflicts."""
        conn = self._conn
        conn.execute("SAVEPOINT many")
        try:
            for k, sql in enumerate(run[0][0].key):
                conn.executemany(sql, [op.statements[k][1] for op, _ in run])
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK TO many")
            conn.execute("RELEASE many")
            return False
        conn.execute("RELEASE many")
        outcomes.extend((future, op.result, None) for op, future in run)
        return True

    def _checkpoint_loop(self) -> None:
        conn = self._connect()
        try:
            while not self._stopping.is_set():
                self._checkpoint_due.wait(CHECKPOINT_INTERVAL_S)
                self._checkpoint_due.clear()
                # PASSIVE never blocks the writer; what it cannot copy now it copies next time.
                try:
                    commits = self._commits
                    busy, frames, copied = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if not busy and 0 <= frames <= copied:  # all of it: nothing behind
                        self._checkpointed_at = commits
                    if not busy and frames >= RESTART_FRAMES:
                        self._no_restart.clear()
                        try:
                            with self._conn_lock:  # no commit until the last frames are copied
                                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                                self._checkpointed_at = self._commits
                        finally:
                            self._no_restart.set()
                except sqlite3.Error:
                    continue
        finally:
            conn.close()
