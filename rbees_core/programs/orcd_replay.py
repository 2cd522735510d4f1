"""rbees-orcd's decision replay routes: the recorded decisions with the snapshots they were
made from, and one job's decisions re-decided by another policy.

``GET /v2/decisions`` (``read``) pages through what is kept
(:mod:`rbees_core.orchestrator.decisions`): ``rbees scheduler replay`` reads it and re-decides
on the CLI's machine, with any policy or script there. ``GET /v2/tasks/{id}/replay?policy=``
(the job's viewers) re-decides one job here with a registered policy: the web UI's ``why``.
"""

from __future__ import annotations

import math

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from rbees_core.api import openapi
from rbees_core.errors import InvalidParamsError
from rbees_core.http import json_response
from rbees_core.programs.orcd_common import path_id, service


def _number(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise InvalidParamsError(name, "must be a time in Unix seconds")
    return value


async def list_decisions(request: Request) -> Response:
    limit_raw = request.query_params.get("limit", "200")
    if not (limit_raw.isascii() and limit_raw.isdigit() and len(limit_raw) <= 6) \
            or not 1 <= int(limit_raw) <= 1000:
        raise InvalidParamsError("limit", "must be 1..1000")
    page = await service(request).recorded_decisions(
        since=_number(request, "since") or 0.0, until=_number(request, "until"),
        limit=int(limit_raw), cursor=request.query_params.get("cursor"))
    return json_response(page)


async def replay_task(request: Request) -> Response:
    job_id = path_id(request, "job_id")
    policy = request.query_params.get("policy") or None
    return json_response(await service(request).replay_job(job_id, policy))


OPERATIONS = [
    openapi.Operation("GET", "/v2/decisions", "recorded decisions with their snapshots, "
                      "oldest first (since, until, limit, cursor)", scope="read",
                      errors={"400": "bad since, until, limit or cursor"}),
    openapi.Operation("GET", "/v2/tasks/{job_id}/replay", "the job's recorded decisions "
                      "re-decided by another policy (policy=NAME; default: the first "
                      "installed that did not make its last decision)", scope="jobs",
                      errors={"404": "no such job or policy", "400": "bad id or policy"}),
]


def routes() -> list[BaseRoute]:
    return [Route("/v2/decisions", list_decisions, methods=["GET"]),
            Route("/v2/tasks/{job_id}/replay", replay_task, methods=["GET"])]
