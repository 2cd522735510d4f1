"""Errors of rbees-orcd's OpenAI-compatible routes, in OpenAI's shape.

Every answer of a ``/v1`` route that is an error is ``{"error": {message, type, param,
code}}``: those of the route modules (:mod:`.orcd_openai`, :mod:`.orcd_openai_models`) come
from :class:`OpenAIError`; those the middleware and the router answer (401, 404, 405, 500)
from :func:`rbees_core.http.openai_error_body`. :func:`from_rbees` maps an error rbees raised
(admission's 404 ``MODEL_NOT_FOUND``, 429 ``QUEUE_FULL``) and :func:`job_error` a job's
terminal ``error`` event.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from rbees_core.errors import RbeesError
from rbees_core.http import openai_error_body, parse_json, read_body


class OpenAIError(Exception):
    """An error answer in OpenAI's shape (``{"error": {message, type, param, code}}``);
    ``Retry-After`` goes with 429 and 503."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str | None = None,
                 retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or openai_error_body(status, "")["error"]["type"]
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.status in (429, 503) \
            else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_rbees(exc: RbeesError) -> OpenAIError:
    if exc.code == "MODEL_NOT_FOUND":  # as OpenAI words it
        return OpenAIError(exc.status, exc.message, param="model", code="model_not_found",
                           kind="invalid_request_error")
    return OpenAIError(exc.status, exc.message, param=exc.details.get("field"),
                       code=exc.code.lower(),
                       retry_after_s=int(getattr(exc, "retry_after_s", 1) or 1))


#: Job error codes (a job's terminal ``error`` event) that mean "try again later": 503.
_UNAVAILABLE = frozenset({"MODEL_LOAD_FAILED", "WORKER_FAILED", "ORCHESTRATOR_RESTARTED",
                          "ALL_SLOTS_BUSY", "DRAINING", "NOT_READY", "DEADLINE_UNMET"})


async def read_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body, for the ``/v1`` handlers: what the shared parser
    refuses (no JSON, too deep, a lone surrogate, NaN) and a body that is no object are
    :class:`OpenAIError` 400s."""
    try:
        data = parse_json(await read_body(request))
    except RbeesError as exc:
        raise from_rbees(exc) from exc
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    return data


def job_error(data: dict[str, Any]) -> OpenAIError:
    """The answer for a job that ended with the ``error`` event ``data``: 400 for what the
    request holds (a template that refused the messages), 429 for a job dropped from a full
    queue, 503 for a cluster that could not run it now (the model failed to load, the
    worker died, the job waited longer than the queue allows: ``Retry-After`` from the
    event's ``retry_after_ms``), 499 for a cancelled one, 502 for any other failure of the
    worker. ``NO_CAPACITY`` (never placeable, not retried): 404 ``model_not_found`` when no
    pool holds the model and no source can download it, else 400 ``no_capacity`` (it fits
    no device)."""
    code = str(data.get("code") or "WORKER_ERROR")
    message = str(data.get("message") or code)
    if code == "INVALID_PARAMS":
        return OpenAIError(400, message, param=_param(data.get("field")),
                           code="invalid_params")
    if code == "QUEUE_FULL_DROPPED":
        return OpenAIError(429, message, code=code.lower())
    if code == "MODEL_NOT_FOUND":
        return OpenAIError(404, message, param="model", code="model_not_found",
                           kind="invalid_request_error")
    if code == "NO_CAPACITY":
        if data.get("reason") == "unknown_model":
            return OpenAIError(404, message, param="model", code="model_not_found",
                               kind="invalid_request_error")
        return OpenAIError(400, message, param="model", code="no_capacity")
    if code == "DEADLINE_UNMET" and isinstance(data.get("waited_ms"), int):
        # a /v1 job's deadline is rbees-orcd's maximum queue wait
        message = (f"the request waited {data['waited_ms'] / 1000:.1f} s in the queue without "
                   "starting (the orchestrator's max_queue_wait_s); retry later")
    if code in _UNAVAILABLE or data.get("retriable") is True:
        wait = data.get("retry_after_ms")
        retry_after_s = max(1, -(-int(wait) // 1000)) if isinstance(wait, int) else 1
        return OpenAIError(503, message, code=code.lower(), retry_after_s=retry_after_s)
    return OpenAIError(499 if code == "CANCELLED" else 502, message, code=code.lower(),
                       kind="server_error")


def _param(field: Any) -> Any:
    """The OpenAI request field a worker's INVALID_PARAMS ``field`` stands for."""
    return "response_format" if field == "json_schema" else field


__all__ = ["OpenAIError", "from_rbees", "job_error"]
