"""rbees-orcd's own API (CONTRACT section 5): jobs, pools, models and metrics.

``/v2/tasks`` admits, lists, follows (SSE), cancels and explains jobs; ``/v2/pools`` takes
the pools' heartbeats and shows them; ``/v2/models`` says where each catalog model is;
``/metrics`` is Prometheus. Every handler talks to the service's facade
(:class:`~rbees_core.orchestrator.service.OrchestratorService`) and nothing else of it.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from rbees_core.api import openapi
from rbees_core.api.common import Health
from rbees_core.api.orchestrator import JobList, JobRecord, TaskAccepted, TaskRequest
from rbees_core.api.pool import PoolHeartbeat
from rbees_core.api.worker import Accepted
from rbees_core.errors import InvalidParamsError, NotFoundError
from rbees_core.http import json_response, read_json
from rbees_core.orchestrator.channel import TERMINAL
from rbees_core.orchestrator.service import OrchestratorService, retrieved
from rbees_core.programs.orcd_common import path_id, service
from rbees_core.schema import to_dict
from rbees_core.sse import PING, Pinger, json_frame

PING_TEXT = PING.decode()


class JobEventStream:
    """SSE of one job: events after ``after`` (history), then live ones, until terminal."""

    def __init__(self, svc: OrchestratorService, job_id: str, after: int,
                 cancel_on_disconnect: bool) -> None:
        self.svc, self.job_id, self.after = svc, job_id, after
        self.cancel_on_disconnect = cancel_on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        svc, job_id = self.svc, self.job_id
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if self.cancel_on_disconnect:
                asyncio.create_task(svc.cancel(job_id)).add_done_callback(retrieved)

        watcher = asyncio.create_task(watch())
        try:
            following = await svc.follow(job_id, self.after)
            queue = following.live
            # a ping is the event named "" on the queue (no real event has that name)
            pinger = None if queue is None else Pinger(
                queue, (0, "", {}), svc.settings.sse_ping_interval_s)
            try:
                frames = [json_frame(*e) for e in following.backlog]
                done = following.done  # also when the client has seen everything already
                while True:
                    if frames:
                        await send({"type": "http.response.body",
                                    "body": "".join(frames).encode(), "more_body": True})
                        frames = []
                        if pinger is not None:
                            pinger.touch()
                    if done or gone.is_set() or queue is None:
                        break
                    item = await queue.get()
                    while True:
                        frames.append(json_frame(*item) if item[1] else PING_TEXT)
                        done = item[1] in TERMINAL
                        if done or queue.empty():
                            break
                        item = queue.get_nowait()
                if not gone.is_set():
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                if pinger is not None:
                    pinger.close()
                following.close()
        except OSError:
            pass
        finally:
            watcher.cancel()


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # "²".isdigit() too
        raise InvalidParamsError("Last-Event-ID", "must be a non-negative integer")
    return int(raw)


async def submit(request: Request) -> Response:
    req = await read_json(request, TaskRequest)
    accepted = await service(request).submit(req)
    return json_response(accepted, 202)


async def list_tasks(request: Request) -> Response:
    status = request.query_params.get("status")
    limit_raw = request.query_params.get("limit", "50")
    # ASCII digits, few of them: "²".isdigit(), and int() refuses 4,300 digits and more
    if not (limit_raw.isascii() and limit_raw.isdigit() and len(limit_raw) <= 6) \
            or not 1 <= int(limit_raw) <= 1000:
        raise InvalidParamsError("limit", "must be 1..1000")
    cursor = request.query_params.get("cursor")
    page = await service(request).jobs(status, limit=int(limit_raw), cursor=cursor)
    return json_response(to_dict(page))


async def get_task(request: Request) -> Response:
    record = await service(request).job(path_id(request, "job_id"))
    return json_response(to_dict(record))


async def task_events(request: Request) -> Response:
    job_id = path_id(request, "job_id")
    svc = service(request)
    after = _last_event_id(request)
    asked = await svc.cancels_on_disconnect(job_id)  # unknown job: 404 first
    cancel_on_disconnect = asked or \
        request.query_params.get("cancel_on_disconnect") in ("1", "true")
    return JobEventStream(svc, job_id, after, cancel_on_disconnect)  # type: ignore[return-value]


async def cancel_task(request: Request) -> Response:
    job_id = path_id(request, "job_id")
    changed = await service(request).cancel(job_id)
    return json_response(Accepted(job_id=job_id), 202 if changed else 200)


async def task_decision(request: Request) -> Response:
    return json_response(await service(request).decision(path_id(request, "job_id")))


async def list_pools(request: Request) -> Response:
    return json_response({"pools": service(request).pool_records()})


async def get_pool(request: Request) -> Response:
    return json_response(service(request).pool_record(path_id(request, "pool_id")))


async def heartbeat(request: Request) -> Response:
    pool_id = path_id(request, "pool_id")
    beat = await read_json(request, PoolHeartbeat)
    if beat.pool_id != pool_id:
        raise InvalidParamsError("pool_id", "does not match the URL")
    service(request).heartbeat(beat)
    return json_response({"ok": True})


async def deregister(request: Request) -> Response:
    pool_id = path_id(request, "pool_id")
    if not service(request).deregister(pool_id):
        raise NotFoundError(f"no pool {pool_id!r}", details={"pool_id": pool_id})
    return Response(status_code=204)


async def drain_pool(request: Request) -> Response:
    service(request).drain_pool(path_id(request, "pool_id"))
    return json_response(Accepted(), 202)


async def list_models(request: Request) -> Response:
    return json_response({"models": service(request).models()})


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(service(request).scrape(), media_type=CONTENT_TYPE_LATEST)


OPERATIONS = [
    openapi.Operation("GET", "/health", "liveness", response=Health, open=True),
    openapi.Operation("GET", "/metrics", "Prometheus metrics", open=True),
    openapi.Operation("GET", "/openapi.json", "this document", scope="jobs"),
    openapi.Operation("POST", "/v2/tasks", "admit a job", request=TaskRequest,
                      response=TaskAccepted, status=202, scope="inference",
                      errors={"429": "QUEUE_FULL or RATE_LIMITED"}),
    openapi.Operation("GET", "/v2/tasks", "jobs, newest first, paged", response=JobList,
                      scope="jobs", errors={"400": "bad status, limit or cursor"}),
    openapi.Operation("GET", "/v2/tasks/{job_id}", "one job (no prompt text)",
                      response=JobRecord, scope="jobs",
                      errors={"404": "no such job", "400": "bad id"}),
    openapi.Operation("GET", "/v2/tasks/{job_id}/events", "the job's SSE (Last-Event-ID)",
                      sse=True, scope="jobs", errors={"404": "no such job", "400": "bad id"}),
    openapi.Operation("POST", "/v2/tasks/{job_id}/cancel", "cancel a job", response=Accepted,
                      status=202, scope="jobs", errors={"404": "no such job", "400": "bad id"}),
    openapi.Operation("GET", "/v2/tasks/{job_id}/decision", "the scheduler's reasoning",
                      scope="jobs", errors={"404": "no such job", "400": "bad id"}),
    openapi.Operation("GET", "/v2/pools", "registered pools", scope="read"),
    openapi.Operation("GET", "/v2/pools/{pool_id}", "one pool", scope="read",
                      errors={"404": "no such pool", "400": "bad id"}),
    openapi.Operation("POST", "/v2/pools/{pool_id}/heartbeat", "a pool's heartbeat",
                      request=PoolHeartbeat, scope="pool"),
    openapi.Operation("DELETE", "/v2/pools/{pool_id}", "deregister a pool", status=204,
                      scope="pool_admin", errors={"404": "no such pool", "400": "bad id"}),
    openapi.Operation("POST", "/v2/pools/{pool_id}/drain", "stop placing jobs on a pool",
                      response=Accepted, status=202,
                      errors={"404": "no such pool", "400": "bad id"}),
    openapi.Operation("GET", "/v2/models", "catalog models and where they are",
                      scope="read"),
]


def routes() -> list[BaseRoute]:
    return [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2/tasks", submit, methods=["POST"]),
        Route("/v2/tasks", list_tasks, methods=["GET"]),
        Route("/v2/tasks/{job_id}", get_task, methods=["GET"]),
        Route("/v2/tasks/{job_id}/events", task_events, methods=["GET"]),
        Route("/v2/tasks/{job_id}/cancel", cancel_task, methods=["POST"]),
        Route("/v2/tasks/{job_id}/decision", task_decision, methods=["GET"]),
        Route("/v2/pools", list_pools, methods=["GET"]),
        Route("/v2/pools/{pool_id}", get_pool, methods=["GET"]),
        Route("/v2/pools/{pool_id}", deregister, methods=["DELETE"]),
        Route("/v2/pools/{pool_id}/heartbeat", heartbeat, methods=["POST"]),
        Route("/v2/pools/{pool_id}/drain", drain_pool, methods=["POST"]),
        Route("/v2/models", list_models, methods=["GET"]),
    ]
