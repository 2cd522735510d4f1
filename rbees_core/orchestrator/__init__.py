"""orchestrator-core: the queue, the state store and the job model behind rbees-orcd.

Pure library code, no HTTP. The daemon admits a job like this (one event loop)::

    job = new_job(request, correlation_id=cid)              # id, seed, prompt digest
    pushed = queue.push(job.job_id, job.priority, model=job.model,
                        placement=request.placement)        # QueueFullError -> 429
    try:
        record = await store.admit_async(job)               # durable before the 202
    except BaseException:
        queue.remove(job.job_id)
        raise
    if pushed.dropped is not None:                          # drop-oldest-batch
        await store.transition_async(pushed.dropped.job_id, "failed",
                                     error_code=QUEUE_FULL_DROPPED, ..., events=[("error", ...)])

Pushing before admitting makes the capacity check and the insertion one step of the loop;
the store applies writes in submission order, so a dispatcher that pops the job at once
still finds it admitted when it records the dispatch.

At start: ``recovery = store.recover()``, then push ``recovery.queued`` in order with
``since=job.created_at`` and ``force=True``.
"""

from __future__ import annotations

from rbees_core.orchestrator.errors import (
    ORCHESTRATOR_RESTARTED,
    QUEUE_FULL_DROPPED,
    InvalidTransitionError,
    JobExistsError,
    JobNotFoundError,
    QueueFullError,
    StoreError,
)
from rbees_core.orchestrator.jobs import (
    JobSpec,
    NewJob,
    RecoveredJob,
    Recovery,
    StoredEvent,
    new_job,
)
from rbees_core.orchestrator.queue import JobQueue, Pushed, QueueDepths, QueuedJob
from rbees_core.orchestrator.store import Store

__all__ = [
    "ORCHESTRATOR_RESTARTED",
    "QUEUE_FULL_DROPPED",
    "InvalidTransitionError",
    "JobExistsError",
    "JobNotFoundError",
    "JobQueue",
    "JobSpec",
    "NewJob",
    "Pushed",
    "QueueDepths",
    "QueueFullError",
    "QueuedJob",
    "RecoveredJob",
    "Recovery",
    "Store",
    "StoreError",
    "StoredEvent",
    "new_job",
]
