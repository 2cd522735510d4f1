"""rbees-orcd: the orchestrator daemon (CONTRACT section 5). The only part that decides.

This module is its command line and its app factory: the service
(:class:`~rbees_core.orchestrator.service.OrchestratorService`) behind the routes of
:mod:`.orcd_api` (jobs, pools, models, metrics), :mod:`.orcd_openai`,
:mod:`.orcd_openai_models`, :mod:`.orcd_pools` and :mod:`.orcd_web`. Route modules import
the service's facade, never one another.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import attrs
import pluggy
import typer
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from rbees_core.config import rbees_home, runtime_dir
from rbees_core.errors import InvalidParamsError, RbeesError
from rbees_core.files import private_dir
from rbees_core.http import (
    Daemon,
    build_app,
    ca_file_option,
    daemon_lifespan,
    daemon_routes,
    log_level_option,
    log_to_option,
    tls_cert_option,
    tls_key_option,
)
from rbees_core.log import Logger
from rbees_core.orchestrator.service import OrcdSettings, OrchestratorService
from rbees_core.programs import (
    orcd_api,
    orcd_batches,
    orcd_embeddings,
    orcd_keys,
    orcd_openai,
    orcd_openai_models,
    orcd_pools,
    orcd_replay,
    orcd_web,
)
from rbees_core.programs.orcd_batch_runner import BatchRunner
from rbees_core.protocols import Orchestrator
from rbees_core.tls import ServerTLS, scheme

PROGRAM = "rbees-orcd"
DEFAULT_BIND = "127.0.0.1:8080"


def routes(pm: pluggy.PluginManager, started: float) -> list[BaseRoute]:
    """Every route of rbees-orcd: the daemon's own (health, openapi), its API, the OpenAI
    endpoints, the pool forwarding and the web UI; each route module documents its own."""
    return daemon_routes(PROGRAM, pm, started=started, operations=operations(),
                         routes=[route for module in MODULES for route in module.routes()])


MODULES = (orcd_api, orcd_openai, orcd_openai_models, orcd_embeddings, orcd_batches,
           orcd_pools, orcd_keys, orcd_replay, orcd_web)


def operations() -> list[Any]:
    """Every Operation of rbees-orcd's own routes: its OpenAPI document and the scope each
    route needs (rbees_core.auth; plugin routes take theirs from its prefix table)."""
    return [op for module in MODULES for op in module.OPERATIONS]


def create_app(svc: OrchestratorService, started: float | None = None) -> Any:
    facade: Orchestrator = svc  # what protocol plugins see: mypy checks the service offers it
    del facade
    batches = BatchRunner(svc)

    async def start() -> None:
        await svc.start()  # recovery first: the runner follows the recovered jobs
        await batches.start()

    inner = daemon_lifespan(PROGRAM, svc, attr="orcd", start=start, stop=svc.close)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.batches = batches  # the /v1/files and /v1/batches routes' (orcd_batches)
        async with inner(app):
            yield

    token = svc.settings.token
    return build_app(routes(svc.pm, started or time.monotonic()), token=token,
                     lifespan=lifespan, operations=operations(),
                     resolver=svc.keys.resolve if token else None)


def pid_file() -> Path:
    return runtime_dir() / "rbees-orcd.pid"


async def run(settings: OrcdSettings, host: str, port: int, pm: pluggy.PluginManager,
              tls: ServerTLS | None = None) -> int:
    log = Logger(PROGRAM)
    daemon = Daemon(PROGRAM, pid_file=pid_file(), log=log)
    with daemon.claimed():  # before the service opens the database
        app = create_app(OrchestratorService(settings, pm, log))
    return await daemon.serve(app, host, port, url=f"{scheme(tls)}://{host}:{port}",
                              db=settings.db_path, tls=tls)


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
    keep_alive: Annotated[str | None, typer.Option(
        "--keep-alive", envvar="RBEES_KEEP_ALIVE",
        help="How long an idle worker stays loaded when its latest job gave no keep_alive "
             "(Ollama's forms: 5m, 30s, 0, -1 = forever); default: [orchestrator] "
             "keep_alive, else --idle-timeout")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler")] = None,
    sse_ping_interval: Annotated[float | None, typer.Option(
        "--sse-ping-interval", min=0, envvar="RBEES_SSE_PING_INTERVAL",
        help="Seconds of silence after which a stream gets an SSE ': ping' comment "
             "(a job waiting in the queue); 0: never [default: 15]")] = None,
    max_queue_wait: Annotated[float | None, typer.Option(
        "--max-queue-wait", min=0.1,
        help="Seconds an OpenAI request may wait in the queue before a 503 with "
             "Retry-After [default: 600]")] = None,
    tls_cert: Annotated[str | None, tls_cert_option()] = None,
    tls_key: Annotated[str | None, tls_key_option()] = None,
    ca_file: Annotated[str | None, ca_file_option()] = None,
    log_level: Annotated[str | None, log_level_option()] = None,
    log_to: Annotated[str | None, log_to_option()] = None,
) -> None:
    """Start the orchestrator. Flags beat the RBEES_ORCHESTRATOR_* variables, which beat
    the config file's [orchestrator] section."""
    from rbees_core import plugins
    from rbees_core.config import load_config, load_token
    from rbees_core.durations import parse_keep_alive
    from rbees_core.http import check_bind_policy, fail, launch, parse_bind
    from rbees_core.orchestrator.decisions import parse_span
    from rbees_core.tls import server_tls, use_ca_file

    try:
        cfg = load_config(config)
        host, port = parse_bind(bind)
        token = load_token(api_token_file)
        check_bind_policy(host, token)
        tls = server_tls(tls_cert, tls_key, config=cfg)
        use_ca_file(ca_file or cfg.tls.ca_file)  # its calls to pools and workers
        orch = cfg.orchestrator  # the file's section, RBEES_ORCHESTRATOR_* applied
        sched = cfg.scheduler

        def pick(flag: Any, key: str) -> Any:
            return flag if flag is not None else getattr(orch, key)

        policy_value = pick(policy, "queue_policy")
        if policy_value not in ("reject", "drop-oldest-batch"):
            raise InvalidParamsError("--queue-policy", "must be reject or drop-oldest-batch")
        keep_value = pick(keep_alive, "keep_alive")
        keep_alive_s = None if keep_value is None else parse_keep_alive(
            keep_value, field="--keep-alive")
        db_path = db or str(rbees_home() / "orcd.sqlite3")
        private_dir(Path(db_path).parent)
        settings = OrcdSettings(
            db_path=db_path, capacity=pick(capacity, "queue_capacity"), policy=policy_value,
            promote_after_s=orch.promote_after_s,
            heartbeat_interval_s=pick(heartbeat_interval, "heartbeat_interval_s"),
            heartbeat_grace=orch.heartbeat_grace, offline_after_s=orch.offline_after_s,
            idle_timeout_s=pick(idle_timeout, "idle_timeout_s"), keep_alive_s=keep_alive_s,
            max_queue_wait_s=pick(max_queue_wait, "max_queue_wait_s"),
            scheduler=scheduler if scheduler is not None else sched.policy,
            scheduler_script=sched.script, token=token,
            placement=cfg.placement,
            sse_ping_interval_s=pick(sse_ping_interval, "sse_ping_interval_s"),
            decision_retention_s=None if orch.decision_retention == "forever" else parse_span(
                orch.decision_retention, field="[orchestrator] decision_retention"))
        pm = plugins.make_manager(plugins.builtin_plugins())
    except RbeesError as exc:
        fail(PROGRAM, exc)
    raise typer.Exit(launch(PROGRAM, run(settings, host, port, pm, tls)))


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name=PROGRAM)


__all__ = ["OrcdSettings", "attrs", "main", "run"]
