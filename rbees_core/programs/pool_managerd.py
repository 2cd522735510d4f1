"""pool-managerd: the pool daemon of one host (CONTRACT section 4).

Worker lifecycle, GPU inventory, local models and downloads, heartbeat to the orchestrator.
SIGTERM drains: every worker finishes its running jobs and stops (SIGKILL after the grace),
the pool deregisters from the orchestrator, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Annotated, Any

import attrs
import pluggy
import typer
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from rbees_core.api import openapi
from rbees_core.api.common import ID_PATTERN, Health
from rbees_core.api.pool import (
    DownloadRequest,
    ModelList,
    PoolState,
    RetryAnswer,
    RetryRequest,
    RpcServerEntry,
    RpcStartRequest,
    WorkerEntry,
    WorkerList,
    WorkerStarted,
    WorkerStartRequest,
)
from rbees_core.api.worker import Accepted, ReadyCallback
from rbees_core.errors import ForbiddenError, InvalidParamsError, RbeesError
from rbees_core.http import (
    Daemon,
    EventStreamResponse,
    build_app,
    ca_file_option,
    daemon_lifespan,
    daemon_routes,
    json_response,
    log_level_option,
    log_to_option,
    read_json,
    tls_cert_option,
    tls_key_option,
)
from rbees_core.log import Logger
from rbees_core.pool.daemon import PoolService, PoolSettings
from rbees_core.schema import check_string

PROGRAM = "pool-managerd"
DEFAULT_BIND = "127.0.0.1:9200"


def _svc(request: Request) -> PoolService:
    service: PoolService = request.app.state.pool
    return service


def _worker_id(request: Request) -> str:
    worker_id = str(request.path_params["worker_id"])
    check_string(worker_id, "worker_id", {"pattern": ID_PATTERN})
    return worker_id


async def get_state(request: Request) -> Response:
    state = await asyncio.to_thread(_svc(request).state)
    return json_response(state)


async def list_workers(request: Request) -> Response:
    svc = _svc(request)
    return json_response(WorkerList(workers=[w.entry() for w in svc.workers.values()]))


async def get_worker(request: Request) -> Response:
    return json_response(_svc(request).get(_worker_id(request)).entry())


async def start_worker(request: Request) -> Response:
    req = await read_json(request, WorkerStartRequest)
    w = await _svc(request).start_worker(req)
    return json_response(WorkerStarted(worker_id=w.record.worker_id, state=w.state,
                                       uri=w.record.uri), 202)


async def drain_worker(request: Request) -> Response:
    w = await _svc(request).stop_worker(_worker_id(request), drain_only=True)
    return json_response(Accepted(job_id=None) if w else Accepted(), 202)


async def stop_worker(request: Request) -> Response:
    await _svc(request).stop_worker(_worker_id(request))
    return json_response(Accepted(), 202)


async def worker_ready(request: Request) -> Response:
    body = await read_json(request, ReadyCallback)
    principal = getattr(request.state, "principal", None)
    if principal is not None and principal.kind == "worker" \
            and principal.name != f"worker:{body.worker_id}":  # a worker speaks for itself
        raise ForbiddenError(f"{principal.name} cannot report {body.worker_id} ready")
    w = _svc(request).ready_callback(body)
    return json_response(w.entry())


async def list_models(request: Request) -> Response:
    from rbees_core.pool import models as local_models

    svc = _svc(request)
    models = await asyncio.to_thread(local_models.list_models, svc.pm)
    return json_response(ModelList(models=[m.to_dict() for m in models]))


async def download_model(request: Request) -> Response:
    from rbees_core.pool.models import download_target

    req = await read_json(request, DownloadRequest)
    svc = _svc(request)
    await asyncio.to_thread(download_target, svc.pm, req.model)  # unknown model: 404 now
    events = svc.download(req.model, req.force, on_event=lambda e, d: None)
    return EventStreamResponse(events, on_disconnect=lambda: None)  # type: ignore[return-value]


async def retry_model(request: Request) -> Response:
    req = await read_json(request, RetryRequest)
    if req.pool is not None:
        raise InvalidParamsError("pool", "is for rbees-orcd; a pool clears only its own marks")
    cleared = _svc(request).retry([req.model])
    return json_response(RetryAnswer(model=req.model, cleared=cleared))


async def delete_model(request: Request) -> Response:
    from rbees_core.pool import models as local_models
    from rbees_core.refs import validate_ref

    model = str(request.path_params["model_id"])
    validate_ref(model, "model_id")
    force = request.query_params.get("force") in ("1", "true")
    await asyncio.to_thread(local_models.remove, _svc(request).pm, model, force=force)
    return Response(status_code=204)


async def start_rpc(request: Request) -> Response:
    req = await read_json(request, RpcStartRequest)
    server = await _svc(request).rpc.start(req)
    return json_response(server.entry(), 202)


async def stop_rpc(request: Request) -> Response:
    server_id = str(request.path_params["server_id"])
    check_string(server_id, "server_id", {"pattern": ID_PATTERN})
    server = await _svc(request).rpc.stop(server_id)
    return json_response(server.entry(), 202)


_OPERATIONS = [
    openapi.Operation("GET", "/health", "liveness", response=Health, open=True),
    openapi.Operation("GET", "/metrics", "Prometheus metrics", open=True),
    openapi.Operation("GET", "/openapi.json", "this document"),
    openapi.Operation("GET", "/v2/state", "facts of this pool", response=PoolState),
    openapi.Operation("GET", "/v2/workers", "workers of this pool", response=WorkerList),
    openapi.Operation("GET", "/v2/workers/{worker_id}", "one worker", response=WorkerEntry,
                      errors={"404": "no such worker", "400": "bad worker id"}),
    openapi.Operation("POST", "/v2/workers/start", "preflight and start a worker",
                      request=WorkerStartRequest, response=WorkerStarted, status=202,
                      errors={"409": "INSUFFICIENT_VRAM, INSUFFICIENT_RAM, BACKEND_UNAVAILABLE, "
                                     "MODEL_LOAD_FAILED (the model is marked failed here)",
                              "400": "INVALID_PARAMS: a file: ref outside [sources.file] roots",
                              "404": "MODEL_NOT_FOUND",
                              "500": "MODEL_LOAD_FAILED: the file is no model",
                              "503": "the pool is shutting down"}),
    openapi.Operation("POST", "/v2/workers/{worker_id}/drain", "no new jobs; stop when idle",
                      response=Accepted, status=202,
                      errors={"404": "no such worker", "400": "bad worker id"}),
    openapi.Operation("POST", "/v2/workers/{worker_id}/stop", "shutdown, grace, SIGKILL",
                      response=Accepted, status=202,
                      errors={"404": "no such worker", "400": "bad worker id"}),
    openapi.Operation("POST", "/v2/internal/workers/ready", "a worker's ready callback",
                      request=ReadyCallback, response=WorkerEntry, scope="worker",
                      errors={"409": "unknown worker or not starting"}),
    openapi.Operation("POST", "/v2/rpc/start", "a llama.cpp RPC server for one device "
                      "(loopback only; [pool] rpc = true)", request=RpcStartRequest,
                      response=RpcServerEntry, status=202,
                      errors={"409": "RPC_DISABLED, INSUFFICIENT_RAM or INSUFFICIENT_VRAM"}),
    openapi.Operation("POST", "/v2/rpc/{server_id}/stop", "stop an RPC server, release its "
                      "memory", response=RpcServerEntry, status=202,
                      errors={"404": "no such server"}),
    openapi.Operation("GET", "/v2/models", "models on this host", response=ModelList),
    openapi.Operation("POST", "/v2/models/download", "download a model (SSE progress)",
                      request=DownloadRequest, sse=True, errors={"404": "MODEL_NOT_FOUND"}),
    openapi.Operation("POST", "/v2/models/retry",
                      "clear the model's failed mark: workers may be started for it again",
                      request=RetryRequest, response=RetryAnswer),
    openapi.Operation("DELETE", "/v2/models/{model_id}", "delete a local model", status=204,
                      errors={"404": "MODEL_NOT_FOUND", "409": "in use by a worker",
                              "400": "bad model id"}),
]
#: Every route but the open ones and the ready callback is for rbees-orcd and the operator
#: (the operator token); no client key reaches a pool (rbees_core.auth).
OPERATIONS = [op if op.open or op.scope == "worker" else attrs.evolve(op, scope="operator")
              for op in _OPERATIONS]


def routes(pm: pluggy.PluginManager, started: float) -> list[BaseRoute]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from rbees_core.programs.pool_metrics import PoolMetrics

    async def metrics(request: Request) -> Response:
        from rbees_core.pool import inventory

        svc = _svc(request)
        # off the event loop: NVML's init alone can take tens of milliseconds
        devices = await asyncio.to_thread(inventory.collect, svc.pm)
        registry = PoolMetrics(svc, devices).registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return daemon_routes(PROGRAM, pm, started=started, operations=OPERATIONS, routes=[
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2/state", get_state, methods=["GET"]),
        Route("/v2/workers", list_workers, methods=["GET"]),
        Route("/v2/workers/start", start_worker, methods=["POST"]),
        Route("/v2/workers/{worker_id}", get_worker, methods=["GET"]),
        Route("/v2/workers/{worker_id}/drain", drain_worker, methods=["POST"]),
        Route("/v2/workers/{worker_id}/stop", stop_worker, methods=["POST"]),
        Route("/v2/internal/workers/ready", worker_ready, methods=["POST"]),
        Route("/v2/rpc/start", start_rpc, methods=["POST"]),
        Route("/v2/rpc/{server_id}/stop", stop_rpc, methods=["POST"]),
        Route("/v2/models", list_models, methods=["GET"]),
        Route("/v2/models/download", download_model, methods=["POST"]),
        Route("/v2/models/retry", retry_model, methods=["POST"]),
        # references hold "/" (hf:OWNER/REPO/FILE)
        Route("/v2/models/{model_id:path}", delete_model, methods=["DELETE"]),
    ])


def create_app(svc: PoolService, started: float | None = None) -> Any:
    async def start() -> None:
        svc.start()

    lifespan = daemon_lifespan(PROGRAM, svc, attr="pool", start=start)
    from rbees_core.http.auth import token_resolver
    from rbees_core.pool import credentials

    control = svc.control_token  # what rbees-orcd sends (rbees_core.auth.control_token)
    known = token_resolver(svc.settings.token, control)

    def resolve(credential: str) -> Any:  # ... and each worker's own token (ready callback)
        return known(credential) or credentials.worker_principal(credential,
                                                                 svc.worker_tokens)

    return build_app(routes(svc.pm, started or time.monotonic()),
                     token=svc.settings.token, lifespan=lifespan, operations=OPERATIONS,
                     resolver=resolve if svc.settings.token or control else None)


def pid_file() -> Path:
    """Where this ``$RBEES_HOME``'s pool-managerd writes its pid (``rbees-pool daemon`` and
    ``rbees-pool worker`` find it there: :func:`rbees_core.pool.via_daemon.daemon_files`)."""
    from rbees_core.pool.via_daemon import daemon_files

    return daemon_files().pid


async def run(settings: PoolSettings, pm: pluggy.PluginManager) -> int:
    log = Logger(PROGRAM)
    daemon = Daemon(PROGRAM, pid_file=pid_file(), log=log)
    with daemon.claimed():
        svc = PoolService(settings, pm, log)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def drain_then_stop() -> None:
        log.info("draining", workers=len(svc.workers))
        await svc.close()
        daemon.shutdown.set()

    def on_signal() -> None:
        if not svc.draining:
            svc.draining = True
            task = loop.create_task(drain_then_stop())
            pending.add(task)
            task.add_done_callback(pending.discard)

    return await daemon.serve(create_app(svc), settings.host, settings.port,
                              on_signal=on_signal, url=settings.url, tls=settings.tls,
                              pool_id=settings.pool_id, orchestrator=settings.orchestrator)


app = typer.Typer(add_completion=False, help="Pool daemon: workers, devices, models, heartbeat.",
                  rich_markup_mode=None)  # plain click help, as cli_common.new_app


@app.command()
def serve_pool(
    bind: Annotated[str, typer.Option("--bind", help="HOST:PORT")] = DEFAULT_BIND,
    pool_id: Annotated[str | None, typer.Option("--pool-id", help="Default: host name")] = None,
    orchestrator: Annotated[str | None, typer.Option("--orchestrator",
                                                     help="Heartbeat target URL")] = None,
    api_token_file: Annotated[str | None, typer.Option("--api-token-file")] = None,
    join_token_file: Annotated[str | None, typer.Option(
        "--join-token-file", envvar="RBEES_JOIN_TOKEN_FILE",
        help="This pool's join token (rbees pools join-token POOL_ID, 0600): heartbeats "
             "carry it; the pool then needs no operator token")] = None,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file")] = None,
    heartbeat_interval: Annotated[float, typer.Option("--heartbeat-interval", min=0.1)] = 5.0,
    health_interval: Annotated[float, typer.Option("--health-interval", min=0.1)] = 2.0,
    memory_limit: Annotated[str | None, typer.Option(
        "--memory-limit", help="Most memory offered to workers on each device (12GiB, "
        "512MiB; [pool] memory_limit, RBEES_POOL_MEMORY_LIMIT)")] = None,
    tls_cert: Annotated[str | None, tls_cert_option()] = None,
    tls_key: Annotated[str | None, tls_key_option()] = None,
    ca_file: Annotated[str | None, ca_file_option()] = None,
    log_level: Annotated[str | None, log_level_option()] = None,
    log_to: Annotated[str | None, log_to_option()] = None,
) -> None:
    """Start the pool daemon. With --tls-cert and --tls-key it serves HTTPS, and so do the
    workers it starts (same certificate, same address)."""
    from rbees_core import plugins
    from rbees_core.auth import JOIN_PREFIX
    from rbees_core.config import load_config, load_token, read_token_file
    from rbees_core.http import check_bind_policy, fail, launch, parse_bind
    from rbees_core.tls import server_tls, use_ca_file

    try:
        if memory_limit is not None:  # read with the rest of [pool] (PoolService)
            load_config(config, flags={"pool": {"memory_limit": memory_limit}})
            os.environ["RBEES_POOL_MEMORY_LIMIT"] = memory_limit
        cfg = load_config(config)
        tls = server_tls(tls_cert, tls_key, config=cfg)
        use_ca_file(ca_file or cfg.tls.ca_file)  # its heartbeats; its workers inherit it
        if config:  # what this process reads later (models_dir, [sources.file] roots), and
            os.environ["RBEES_CONFIG"] = config  # its workers, comes from this file too
        host, port = parse_bind(bind)
        token = load_token(api_token_file)
        join = read_token_file(join_token_file) if join_token_file else None
        check_bind_policy(host, token or join)
        pid = pool_id or socket.gethostname().split(".")[0]
        if join is not None:  # the token names its pool: --pool-id may be left out
            if not join.startswith(JOIN_PREFIX):
                raise InvalidParamsError("--join-token-file", "holds no join token (rbees "
                                         "pools join-token POOL_ID makes one)")
            pid = pool_id or join[len(JOIN_PREFIX):].rpartition("_")[0]
            if not join.startswith(f"{JOIN_PREFIX}{pid}_"):
                raise InvalidParamsError("--join-token-file", f"is not pool {pid}'s token")
        check_string(pid, "--pool-id", {"pattern": ID_PATTERN})
        if orchestrator and not orchestrator.startswith(("http://", "https://")):
            raise InvalidParamsError("--orchestrator", "must be an http(s) URL")
        settings = PoolSettings(
            pool_id=pid, host=host, port=port, orchestrator=(orchestrator or "").rstrip("/")
            or None, token=token, join_token=join,
            token_file=api_token_file or os.environ.get("RBEES_API_TOKEN_FILE"),
            heartbeat_interval_s=heartbeat_interval, health_interval_s=health_interval,
            tls=tls)
        pm = plugins.make_manager(plugins.builtin_plugins())
    except RbeesError as exc:
        fail(PROGRAM, exc)
    raise typer.Exit(launch(PROGRAM, run(settings, pm)))


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name=PROGRAM)


__all__ = ["PoolSettings", "attrs", "main", "run"]
