"""The orchestrator's two-lane job queue (CONTRACT section 5), in memory.

Dispatch order
--------------
Every queued job has a ``seq`` (its place in arrival order: distinct integers, assigned
increasing by :meth:`JobQueue.push` unless the caller gives one) and a ``since`` (the queue
clock's time from which its wait counts). The order is:

1. the *fast lane*: interactive jobs and *promoted* batch jobs, by ascending ``seq``;
2. then the *batch lane*: batch jobs not yet promoted, by ascending ``seq``.

A batch job is promoted once it has waited strictly longer than ``promote_after_s``
(``clock() - since > promote_after_s``); it then stays promoted. Promotion moves it into
the fast lane at its own ``seq``: ahead of every interactive job that arrived after it,
behind every interactive job (and promoted batch job) that arrived before it. Without
promotions this is "interactive before batch, FIFO within a lane". Promotion is evaluated
at every operation, so no timer is needed.

Capacity
--------
``capacity`` bounds the number of queued jobs. When a push finds the queue full, the policy
decides: ``reject`` raises :class:`~rbees_core.orchestrator.errors.QueueFullError`;
``drop-oldest-batch`` evicts the batch-priority job with the smallest ``seq`` (promoted or
not), returns it in :attr:`Pushed.dropped` so the caller can end it with
``QUEUE_FULL_DROPPED``, and queues the new job; with no batch job queued it rejects like
``reject``. ``force=True`` skips the check, for jobs that were already admitted (retries
after a failed dispatch, recovery after a restart), so the queue may then exceed capacity.

Costs: push, remove, position and each promotion are O(log n); pop_next is O(log n) plus
one ``accept`` call per job it skips; iteration is O(1) per job.

A retried job keeps its place by being pushed again with its old ``seq`` and ``since``
(``queue.push(job.job_id, job.priority, seq=job.seq, since=job.since, force=True)``).
After a restart, push the recovered jobs in the store's order with ``since`` set to
their admission time; fresh ``seq`` values keep their relative order.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Literal

import attrs

from rbees_core.api.orchestrator import Placement, Priority
from rbees_core.orchestrator._sortedkeys import SortedKeys
from rbees_core.orchestrator.errors import JobExistsError, QueueFullError

QueuePolicy = Literal["reject", "drop-oldest-batch"]
QUEUE_POLICIES: tuple[str, ...] = ("reject", "drop-oldest-batch")
DEFAULT_CAPACITY = 1024
DEFAULT_PROMOTE_AFTER_S = 300.0


@attrs.frozen
class QueuedJob:
    """One job waiting in the queue: what dispatch order and placement need, nothing more."""

    job_id: str
    priority: Priority
    seq: int
    since: float
    model: str = ""
    placement: Placement | None = None
    #: an embedding job: it runs on embedding workers only
    embedding: bool = False


@attrs.frozen
class Pushed:
    """Result of :meth:`JobQueue.push`."""

    job: QueuedJob
    position: int
    dropped: QueuedJob | None = None


@attrs.frozen
class QueueDepths:
    """Queued jobs by kind: ``interactive + promoted + batch == len(queue)``."""

    interactive: int
    promoted: int
    batch: int

    @property
    def total(self) -> int:
        return self.interactive + self.promoted + self.batch


class JobQueue:
    """Two lanes, promotion of waiting batch jobs, capacity with a policy.

    Owned by the orchestrator daemon's event loop; not thread-safe (call it from one thread).
    ``clock`` returns seconds; it defaults to :func:`time.time` so that ``since`` values can
    be admission times read back from the store after a restart.
    """

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        policy: QueuePolicy = "reject",
        promote_after_s: float | None = DEFAULT_PROMOTE_AFTER_S,
        retry_after_s: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if policy not in QUEUE_POLICIES:
            raise ValueError(f"policy must be one of {QUEUE_POLICIES}")
        self.capacity = capacity
        self.policy: QueuePolicy = policy
        self.promote_after_s = promote_after_s
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._jobs: dict[str, QueuedJob] = {}
        self._by_seq: dict[int, QueuedJob] = {}
        self._fast = SortedKeys()
        self._slow = SortedKeys()
        self._batch = SortedKeys()  # every batch-priority job, for drop-oldest-batch
        self._waiting: list[tuple[float, int, str]] = []  # (since, seq, job_id) of slow jobs
        self._next_seq = 1

    # -- queries ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __iter__(self) -> Iterator[QueuedJob]:
        """Queued jobs in dispatch order. Do not push or remove while iterating."""
        self._promote()
        for seq in itertools.chain(self._fast, self._slow):
            yield self._by_seq[seq]

    def head(self, n: int) -> list[QueuedJob]:
        """The first ``n`` jobs in dispatch order."""
        return list(itertools.islice(self, n))

    def get(self, job_id: str) -> QueuedJob | None:
        return self._jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        """How many jobs are dispatched before this one (0: next); None if not queued."""
        self._promote()
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.seq in self._slow:
            return len(self._fast) + self._slow.rank(job.seq)
        return self._fast.rank(job.seq)

    def is_promoted(self, job_id: str) -> bool:
        """Whether this queued batch job has been promoted to the fast lane."""
        self._promote()
        job = self._jobs.get(job_id)
        return job is not None and job.priority == "batch" and job.seq in self._fast

    def depths(self) -> QueueDepths:
        self._promote()
        promoted = len(self._batch) - len(self._slow)
        return QueueDepths(
            interactive=len(self._fast) - promoted, promoted=promoted, batch=len(self._slow)
        )

    # -- changes ---------------------------------------------------------------------------

    def push(
        self,
        job_id: str,
        priority: Priority = "interactive",
        *,
        model: str = "",
        placement: Placement | None = None,
        seq: int | None = None,
        since: float | None = None,
        force: bool = False,
        embedding: bool = False,
    ) -> Pushed:
        """Queue a job and tell where it stands.

        ``seq`` defaults to one more than any seq seen; ``since`` to ``clock()``.
        Raises :class:`QueueFullError` (the job is not queued) when the queue is full and the
        policy cannot make room, :class:`JobExistsError` when ``job_id`` is already queued,
        and ValueError for a ``seq`` already in use.
        """
        if priority not in ("interactive", "batch"):
            raise ValueError(f"unknown priority {priority!r}")
        if job_id in self._jobs:
            raise JobExistsError(f"job {job_id} is already queued")
        if seq is None:
            seq = self._next_seq
        elif seq in self._by_seq:
            raise ValueError(f"seq {seq} is already queued")
        now = self._clock()
        job = QueuedJob(job_id=job_id, priority=priority, seq=seq,
                        since=now if since is None else since, model=model, placement=placement,
                        embedding=embedding)
        self._promote(now)
        dropped = None
        if not force and len(self._jobs) >= self.capacity:
            oldest = self._batch.first()
            if self.policy == "reject" or oldest is None:
                raise QueueFullError(
                    f"the queue is full ({len(self._jobs)} of {self.capacity} jobs)",
                    retry_after_s=self.retry_after_s,
                    details={"capacity": self.capacity, "policy": self.policy},
                )
            dropped = self._by_seq[oldest]
            self._discard(dropped)
        self._next_seq = max(self._next_seq, seq + 1)
        self._jobs[job_id] = job
        self._by_seq[seq] = job
        if priority == "batch":
            self._batch.add(seq)
            if self._due(job, now):
                self._fast.add(seq)
            else:
                self._slow.add(seq)
                heapq.heappush(self._waiting, (job.since, seq, job_id))
        else:
            self._fast.add(seq)
        position = self.position(job_id)
        assert position is not None
        return Pushed(job=job, position=position, dropped=dropped)

    def pop_next(self, accept: Callable[[QueuedJob], bool] | None = None) -> QueuedJob | None:
        """Remove and return the first job in dispatch order that ``accept`` takes.

        ``accept`` (for example "some worker with a free slot holds this model") is called
        on jobs in dispatch order until it returns True; jobs it refuses keep their places.
        Returns None when no queued job is accepted.
        """
        chosen = None
        for job in self:
            if accept is None or accept(job):
                chosen = job
                break
        if chosen is not None:
            self._discard(chosen)
        return chosen

    def remove(self, job_id: str) -> QueuedJob | None:
        """Take a job out of the queue (cancel); None when it is not queued."""
        job = self._jobs.get(job_id)
        if job is not None:
            self._discard(job)
        return job

    # -- internals -------------------------------------------------------------------------

    def _due(self, job: QueuedJob, now: float) -> bool:
        return self.promote_after_s is not None and now - job.since > self.promote_after_s

    def _discard(self, job: QueuedJob) -> None:
        del self._jobs[job.job_id]
        del self._by_seq[job.seq]
        if job.priority == "batch":
            self._batch.remove(job.seq)
            if job.seq in self._slow:
                self._slow.remove(job.seq)
                # The heap entry goes stale; compact once stale entries dominate.
                if len(self._waiting) > 64 and len(self._waiting) > 2 * len(self._slow):
                    self._waiting = [
                        (self._by_seq[s].since, s, self._by_seq[s].job_id) for s in self._slow
                    ]
                    heapq.heapify(self._waiting)
                return
        self._fast.remove(job.seq)

    def _promote(self, now: float | None = None) -> None:
        if self.promote_after_s is None or not self._waiting:
            return
        if now is None:
            now = self._clock()
        waiting = self._waiting
        while waiting and now - waiting[0][0] > self.promote_after_s:
            since, seq, job_id = heapq.heappop(waiting)
            job = self._by_seq.get(seq)
            if job is None or (job.job_id, job.since) != (job_id, since) or seq not in self._slow:
                continue  # removed (or pushed again) since this entry was made
            self._slow.remove(seq)
            self._fast.add(seq)
