"""Errors raised by orchestrator-core, and the job error codes it writes.

They extend the kernel tree (:mod:`rbees_core.errors`)::

    UnavailableError
    +-- QueueFullError          QUEUE_FULL            429 (retriable, Retry-After)
    NotFoundError
    +-- JobNotFoundError        JOB_NOT_FOUND         404
    ConflictError
    +-- JobExistsError          JOB_EXISTS            409
    +-- InvalidTransitionError  INVALID_TRANSITION    409
    RbeesError
    +-- StoreError              STORE_ERROR           500

The ``*_CODE`` constants are codes that end up in a job's ``error`` and its terminal
``error`` event rather than in an HTTP answer.
"""

from __future__ import annotations

from typing import Any

from rbees_core.errors import ConflictError, NotFoundError, RbeesError, UnavailableError

#: The job was evicted by the ``drop-oldest-batch`` policy to admit a newer one.
QUEUE_FULL_DROPPED = "QUEUE_FULL_DROPPED"
#: The job had not started when its ``deadline_ms`` passed (not retriable: the deadline is
#: the client's; ``retry_after_ms`` in the event is the queue's estimate).
DEADLINE_UNMET = "DEADLINE_UNMET"
#: The orchestrator restarted while the job was producing tokens.
ORCHESTRATOR_RESTARTED = "ORCHESTRATOR_RESTARTED"


class QueueFullError(UnavailableError):
    """The queue is at capacity and its policy refused the job (CONTRACT section 5).

    Raised by :meth:`rbees_core.orchestrator.queue.JobQueue.push`; the job was not queued.
    ``retry_after_s`` is the queue's hint, sent as ``Retry-After`` and
    ``details.retry_after_ms``.
    """

    code = "QUEUE_FULL"
    status = 429

    def __init__(self, message: str, *, retry_after_s: int = 1,
                 details: dict[str, Any] | None = None) -> None:
        # An instance value shadows the class default that rbees_core.http reads.
        self.retry_after_s = retry_after_s  # type: ignore[misc]
        super().__init__(message, details={"retry_after_ms": retry_after_s * 1000,
                                           **(details or {})})


class JobNotFoundError(NotFoundError):
    """No job has this id."""

    code = "JOB_NOT_FOUND"


class JobExistsError(ConflictError):
    """A job with this id was already admitted."""

    code = "JOB_EXISTS"


class InvalidTransitionError(ConflictError):
    """The job's state machine does not allow this change (or the event after a final one)."""

    code = "INVALID_TRANSITION"


class StoreError(RbeesError):
    """The state database cannot be used: newer schema than this code, I/O error, closed."""

    code = "STORE_ERROR"
