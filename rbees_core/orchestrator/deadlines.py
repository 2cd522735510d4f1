"""Start deadlines of queued jobs (``deadline_ms``), in one heap: no timer per job.

Admission (and recovery after a restart) adds a job's deadline, the time (seconds since the
epoch, the queue's clock) by which it must have started; the dispatcher's loop sleeps no
longer than until the earliest one (:meth:`Deadlines.next_in`) and ends each job still
queued at its deadline with ``DEADLINE_UNMET`` (:meth:`Deadlines.due`). A job that started,
was cancelled or ended otherwise is not removed: its entry is skipped when it comes due, and
the heap is rebuilt from the jobs still waiting once it is large (:meth:`compact`). Costs:
adding and taking O(log n); the loop's check O(1).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container

#: rebuild the heap from the jobs still queued when it holds more entries than this
_COMPACT_AT = 1024


class Deadlines:
    """``(deadline, job_id)`` of queued jobs. Owned by the dispatcher; one thread."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._at: dict[str, float] = {}  # the live entry of each job

    def __len__(self) -> int:
        return len(self._at)

    def add(self, job_id: str, at: float) -> None:
        """Job ``job_id`` must start by ``at`` (seconds since the epoch)."""
        self._at[job_id] = at
        heapq.heappush(self._heap, (at, job_id))

    def get(self, job_id: str) -> float | None:
        return self._at.get(job_id)

    def next_in(self, now: float) -> float | None:
        """Seconds until the earliest deadline (0 when past), None when there is none."""
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - now)

    def due(self, now: float, queued: Container[str],
            hold: Callable[[str], bool] | None = None) -> list[tuple[str, float]]:
        """Take out and return ``(job_id, deadline)`` of every job in ``queued`` whose
        deadline has passed; entries of jobs no longer queued are dropped. A job for which
        ``hold`` is true (its admission is still being written) stays for the next call."""
        out: list[tuple[str, float]] = []
        held: list[tuple[float, str]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, job_id = heapq.heappop(heap)
            if self._at.get(job_id) != at:
                continue  # superseded
            if job_id not in queued:
                del self._at[job_id]
                continue
            if hold is not None and hold(job_id):
                held.append((at, job_id))
                continue
            del self._at[job_id]
            out.append((job_id, at))
        for entry in held:
            heapq.heappush(heap, entry)
        return out

    def compact(self, queued: Container[str]) -> None:
        """Forget the jobs no longer queued once the heap holds more than a thousand
        entries (called by the dispatcher's loop every few seconds)."""
        if len(self._heap) <= _COMPACT_AT:
            return
        self._at = {job_id: at for job_id, at in self._at.items() if job_id in queued}
        self._heap = [(at, job_id) for job_id, at in self._at.items()]
        heapq.heapify(self._heap)
