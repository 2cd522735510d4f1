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
from rbees_core.api.pool import DownloadRequest, WorkerStarted, WorkerStartRequest
from rbees_core.api.worker import Accepted
from rbees_core.errors import ConflictError, HostUnreachableError, NotFoundError, TransportError
from rbees_core.http import read_json
from rbees_core.log import correlation_id
from rbees_core.orchestrator.registry import PoolEntry
from rbees_core.orchestrator.service import OrchestratorService
from rbees_core.schema import to_dict
from rbees_core.sse import json_frame

POOL_TIMEOUT_S = 30.0


def _pool(request: Request) -> tuple[OrchestratorService, PoolEntry]:
    from rbees_core.programs.orcd import _path_id, _svc

    pool_id = _path_id(request, "pool_id")
    svc = _svc(request)
    entry = svc.registry.pools.get(pool_id)
    if entry is None:
        raise NotFoundError(f"no pool {pool_id!r}", details={"pool_id": pool_id})
    if not entry.state.url:
        raise ConflictError(f"pool {pool_id} registered no URL to reach it by",
                            details={"pool_id": pool_id})
    return svc, entry


def _unreachable(entry: PoolEntry, exc: httpx.HTTPError) -> HostUnreachableError:
    return HostUnreachableError(
        f"pool {entry.pool_id} at {entry.state.url} did not answer: {type(exc).__name__}",
        details={"pool_id": entry.pool_id})


def _relay(entry: PoolEntry, answer: httpx.Response) -> Response:
    """The pool's answer as ours: 202 with its body, or its error envelope and status."""
    try:
        body: Any = answer.json()
    except ValueError:
        body = None
    if answer.status_code < 400:
        return JSONResponse(body, status_code=202)
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        raise TransportError(f"pool {entry.pool_id} answered {answer.status_code} without an "
                             "error envelope", details={"pool_id": entry.pool_id})
    headers = {"X-Correlation-Id": correlation_id.get()}
    if "retry-after" in answer.headers:
        headers["Retry-After"] = answer.headers["retry-after"]
    return JSONResponse(body, status_code=answer.status_code, headers=headers)


async def _post(svc: OrchestratorService, entry: PoolEntry, path: str,
                body: dict[str, Any] | None = None) -> httpx.Response:
    try:
        return await svc._client.post(f"{entry.state.url}{path}", json=body,
                                      headers=svc._auth(), timeout=POOL_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise _unreachable(entry, exc) from exc


async def start_worker(request: Request) -> Response:
    svc, entry = _pool(request)
    req = await read_json(request, WorkerStartRequest)
    answer = await _post(svc, entry, "/v2/workers/start", to_dict(req))
    if answer.status_code == 202:
        svc.log.info("worker_start_forwarded", pool_id=entry.pool_id, model=req.model_ref,
                     device=req.device, worker_id=answer.json().get("worker_id"))
    return _relay(entry, answer)


async def stop_worker(request: Request) -> Response:
    from rbees_core.programs.orcd import _path_id

    svc, entry = _pool(request)
    worker_id = _path_id(request, "worker_id")
    answer = await _post(svc, entry, f"/v2/workers/{worker_id}/stop")
    if answer.status_code < 400:
        worker = entry.workers.get(worker_id)
        if worker is not None:  # no new jobs for it before the pool's next heartbeat says so
            worker["state"] = "stopping"
        svc.log.info("worker_stop_forwarded", pool_id=entry.pool_id, worker_id=worker_id)
    return _relay(entry, answer)


class _DownloadStream:
    """The pool's download SSE, frame by frame; closing it stops reading from the pool."""

    def __init__(self, entry: PoolEntry, answer: httpx.Response) -> None:
        self.entry, self.answer = entry, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        try:
            async for chunk in self.answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            frame = json_frame(0, "error", {"code": "HOST_UNREACHABLE", "retriable": True,
                                           "message": _unreachable(self.entry, exc).message})
            await send({"type": "http.response.body", "body": frame.encode(),
                        "more_body": True})
        finally:
            await self.answer.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def download_model(request: Request) -> Response:
    svc, entry = _pool(request)
    req = await read_json(request, DownloadRequest)
    outgoing = svc._client.build_request(
        "POST", f"{entry.state.url}/v2/models/download", json=to_dict(req),
        headers=svc._auth(), timeout=httpx.Timeout(POOL_TIMEOUT_S, read=None))
    try:
        answer = await svc._client.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        raise _unreachable(entry, exc) from exc
    if answer.status_code != 200:
        try:
            await answer.aread()
        except httpx.HTTPError as exc:
            raise _unreachable(entry, exc) from exc
        finally:
            await answer.aclose()
        return _relay(entry, answer)
    svc.log.info("download_forwarded", pool_id=entry.pool_id, model=req.model)
    return _DownloadStream(entry, answer)  # type: ignore[return-value]


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
]


def routes() -> list[BaseRoute]:
    return [
        Route("/v2/pools/{pool_id}/workers", start_worker, methods=["POST"]),
        Route("/v2/pools/{pool_id}/workers/{worker_id}/stop", stop_worker, methods=["POST"]),
        Route("/v2/pools/{pool_id}/models/download", download_model, methods=["POST"]),
    ]

