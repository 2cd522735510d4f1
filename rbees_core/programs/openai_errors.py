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

from rbees_core import protocols
from rbees_core.errors import RbeesError
from rbees_core.http import openai_error_body
from rbees_core.protocols import RequestError


class OpenAIError(RequestError):
    """An error answer in OpenAI's shape (``{"error": {message, type, param, code}}``);
    ``Retry-After`` goes with 429 and 503."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str | None = None,
                 retry_after_s: int = 1) -> None:
        super().__init__(status, message, field=param, code=code, retry_after_s=retry_after_s)
        self.param = param
        self.kind = kind or openai_error_body(status, "")["error"]["type"]

    @classmethod
    def of(cls, error: RequestError) -> OpenAIError:
        """A protocol-neutral error (:mod:`rbees_core.protocols`) as OpenAI words it: codes
        in lower case, a missing model an ``invalid_request_error``, a cancelled job and a
        worker's failure ``server_error`` s."""
        if isinstance(error, OpenAIError):
            return error
        code = error.code.lower() if error.code else None
        kind = "invalid_request_error" if code == "model_not_found" else (
            "server_error" if error.status == 499 or error.status >= 500 else None)
        return cls(error.status, error.message, param=error.field, code=code,
                   kind=kind, retry_after_s=error.retry_after_s)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self, body: Any = None) -> JSONResponse:  # type: ignore[override]
        """The answer in OpenAI's shape (``body`` is ignored)."""
        return super().response(lambda _: self.body())


def from_rbees(exc: RbeesError) -> OpenAIError:
    """An error rbees raised while admitting a job, in OpenAI's words."""
    if exc.code == "MODEL_NOT_FOUND":
        return OpenAIError.of(protocols.from_rbees(exc))
    error = protocols.from_rbees(exc)
    return OpenAIError(error.status, error.message, param=error.field,
                       code=exc.code.lower(), retry_after_s=error.retry_after_s)


async def read_object(request: Request) -> dict[str, Any]:
    """The request's JSON object body, for the ``/v1`` handlers: what the shared parser
    refuses (no JSON, too deep, a lone surrogate, NaN) and a body that is no object are
    :class:`OpenAIError` 400s."""
    try:
        return await protocols.read_object(request)
    except RequestError as exc:
        raise OpenAIError.of(exc) from exc


def job_error(data: dict[str, Any]) -> OpenAIError:
    """The answer for a job that ended with the ``error`` event ``data``
    (:func:`rbees_core.protocols.job_error`) in OpenAI's shape: ``model_not_found`` for a
    model no pool holds and no source can download, ``no_capacity`` for one that fits no
    device, the job's code in lower case otherwise."""
    error = OpenAIError.of(protocols.job_error(data))
    error.param = error.field = _param(error.field)
    return error


def _param(field: Any) -> Any:
    """The OpenAI request field a worker's INVALID_PARAMS ``field`` stands for."""
    return "response_format" if field == "json_schema" else field


__all__ = ["OpenAIError", "from_rbees", "job_error"]
