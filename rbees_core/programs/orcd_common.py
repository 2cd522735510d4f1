"""What every route module of rbees-orcd needs from a request: the service and a path id.

Route modules (:mod:`.orcd_api`, :mod:`.orcd_openai`, :mod:`.orcd_pools`) import this and the
service's facade (:class:`~rbees_core.orchestrator.service.OrchestratorService`), never one
another; the app factory (:func:`rbees_core.programs.orcd.create_app`) imports them all.
"""

from __future__ import annotations

from starlette.requests import Request

from rbees_core.api.common import ID_PATTERN
from rbees_core.orchestrator.service import OrchestratorService
from rbees_core.schema import check_string


def service(request: Request) -> OrchestratorService:
    """The service the app was made with (``app.state.orcd``)."""
    svc: OrchestratorService = request.app.state.orcd
    return svc


def path_id(request: Request, name: str) -> str:
    """The path parameter ``name``, checked against the id rule. Raises
    :class:`~rbees_core.errors.InvalidParamsError` naming it."""
    value = str(request.path_params[name])
    check_string(value, name, {"pattern": ID_PATTERN})
    return value
