"""orchestrator-core: the queue, the state store and the job model behind rbees-orcd.

Pure library code, no HTTP server. Its rooms, each named for its concept:

- ``service.py``: the facade rbees-orcd's routes use (``submit``, ``follow``, ``call_pool`` ...)
- ``book.py``: the state the parts below share (channels, runs, admitted jobs, the version)
- ``admission.py`` (submit, withdraw, cancel), ``dispatcher.py`` (snapshot -> policy ->
  claim -> record), ``runner.py`` (one running job), ``pool_control.py`` (heartbeats,
  worker start/stop through the pool client, idle stops)
- ``store.py`` and ``store_writes.py`` (SQLite, one writer thread: ``_writer.py``),
  ``migrations.py``, ``queue.py``, ``registry.py``, ``channel.py``, ``upstream.py`` (the
  workers' HTTP), ``metrics.py``, ``jobs.py`` and ``errors.py``

The service admits a job like this (one event loop)::

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
