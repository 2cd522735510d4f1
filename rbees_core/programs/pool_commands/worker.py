"""``rbees-pool worker spawn|list|stop|logs``: workers on this host, no daemon needed."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import FormatOption, OutputFormat, print_json, print_table

COLUMNS = ("worker_id", "state", "model_ref", "backend", "device", "uri", "pid", "slots_total",
           "slots_free", "threads", "cpus")


def _progress(fraction: float) -> None:
    if sys.stderr.isatty():
        width = 30
        done = int(fraction * width)
        sys.stderr.write(f"\rloading [{'#' * done}{'.' * (width - done)}] {fraction:4.0%}")
        if fraction >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()


def print_spawned(record: dict[str, Any]) -> None:
    """``worker spawn``'s JSON as text."""
    print(f"{record['worker_id']} {record['uri']}")


def print_list(rows: list[dict[str, Any]]) -> None:
    """``worker list``'s JSON as text; ``cpus`` as a CPU list (``0,1``, ``shared`` after a
    worker's that shares them)."""
    shown = []
    for row in rows:
        cpus = row.get("cpus")
        text = "" if not cpus else ",".join(str(c) for c in cpus)
        shown.append({**row, "cpus": f"{text} shared" if row.get("cpu_shared") else text})
    print_table(shown, COLUMNS)


def print_stopped(rows: list[dict[str, Any]]) -> None:
    """``worker stop``'s JSON as text."""
    print_table(rows, ("worker_id", "state", "pid"))


def spawn(
    kind: Annotated[str, typer.Argument(help="cpu, cuda or metal")],
    model: Annotated[str, typer.Option("--model", help="Catalog id or model reference")],
    device: Annotated[int | None, typer.Option("--device", min=0,
                                               help="GPU index (cuda, metal)")] = None,
    port: Annotated[int | None, typer.Option("--port", min=8001, max=8999)] = None,
    slots: Annotated[int, typer.Option("--slots", min=1, max=64)] = 1,
    ctx: Annotated[int | None, typer.Option("--ctx", min=16)] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1, help="Cores to give it (default: every free one; 1 on a GPU)")
    ] = None,
    backend: Annotated[str, typer.Option("--backend", help="llamacpp or torch")] = "llamacpp",
    embedding: Annotated[bool, typer.Option(
        "--embedding", help="An embedding worker: serves embeddings, not generation")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Ready wait, s")] = 60.0,
    n_gpu_layers: Annotated[int | None, typer.Option(
        "--n-gpu-layers", min=0, help="Layers on the GPU, the rest in RAM")] = None,
    tensor_split: Annotated[str | None, typer.Option(
        "--tensor-split", help="Each GPU's share of the model, by index: 0.67,0.33")] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Preflight, start a worker in the background and wait until it is ready."""
    from rbees_core.errors import InvalidParamsError
    from rbees_core.plugins import builtin_plugins, make_manager
    from rbees_core.pool import workers
    from rbees_core.refs import validate_ref

    if kind not in ("cpu", "cuda", "metal", "mps"):
        raise InvalidParamsError("kind", "must be cpu, cuda, metal or mps")
    validate_ref(model, "--model")
    from rbees_core.planning import parse_shares

    split = parse_shares(tensor_split) if tensor_split else None
    dev = kind if device is None else f"{kind}:{device}"
    from rbees_core.pool import via_daemon

    url = via_daemon.daemon_url()
    if url is not None:
        body = {"model_ref": model, "backend": backend, "device": dev, "slots": slots}
        if ctx:
            body["ctx"] = ctx
        if threads:
            body["threads"] = threads
        if embedding:
            body["embedding"] = True
        if n_gpu_layers is not None:
            body["n_gpu_layers"] = n_gpu_layers
        if split:
            body["tensor_split"] = list(split)
        row = via_daemon.spawn(url, body, port=port, timeout=timeout)
        print_json(row) if fmt is OutputFormat.json else print_spawned(row)
        return
    pm = make_manager(builtin_plugins())
    req = workers.SpawnRequest(model_ref=model, backend=backend, device=dev, slots=slots,
                               ctx=ctx, threads=threads, port=port, embedding=embedding,
                               n_gpu_layers=n_gpu_layers, tensor_split=split)
    record = workers.spawn(pm, req)
    if fmt is OutputFormat.text:
        print(f"starting {record.worker_id} (pid {record.pid}) on {record.uri}", file=sys.stderr)
    record = workers.wait_ready(record, timeout=timeout, on_progress=_progress)
    print_json(record.to_dict()) if fmt is OutputFormat.json else print_spawned(record.to_dict())


def list_(fmt: FormatOption = OutputFormat.text) -> None:
    """Workers on this host with their live state; dead processes show as dead."""
    from rbees_core.pool import via_daemon, workers

    url = via_daemon.daemon_url()
    rows = via_daemon.list_workers(url) if url else workers.list_workers()
    print_json(rows) if fmt is OutputFormat.json else print_list(rows)


def stop(
    worker_id: Annotated[str | None, typer.Argument(help="Worker to stop")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every worker")] = False,
    grace: Annotated[float, typer.Option("--grace", min=0, help="Drain time before SIGKILL")
                     ] = 30.0,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Drain and stop workers (SIGKILL after the grace period)."""
    from rbees_core.errors import InvalidParamsError
    from rbees_core.pool import via_daemon, workers

    if all_ == (worker_id is not None):
        raise InvalidParamsError("worker_id", "give a worker id or --all")
    url = via_daemon.daemon_url()
    if url is not None:
        ids = [w["worker_id"] for w in via_daemon.list_workers(url)
               if w["state"] not in ("stopped", "failed")] if all_ else [worker_id or ""]
        done = [via_daemon.stop(url, i, grace=grace) for i in ids]
    else:
        ids = [r.worker_id for r in workers.records()] if all_ else [worker_id or ""]
        done = [workers.stop(i, grace=grace).to_dict() for i in ids]
    print_json(done) if fmt is OutputFormat.json else print_stopped(done)


def logs(
    worker_id: Annotated[str, typer.Argument(help="Worker whose log to show")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines")
                      ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1)] = 50,
) -> None:
    """Print a worker's log (JSON lines), optionally following it."""
    from rbees_core.errors import NotFoundError
    from rbees_core.pool import workers

    if not workers.log_path(worker_id).exists():
        raise NotFoundError(f"no log for worker {worker_id!r}")
    if not follow:
        print(workers.tail(worker_id, lines))
        return
    try:
        for line in workers.follow(worker_id):
            print(line, flush=True)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


#: How each command's JSON reads as text (``rbees pool ... --host`` renders remote JSON).
TEXT_RENDERERS = {
    ("worker", "spawn"): print_spawned,
    ("worker", "list"): print_list,
    ("worker", "stop"): print_stopped,
}


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str) -> None:
    if program != "rbees-pool":
        return
    group = typer.Typer(name="worker", help="Start, list, stop workers on this host.",
                        no_args_is_help=True)
    group.command("spawn")(spawn)
    group.command("list")(list_)
    group.command("stop")(stop)
    group.command("logs")(logs)
    app.add_typer(group)
