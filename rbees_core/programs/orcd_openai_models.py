"""rbees-orcd's ``GET /v1/models`` and ``GET /v1/models/{id}``, OpenAI's model objects.

The list holds every model the cluster knows (the service's
:meth:`~rbees_core.orchestrator.service.OrchestratorService.model_states`), each with a
``status`` beside OpenAI's fields: ``loaded`` (a worker serves it now), ``downloaded`` (a pool
holds it; the first job starts a worker) or ``not_on_any_pool`` (only in the catalog).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from rbees_core.api import openapi
from rbees_core.programs.openai_errors import OpenAIError
from rbees_core.programs.orcd_common import service


def _model_object(model_id: str, state: str) -> dict[str, Any]:
    """OpenAI's model object, with ``status``: ``loaded``, ``downloaded`` or
    ``not_on_any_pool`` (:meth:`~rbees_core.orchestrator.service.OrchestratorService.
    model_states`)."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "rbees",
            "status": state}


async def models(request: Request) -> Response:
    data = [_model_object(i, state) for i, state in service(request).model_states().items()]
    return JSONResponse({"object": "list", "data": data})


async def model(request: Request) -> Response:
    model_id = str(request.path_params["model_id"])
    state = service(request).model_state(model_id)
    if state is None:
        return OpenAIError(404, f"The model {model_id!r} does not exist", param="model",
                           code="model_not_found", kind="invalid_request_error").response()
    return JSONResponse(_model_object(model_id, state))


OPERATIONS = [
    openapi.Operation("GET", "/v1/models", "models, OpenAI style, with status",
                      scope="jobs"),
    openapi.Operation("GET", "/v1/models/{model_id}", "one model, OpenAI style", scope="jobs",
                      errors={"404": "model_not_found (OpenAI error shape)"}),
]


def routes() -> list[BaseRoute]:
    return [
        Route("/v1/models", models, methods=["GET"]),
        # ids may hold "/" and ":" (hf:org/repo/file.gguf, pkg:...)
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
    ]
