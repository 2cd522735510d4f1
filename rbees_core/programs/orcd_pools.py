"""rbees-orcd's hand on the pools: start and stop workers, download models, by hand.

The scheduler starts and stops workers on its own; these endpoints let an operator (the web
UI, a script) do it explicitly. Each forwards to the pool's own pool-managerd API at the URL
the pool registered with, with the orchestrator's token and the request's correlation id,
and answers with the pool's answer: 202 and its body, or its error envelope and status.
"""

from __future__ import annotations

from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from rbees_core.api import openapi
from rbees_core.api.pool import (
    DownloadRequest,
    RetryRequest,
    WorkerStarted,
    WorkerStartRequest,
)
from rbees_core.api.worker import Accepted
from rbees_core.errors import TransportError
from rbees_core.http import read_json
from rbees_core.log import correlation_id
from rbees_core.orchestrator.pool_control import unreachable
from rbees_core.orchestrator.service import OrchestratorService
from rbees_core.programs.orcd_common import path_id, service
from rbees_core.schema import to_dict
from rbees_core.sse import json_frame


def _pool(request: Request) -> tuple[OrchestratorService, str]:
    """The service and the pool the path names, once known to be reachable (404 for an
    unknown pool, 409 for one that registered no URL: before the body is read)."""
    pool_id = path_id(request, "pool_id")
    svc = service(request)
    svc.pool_url(pool_id)
    return svc, pool_id


def _relay(pool_id: str, answer: httpx.Response) -> Response:
    """The pool's answer as ours: 202 with its body, or its error envelope and status."""
    try:
        body: Any = answer.json()
    except ValueError:
        body = None
    if answer.status_code < 400:
        return JSONResponse(body, status_code=202)
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        raise TransportError(f"pool {pool_id} answered {answer.status_code} without an "
                             "error envelope", details={"pool_id": pool_id})
    headers = {"X-Correlation-Id": correlation_id.get()}
    if "retry-after" in answer.headers:
        headers["Retry-After"] = answer.headers["retry-after"]
    return JSONResponse(body, status_code=answer.status_code, headers=headers)


async def start_worker(request: Request) -> Response:
    svc, pool_id = _pool(request)
    req = await read_json(request, WorkerStartRequest)
    answer = await svc.call_pool(pool_id, "POST", "/v2/workers/start", to_dict(req))
    if answer.status_code == 202:
        svc.log.info("worker_start_forwarded", pool_id=pool_id, model=req.model_ref,
                     device=req.device, worker_id=answer.json().get("worker_id"))
    return _relay(pool_id, answer)


async def stop_worker(request: Request) -> Response:
    svc, pool_id = _pool(request)
    worker_id = path_id(request, "worker_id")
    answer = await svc.call_pool(pool_id, "POST", f"/v2/workers/{worker_id}/stop")
    if answer.status_code < 400:
        svc.worker_stopping(pool_id, worker_id)
        svc.log.info("worker_stop_forwarded", pool_id=pool_id, worker_id=worker_id)
    return _relay(pool_id, answer)


class _DownloadStream:
    """The pool's download SSE, frame by frame; closing it stops reading from the pool."""

    def __init__(self, pool_id: str, url: str, answer: httpx.Response) -> None:
        self.pool_id, self.url, self.answer = pool_id, url, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        try:
            async for chunk in self.answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            message = unreachable(self.pool_id, self.url, exc).message
            frame = json_frame(0, "error", {"code": "HOST_UNREACHABLE", "retriable": True,
                                           "message": message})
            await send({"type": "http.response.body", "body": frame.encode(),
                        "more_body": True})
        finally:
            await self.answer.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def download_model(request: Request) -> Response:
    svc, pool_id = _pool(request)
    req = await read_json(request, DownloadRequest)
    url = svc.pool_url(pool_id)
    answer = await svc.call_pool(pool_id, "POST", "/v2/models/download", to_dict(req),
                                 stream=True)
    if answer.status_code != 200:
        try:
            await answer.aread()
        except httpx.HTTPError as exc:
            raise unreachable(pool_id, url, exc) from exc
        finally:
            await answer.aclose()
        return _relay(pool_id, answer)
    svc.log.info("download_forwarded", pool_id=pool_id, model=req.model)
    return _DownloadStream(pool_id, url, answer)  # type: ignore[return-value]


async def retry_model(request: Request) -> Response:
    """Clear a model's failed marks on one pool or all: each pool's answer, or its error."""
    req = await read_json(request, RetryRequest)
    pools = await service(request).retry_model(req.model, req.pool)
    return JSONResponse({"model": req.model, "pools": pools})


_ERRORS = {"404": "no such pool, or the pool's MODEL_NOT_FOUND", "400": "bad id or body",
           "409": "the pool registered no URL, or its preflight refused",
           "502": "HOST_UNREACHABLE: the pool did not answer"}

OPERATIONS = [
    openapi.Operation("POST", "/v2/pools/{pool_id}/workers",
                      "start a worker on a pool (forwarded to its POST /v2/workers/start)",
                      request=WorkerStartRequest, response=WorkerStarted, status=202,
                      errors={**_ERRORS, "409": "INSUFFICIENT_VRAM, INSUFFICIENT_RAM, "
                              "BACKEND_UNAVAILABLE, or the pool registered no URL"}),
    openapi.Operation("POST", "/v2/pools/{pool_id}/workers/{worker_id}/stop",
                      "stop a pool's worker (forwarded to its POST /v2/workers/{id}/stop)",
                      response=Accepted, status=202,
                      errors={**_ERRORS, "404": "no such pool or worker"}),
    openapi.Operation("POST", "/v2/pools/{pool_id}/models/download",
                      "download a model on a pool: the pool's SSE progress, relayed",
                      request=DownloadRequest, sse=True, errors=_ERRORS),
    openapi.Operation("POST", "/v2/models/retry",
                      "clear a model's failed mark on a pool (body `pool`) or on every pool, "
                      "so that workers may be started for it again: {model, pools: [{pool_id, "
                      "cleared} | {pool_id, error}]}", request=RetryRequest,
                      errors={"404": "no such pool", "400": "bad body"}),
]


def routes() -> list[BaseRoute]:
    return [
        Route("/v2/pools/{pool_id}/workers", start_worker, methods=["POST"]),
        Route("/v2/pools/{pool_id}/workers/{worker_id}/stop", stop_worker, methods=["POST"]),
        Route("/v2/pools/{pool_id}/models/download", download_model, methods=["POST"]),
        Route("/v2/models/retry", retry_model, methods=["POST"]),
    ]

