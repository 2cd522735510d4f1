"""rbees-workerd: loads one model with one backend and serves jobs (CONTRACT section 2).

Server first: the HTTP server listens before the model loads, answers ``/v2/ready`` with
progress while loading, then calls the pool back. SIGTERM and ``POST /v2/shutdown`` drain:
no new jobs, running ones finish (bounded by ``worker.drain_timeout_s``), exit 0.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import attrs
import pluggy
import typer
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from rbees_core import plugins
from rbees_core.api import openapi
from rbees_core.api.common import ID_PATTERN, Health
from rbees_core.api.worker import (
    Accepted,
    CancelRequest,
    ExecuteRequest,
    ReadyState,
)
from rbees_core.config import Config, runtime_dir
from rbees_core.engine import Engine
from rbees_core.errors import (
    DrainingError,
    NotReadyError,
    RbeesError,
)
from rbees_core.http import (
    Daemon,
    EventStreamResponse,
    build_app,
    ca_file_option,
    daemon_lifespan,
    daemon_routes,
    fail,
    json_response,
    launch,
    log_level_option,
    log_to_option,
    read_json,
    tls_cert_option,
    tls_key_option,
)
from rbees_core.log import Logger
from rbees_core.models import DEFAULT_MODEL_REF
from rbees_core.planning import parse_shares
from rbees_core.pool.cores import pin
from rbees_core.programs import worker_cores, worker_embed, worker_prompt
from rbees_core.programs.worker_lifecycle import begin_drain, load_model
from rbees_core.programs.worker_metrics import WorkerMetrics
from rbees_core.programs.worker_state import WorkerSettings, WorkerState
from rbees_core.sampling import logprobs_top, sampling_params
from rbees_core.tls import ServerTLS

PROGRAM = "rbees-workerd"


# -- routes ---------------------------------------------------------------------------------


def _state(request: Request) -> WorkerState:
    state: WorkerState = request.app.state.worker
    return state


async def ready(request: Request) -> Response:
    st = _state(request)
    body = st.ready_state()
    return json_response(body, 200 if body.ready else 503)


async def loading_progress(request: Request) -> Response:
    st = _state(request)
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def pump() -> None:
        last: tuple[str, float] | None = None
        while True:
            if st.error is not None:
                await queue.put(("error", {"code": st.error.code, "message": st.error.message,
                                           "retriable": False}))
                return
            if st.engine is not None:
                await queue.put(("ready", attrs.asdict(st.ready_state())))
                return
            now = (st.stage, round(st.fraction, 3))
            if now != last:
                last = now
                await queue.put(("progress", {"stage": now[0], "fraction": now[1]}))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(pump())
    response = EventStreamResponse(queue, on_disconnect=task.cancel)
    response.TERMINAL = frozenset({"ready", "error"})  # type: ignore[misc]
    return response  # type: ignore[return-value]


async def execute(request: Request) -> Response:
    st = _state(request)
    if st.state == "draining" or st.shutdown.is_set():
        raise DrainingError("worker is draining; it takes no new jobs")
    engine = st.engine
    if engine is None:
        raise NotReadyError("the model is still loading", details={"progress": st.fraction})
    worker_embed.refuse_generation(st)
    assert isinstance(engine, Engine)
    req = await read_json(request, ExecuteRequest)
    text = req.prompt
    grammar = worker_prompt.grammar(st.settings.backend, engine.model, req)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def put(event: str, data: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (event, data))

    sink: Callable[[str, dict[str, Any]], None] = put
    if text is None:  # a chat: its prompt, and its grammar and sink with tools
        text, grammar, sink = worker_prompt.chat(engine.model, req, grammar, sink)
    seed = req.seed if req.seed is not None else random.randrange(2**63)
    params = sampling_params(engine.model, req, seed=seed, grammar=grammar)
    job = engine.prepare(req.job_id, text, max_tokens=req.max_tokens, params=params,
                         stop=req.stop, sink=sink,
                         logprobs=logprobs_top(engine.model, req, st.settings.backend),
                         batch=req.priority == "batch")
    engine.submit(job)
    st.log.info("job_accepted", job_id=req.job_id, tokens_in=len(job.tokens))
    st.streams += 1

    def closed() -> None:
        st.streams -= 1

    return EventStreamResponse(events, on_disconnect=lambda: engine.cancel(req.job_id),
                               on_close=closed)  # type: ignore[return-value]


async def cancel(request: Request) -> Response:
    st = _state(request)
    req = await read_json(request, CancelRequest)
    found = st.engine.cancel(req.job_id) if st.engine is not None else False
    st.log.info("job_cancel", job_id=req.job_id, running=found)
    return json_response(Accepted(job_id=req.job_id), 202)


async def shutdown(request: Request) -> Response:
    st = _state(request)
    asyncio.get_running_loop().call_soon(begin_drain, st)
    return json_response(Accepted(), 202)


async def metrics(request: Request) -> Response:
    st = _state(request)
    if st.engine is not None:
        st.metrics.slots_busy.set(st.engine.slots - st.engine.slots_free)
    body, content_type = st.metrics.render()
    return Response(body, media_type=content_type)


_OPERATIONS = [
    openapi.Operation("GET", "/health", "liveness", response=Health, open=True),
    openapi.Operation("GET", "/metrics", "Prometheus metrics", open=True),
    openapi.Operation("GET", "/openapi.json", "this document"),
    openapi.Operation("GET", "/v2/ready", "readiness and slots", response=ReadyState,
                      errors={"503": "still loading (same body, ready=false)"}),
    openapi.Operation("GET", "/v2/loading/progress", "SSE progress events while loading",
                      sse=True),
    openapi.Operation("POST", "/v2/execute", "run one job, streamed as SSE",
                      request=ExecuteRequest, sse=True,
                      errors={"409": "job_id already running here",
                              "503": "ALL_SLOTS_BUSY, DRAINING or NOT_READY"}),
    worker_embed.OPERATION,
    worker_cores.OPERATION,
    openapi.Operation("POST", "/v2/cancel", "stop decoding a job", request=CancelRequest,
                      response=Accepted, status=202),
    openapi.Operation("POST", "/v2/shutdown", "drain and exit", response=Accepted, status=202),
]
#: A worker serves rbees-orcd and its pool only (the operator token; rbees_core.auth).
OPERATIONS = [op if op.open else attrs.evolve(op, scope="operator") for op in _OPERATIONS]


def routes(pm: pluggy.PluginManager, started: float) -> list[BaseRoute]:
    return daemon_routes(PROGRAM, pm, started=started, operations=OPERATIONS, routes=[
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2/ready", ready, methods=["GET"]),
        Route("/v2/loading/progress", loading_progress, methods=["GET"]),
        Route("/v2/execute", execute, methods=["POST"]),
        Route("/v2/embed", worker_embed.embed, methods=["POST"]),
        Route("/v2/cores", worker_cores.set_cores, methods=["POST"]),
        Route("/v2/cancel", cancel, methods=["POST"]),
        Route("/v2/shutdown", shutdown, methods=["POST"]),
    ])


# -- lifecycle ------------------------------------------------------------------------------


def create_app(st: WorkerState) -> Any:
    lifespan = daemon_lifespan(PROGRAM, st, attr="worker")
    from rbees_core.http.auth import token_resolver

    s = st.settings
    return build_app(routes(st.pm, st.started), token=s.token, lifespan=lifespan,
                     operations=OPERATIONS,
                     resolver=token_resolver(s.token, s.control_token)
                     if s.token or s.control_token else None)


def pid_file(worker_id: str) -> Path:
    return runtime_dir() / f"rbees-workerd-{worker_id}.pid"


async def run(settings: WorkerSettings, pm: pluggy.PluginManager) -> int:
    log = Logger(PROGRAM)
    st = WorkerState(settings=settings, pm=pm, log=log, metrics=WorkerMetrics(settings.model_ref))
    st.set_state("loading")
    daemon = Daemon(PROGRAM, pid_file=pid_file(settings.worker_id), log=log, exclusive=False,
                    shutdown=st.shutdown)

    def after() -> None:
        if st.engine is not None:
            st.engine.stop()
            st.engine.model.close()

    return await daemon.serve(create_app(st), settings.host, settings.port,
                              on_signal=lambda: begin_drain(st),
                              beside=lambda: load_model(st), after=after,
                              exit_code=lambda: st.exit_code, tls=settings.tls,
                              uri=st.uri, worker_id=settings.worker_id)


def settings_from(config: Config, *, worker_id: str, model: str, backend: str, device: str,
                  bind: str, port: int | None, callback_url: str | None, token: str | None,
                  embedding: bool = False, n_gpu_layers: int | None = None,
                  tensor_split: tuple[float, ...] | None = None,
                  control_token: str | None = None,
                  callback_token: str | None = None,
                  tls: ServerTLS | None = None,
                  rpc: tuple[str, ...] = (), rpc_token: str | None = None) -> WorkerSettings:
    """The worker's settings from its config and flags. Raises
    :class:`InvalidParamsError` for a bind the policy refuses and a chat template file
    that cannot be read."""
    from rbees_core.http import check_bind_policy, parse_bind

    host, bind_port = parse_bind(bind)
    check_bind_policy(host, token or control_token)
    template = worker_prompt.read_template(config.worker.chat_template_file)
    return WorkerSettings(
        worker_id=worker_id, model_ref=model, backend=backend, device=device, host=host,
        port=port if port is not None else bind_port, slots=config.worker.slots,
        ctx=config.worker.ctx, threads=config.worker.threads, callback_url=callback_url,
        token=token, drain_timeout_s=config.worker.drain_timeout_s,
        callback_timeout_s=config.worker.ready_callback_timeout_s, embedding=embedding,
        chat_template=template, n_gpu_layers=n_gpu_layers, tensor_split=tensor_split,
        control_token=control_token, callback_token=callback_token, tls=tls, rpc=rpc,
        rpc_token=rpc_token,
    )


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Worker daemon: loads one model with one backend and serves jobs.",
                  # plain click help, as cli_common.new_app: rich markup would read the
                  # "[/FILE]" of --model's help as a closing tag and crash --help
                  rich_markup_mode=None)


@app.command()
def serve_worker(
    worker_id: Annotated[str, typer.Option("--worker-id", help="Identifier of this worker")],
    model: Annotated[str, typer.Option(
        "--model", help="Model reference: a GGUF path, file:PATH or pkg:PACKAGE[/FILE]")
    ] = DEFAULT_MODEL_REF,
    backend: Annotated[str, typer.Option("--backend", help="Inference backend")] = "llamacpp",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda[:i], metal or mps")] = "cpu",
    port: Annotated[int | None, typer.Option("--port", min=1, max=65535)] = None,
    bind: Annotated[str, typer.Option("--bind", help="HOST:PORT")] = "127.0.0.1:8001",
    slots: Annotated[int | None, typer.Option("--slots", min=1, max=64,
                                              help="Jobs served at once")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", min=16, help="Context per slot")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1)] = None,
    cpus: Annotated[str | None, typer.Option(
        "--cpus", help="CPU set to run on, as 0-1,3 (its pool's grant)")] = None,
    callback_url: Annotated[str | None, typer.Option("--callback-url")] = None,
    api_token_file: Annotated[str | None, typer.Option("--api-token-file")] = None,
    control_token_file: Annotated[str | None, typer.Option(
        "--control-token-file", help="Its pool's control token, accepted beside the API "
        "token (the pool passes it)")] = None,
    callback_token_file: Annotated[str | None, typer.Option(
        "--callback-token-file", help="Its own token for the ready callback (the pool "
        "passes it)")] = None,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file")] = None,
    embedding: Annotated[bool, typer.Option(
        "--embedding", help="Serve embeddings (POST /v2/embed) instead of generation")] = False,
    chat_template_file: Annotated[str | None, typer.Option(
        "--chat-template-file",
        help="Jinja chat template used instead of the model's own")] = None,
    n_gpu_layers: Annotated[int | None, typer.Option(
        "--n-gpu-layers", min=0, help="Layers on the GPU, the rest in RAM")] = None,
    tensor_split: Annotated[str | None, typer.Option(
        "--tensor-split", help="Each GPU's share of the model, by index: 0.67,0.33")] = None,
    tls_cert: Annotated[str | None, tls_cert_option()] = None,
    tls_key: Annotated[str | None, tls_key_option()] = None,
    ca_file: Annotated[str | None, ca_file_option()] = None,
    rpc: Annotated[str | None, typer.Option(
        "--rpc", help="llama.cpp RPC servers holding part of the model: loopback HOST:PORT "
        "or a pool's tunnel rbees-rpc[s]://HOST:PORT/SERVER_ID, comma-separated "
        "(--tensor-split then gives this device's share first)")] = None,
    rpc_token_file: Annotated[str | None, typer.Option(
        "--rpc-token-file", help="The lending pool's control token, for --rpc tunnels")
    ] = None,
    log_level: Annotated[str | None, log_level_option()] = None,
    log_to: Annotated[str | None, log_to_option()] = None,
) -> None:
    """Start the worker (it listens at once, then loads the model). Its pool passes
    --tls-cert and --tls-key when the pool serves HTTPS."""
    from rbees_core.config import load_config, load_token, read_token_file
    from rbees_core.refs import validate_ref
    from rbees_core.schema import check_string
    from rbees_core.tls import server_tls, use_ca_file

    try:
        check_string(worker_id, "--worker-id", {"pattern": ID_PATTERN})
        validate_ref(model, "--model")
        cfg = load_config(config, flags={"worker": {
            "slots": slots, "ctx": ctx, "threads": threads,
            "chat_template_file": chat_template_file}})
        settings = settings_from(
            cfg, worker_id=worker_id, model=model, backend=backend, device=device, bind=bind,
            port=port, callback_url=callback_url, token=load_token(api_token_file),
            embedding=embedding, n_gpu_layers=n_gpu_layers,
            tensor_split=parse_shares(tensor_split) if tensor_split else None,
            control_token=read_token_file(control_token_file) if control_token_file else None,
            callback_token=read_token_file(callback_token_file) if callback_token_file
            else None, tls=server_tls(tls_cert, tls_key, config=cfg),
            rpc=tuple(e.strip() for e in rpc.split(",") if e.strip()) if rpc else (),
            rpc_token=read_token_file(rpc_token_file) if rpc_token_file else None)
        use_ca_file(ca_file or cfg.tls.ca_file)  # its ready callback
        if cpus is not None:
            pin(cpus)
        pm = plugins.make_manager(plugins.builtin_plugins())
    except RbeesError as exc:
        fail(PROGRAM, exc)
    raise typer.Exit(launch(PROGRAM, run(settings, pm)))


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name=PROGRAM)


__all__ = ["ID_PATTERN", "WorkerState", "main", "run"]
if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())  # type: ignore[func-returns-value]
