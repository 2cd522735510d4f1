"""rbees-orcd: the orchestrator daemon (CONTRACT section 5). The only part that decides."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

import attrs
import pluggy
import typer
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from rbees_core.api import openapi
from rbees_core.api.common import Health
from rbees_core.api.orchestrator import JobList, JobRecord, TaskAccepted, TaskRequest
from rbees_core.api.pool import PoolHeartbeat
from rbees_core.api.worker import Accepted
from rbees_core.config import rbees_home
from rbees_core.errors import InvalidParamsError, NotFoundError, RbeesError
from rbees_core.http import (
    Daemon,
    build_app,
    daemon_lifespan,
    daemon_routes,
    json_response,
    read_json,
)
from rbees_core.log import Logger
from rbees_core.orchestrator.channel import TERMINAL
from rbees_core.orchestrator.service import OrcdSettings, OrchestratorService, retrieved
from rbees_core.programs import orcd_openai, orcd_pools, orcd_web
from rbees_core.programs.orcd_common import path_id, service
from rbees_core.schema import to_dict
from rbees_core.sse import json_frame

PROGRAM = "rbees-orcd"
DEFAULT_BIND = "127.0.0.1:8080"


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
            try:
                frames = [json_frame(*e) for e in following.backlog]
                done = following.done  # also when the client has seen everything already
                while True:
                    if frames:
                        await send({"type": "http.response.body",
                                    "body": "".join(frames).encode(), "more_body": True})
                        frames = []
                    if done or gone.is_set() or queue is None:
                        break
                    item = await queue.get()
                    frames.append(json_frame(*item))
                    done = item[1] in TERMINAL
                    while not done and not queue.empty():
                        item = queue.get_nowait()
                        frames.append(json_frame(*item))
                        done = item[1] in TERMINAL
                if not gone.is_set():
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            finally:
                following.close()
        except OSError:
            pass
        finally:
            watcher.cancel()


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidParamsError("Last-Event-ID", "must be a non-negative integer")
    return int(raw)


async def submit(request: Request) -> Response:
    req = await read_json(request, TaskRequest)
    accepted = await service(request).submit(req)
    return json_response(accepted, 202)


async def list_tasks(request: Request) -> Response:
    status = request.query_params.get("status")
    limit_raw = request.query_params.get("limit", "50")
    if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= 1000:
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
    openapi.Operation("GET", "/openapi.json", "this document"),
    openapi.Operation("POST", "/v2/tasks", "admit a job", request=TaskRequest,
                      response=TaskAccepted, status=202,
                      errors={"404": "MODEL_NOT_FOUND", "429": "QUEUE_FULL"}),
    openapi.Operation("GET", "/v2/tasks", "jobs, newest first, paged", response=JobList,
                      errors={"400": "bad status, limit or cursor"}),
    openapi.Operation("GET", "/v2/tasks/{job_id}", "one job (no prompt text)",
                      response=JobRecord, errors={"404": "no such job", "400": "bad id"}),
    openapi.Operation("GET", "/v2/tasks/{job_id}/events", "the job's SSE (Last-Event-ID)",
                      sse=True, errors={"404": "no such job", "400": "bad id"}),
    openapi.Operation("POST", "/v2/tasks/{job_id}/cancel", "cancel a job", response=Accepted,
                      status=202, errors={"404": "no such job", "400": "bad id"}),
    openapi.Operation("GET", "/v2/tasks/{job_id}/decision", "the scheduler's reasoning",
                      errors={"404": "no such job", "400": "bad id"}),
    openapi.Operation("GET", "/v2/pools", "registered pools"),
    openapi.Operation("GET", "/v2/pools/{pool_id}", "one pool",
                      errors={"404": "no such pool", "400": "bad id"}),
    openapi.Operation("POST", "/v2/pools/{pool_id}/heartbeat", "a pool's heartbeat",
                      request=PoolHeartbeat),
    openapi.Operation("DELETE", "/v2/pools/{pool_id}", "deregister a pool", status=204,
                      errors={"404": "no such pool", "400": "bad id"}),
    openapi.Operation("POST", "/v2/pools/{pool_id}/drain", "stop placing jobs on a pool",
                      response=Accepted, status=202,
                      errors={"404": "no such pool", "400": "bad id"}),
    openapi.Operation("GET", "/v2/models", "catalog models and where they are"),
]


def routes(pm: pluggy.PluginManager, started: float) -> list[BaseRoute]:
    operations = OPERATIONS + orcd_openai.OPERATIONS + orcd_pools.OPERATIONS + orcd_web.OPERATIONS
    return daemon_routes(PROGRAM, pm, started=started, operations=operations, routes=[
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
        *orcd_openai.routes(),
        *orcd_pools.routes(),
        *orcd_web.routes(),
    ])


def create_app(svc: OrchestratorService, started: float | None = None) -> Any:
    lifespan = daemon_lifespan(PROGRAM, svc, attr="orcd", start=svc.start, stop=svc.close)
    return build_app(routes(svc.pm, started or time.monotonic()), token=svc.settings.token,
                     lifespan=lifespan)


def pid_file() -> Path:
    return rbees_home() / "run" / "rbees-orcd.pid"


async def run(settings: OrcdSettings, host: str, port: int, pm: pluggy.PluginManager) -> int:
    log = Logger(PROGRAM)
    daemon = Daemon(PROGRAM, pid_file=pid_file(), log=log)
    with daemon.claimed():  # before the service opens the database
        app = create_app(OrchestratorService(settings, pm, log))
    return await daemon.serve(app, host, port, url=f"http://{host}:{port}",
                              db=settings.db_path)


app = typer.Typer(add_completion=False, help="Orchestrator daemon: queue, scheduling, dispatch.",
                  rich_markup_mode=None)  # plain click help, as cli_common.new_app


@app.command()
def serve_orcd(
    bind: Annotated[str, typer.Option("--bind", help="HOST:PORT")] = DEFAULT_BIND,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file")] = None,
    api_token_file: Annotated[str | None, typer.Option("--api-token-file")] = None,
    db: Annotated[str | None, typer.Option("--db", help="SQLite file")] = None,
    capacity: Annotated[int | None, typer.Option("--queue-capacity", min=1)] = None,
    policy: Annotated[str | None, typer.Option("--queue-policy",
                                               help="reject or drop-oldest-batch")] = None,
    heartbeat_interval: Annotated[float | None, typer.Option("--heartbeat-interval",
                                                             min=0.1)] = None,
    idle_timeout: Annotated[float | None, typer.Option("--idle-timeout", min=1)] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler")] = None,
) -> None:
    """Start the orchestrator."""
    from rbees_core import plugins
    from rbees_core.config import load_config, load_token
    from rbees_core.http import check_bind_policy, fail, launch, parse_bind

    try:
        cfg = load_config(config)
        host, port = parse_bind(bind)
        token = load_token(api_token_file)
        check_bind_policy(host, token)
        orch = getattr(cfg, "orchestrator", None)
        sched = getattr(cfg, "scheduler", None)

        def pick(flag: Any, section: Any, key: str, default: Any) -> Any:
            if flag is not None:
                return flag
            return getattr(section, key, default) if section is not None else default

        policy_value = pick(policy, orch, "queue_policy", "reject")
        if policy_value not in ("reject", "drop-oldest-batch"):
            raise InvalidParamsError("--queue-policy", "must be reject or drop-oldest-batch")
        db_path = db or str(rbees_home() / "orcd.sqlite3")
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        settings = OrcdSettings(
            db_path=db_path, capacity=pick(capacity, orch, "queue_capacity", 1024),
            policy=policy_value,
            heartbeat_interval_s=pick(heartbeat_interval, orch, "heartbeat_interval_s", 5.0),
            idle_timeout_s=pick(idle_timeout, orch, "idle_timeout_s", 300.0),
            scheduler=pick(scheduler, sched, "policy", "least-loaded"),
            scheduler_script=getattr(sched, "script", None), token=token)
        pm = plugins.make_manager(plugins.builtin_plugins())
    except RbeesError as exc:
        fail(PROGRAM, exc)
    raise typer.Exit(launch(PROGRAM, run(settings, host, port, pm)))


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name=PROGRAM)


__all__ = ["OrcdSettings", "attrs", "main", "run"]
