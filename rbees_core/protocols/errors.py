"""Protocol-neutral errors of rbees-orcd's client protocols: what went wrong, as a status.

Every client protocol answers its errors in its own shape (OpenAI's ``{"error": {message,
type, param, code}}``, Anthropic's ``{"type": "error", "error": {type, message}}``, ...);
the decision which status an rbees error or a job's terminal ``error`` event is belongs to
no protocol, and lives here: :func:`from_rbees` and :func:`job_error` make a
:class:`RequestError` that each protocol renders (:meth:`RequestError.response` with its
own ``body``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from rbees_core.errors import InvalidParamsError, RbeesError
from rbees_core.http import openai_error_body, parse_json, read_body

#: Job error codes (a job's terminal ``error`` event) that mean "try again later": 503.
UNAVAILABLE = frozenset({"MODEL_LOAD_FAILED", "WORKER_FAILED", "ORCHESTRATOR_RESTARTED",
                         "ALL_SLOTS_BUSY", "DRAINING", "NOT_READY", "DEADLINE_UNMET"})

#: How a protocol shapes an error body: (status, message, code, field) -> JSON object.
ErrorBody = Callable[["RequestError"], dict[str, Any]]


class RequestError(Exception):
    """An error answer, protocol-neutral: ``status``, ``message``, the request ``field`` it
    is about (or None), rbees' ``code`` (``MODEL_NOT_FOUND``, ``INVALID_PARAMS``, ... or
    None for a protocol's own check) and, for 429 and 503, ``retry_after_s``.

    Raised by the helpers of :mod:`rbees_core.protocols` and by protocols' request checks;
    a protocol turns it into its answer with :meth:`response` and its body shape."""

    def __init__(self, status: int, message: str, *, field: str | None = None,
                 code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.code = status, message, field, code
        self.retry_after_s = retry_after_s

    def response(self, body: ErrorBody) -> JSONResponse:
        """The answer: ``body(self)`` with this status, ``Retry-After`` on 429 and 503."""
        headers = {"Retry-After": str(self.retry_after_s)} if self.status in (429, 503) \
            else None
        return JSONResponse(body(self), status_code=self.status, headers=headers)


def openai_body(error: RequestError) -> dict[str, Any]:
    """``error`` in OpenAI's shape ``{"error": {message, type, param, code}}``, for the
    protocols that answer as OpenAI does (chat completions, Responses): codes in lower case,
    a missing model an ``invalid_request_error``, a cancelled job and a worker's failure
    ``server_error`` s, otherwise the type of the status."""
    code = error.code.lower() if error.code else None
    body = openai_error_body(error.status, error.message, code=code, param=error.field)
    if code == "model_not_found":
        body["error"]["type"] = "invalid_request_error"
    elif error.status == 499:
        body["error"]["type"] = "server_error"
    return body


def invalid(field: str, message: str) -> RequestError:
    """A 400 about the request field ``field`` (a protocol's own check: no code)."""
    return RequestError(400, message, field=field)


def from_rbees(exc: RbeesError) -> RequestError:
    """The answer for an error rbees raised while admitting a job (404 ``MODEL_NOT_FOUND``,
    429 ``QUEUE_FULL``, 400 ``INVALID_PARAMS`` naming its field, 413 ...)."""
    if exc.code == "MODEL_NOT_FOUND":
        return RequestError(exc.status, exc.message, field="model", code=exc.code)
    return RequestError(exc.status, exc.message, field=exc.details.get("field"),
                        code=exc.code, retry_after_s=int(getattr(exc, "retry_after_s", 1) or 1))


def from_invalid(exc: InvalidParamsError) -> RequestError:
    """A request check's :class:`InvalidParamsError` as a 400 naming its field (no code, as
    a protocol's own checks)."""
    return RequestError(400, exc.message, field=exc.field)


def job_error(data: dict[str, Any]) -> RequestError:
    """The answer for a job that ended with the ``error`` event ``data``: 400 for what the
    request holds (a template that refused the messages: ``INVALID_PARAMS`` naming the
    task's field), 429 for a job dropped from a full queue, 503 for a cluster that could not
    run it now (the model failed to load, the worker died, the job waited longer than the
    queue allows: ``Retry-After`` from the event's ``retry_after_ms``), 499 for a cancelled
    one, 502 for any other failure of the worker. ``NO_CAPACITY`` (never placeable, not
    retried): 404 ``MODEL_NOT_FOUND`` when no pool holds the model and no source can
    download it, else 400 ``NO_CAPACITY`` (it fits no device)."""
    code = str(data.get("code") or "WORKER_ERROR")
    message = str(data.get("message") or code)
    if code == "INVALID_PARAMS":
        field = data.get("field")
        return RequestError(400, message, field=field if isinstance(field, str) else None,
                            code=code)
    if code == "QUEUE_FULL_DROPPED":
        return RequestError(429, message, code=code)
    if code == "MODEL_NOT_FOUND" or (code == "NO_CAPACITY"
                                     and data.get("reason") == "unknown_model"):
        return RequestError(404, message, field="model", code="MODEL_NOT_FOUND")
    if code == "NO_CAPACITY":
        return RequestError(400, message, field="model", code=code)
    if code == "DEADLINE_UNMET" and isinstance(data.get("waited_ms"), int):
        # a protocol job's deadline is rbees-orcd's maximum queue wait
        message = (f"the request waited {data['waited_ms'] / 1000:.1f} s in the queue without "
                   "starting (the orchestrator's max_queue_wait_s); retry later")
    if code in UNAVAILABLE or data.get("retriable") is True:
        wait = data.get("retry_after_ms")
        retry_after_s = max(1, -(-int(wait) // 1000)) if isinstance(wait, int) else 1
        return RequestError(503, message, code=code, retry_after_s=retry_after_s)
    return RequestError(499 if code == "CANCELLED" else 502, message, code=code)


async def read_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body: what the shared parser refuses (no JSON, too deep, a
    lone surrogate, NaN), more than 1 MiB (413) and a body that is no object are
    :class:`RequestError` s."""
    try:
        data = parse_json(await read_body(request))
    except RbeesError as exc:
        raise from_rbees(exc) from exc
    if not isinstance(data, dict):
        raise RequestError(400, "the body must be a JSON object")
    return data


__all__ = ["UNAVAILABLE", "ErrorBody", "RequestError", "from_invalid", "from_rbees",
           "invalid", "job_error", "openai_body", "read_object"]
