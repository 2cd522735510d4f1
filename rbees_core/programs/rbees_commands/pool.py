"""``rbees pool status|models ...|worker ...|git ... --host NAME|all``: the pools on hosts.

The commands take rbees-pool's own arguments plus ``--host`` and ``--host-timeout``. Each
calls one operation of the host's typed pool client (:mod:`rbees_core.pool_client`, from
the host's transport: ssh, http, local) and renders the answer with rbees-pool's own text
renderers, or prints it with ``--format json``; how that runs on one host or on all of them
is :mod:`rbees_core.programs.rbees_commands.pool_runner`. A download's progress is shown as
it arrives; a failed command's remote exit code becomes ours.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import pluggy
import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.pool_client import to_json as plain
from rbees_core.programs.cli_common import FormatOption, OutputFormat, TerminalProgress
from rbees_core.programs.pool_commands import git as git_cli
from rbees_core.programs.pool_commands import models as models_cli
from rbees_core.programs.pool_commands import status as status_cli
from rbees_core.programs.pool_commands import worker as worker_cli
from rbees_core.programs.rbees_commands.pool_runner import Operation, run_on

if TYPE_CHECKING:
    from rbees_core.errors import RbeesError
    from rbees_core.interfaces import DownloadProgress
    from rbees_core.pool_client import PoolClient

PROGRAM = "rbees"

HostOption = Annotated[str, typer.Option(
    "--host", metavar="NAME", help="The pool host (rbees hosts list), or all.")]
HostTimeoutOption = Annotated[float | None, typer.Option(
    "--host-timeout", min=0.1, metavar="SECONDS",
    help="Give up on a host after this long (default: no limit once connected; connecting "
         "always times out after the host's connect_timeout_s, 10 s).")]
ModelArg = models_cli.ModelArg
CheckoutOption = git_cli.CheckoutOption
WorkerIdArg = Annotated[str, typer.Argument(help="Worker id")]


def _run(pm: pluggy.PluginManager, op: Operation, host: str, fmt: OutputFormat | None,
         timeout: float | None) -> None:
    code = run_on(pm, op, host=host, fmt=fmt, timeout=timeout)
    if code:
        raise typer.Exit(code)


def _status(pm: pluggy.PluginManager, app: typer.Typer) -> None:
    @app.command("status")
    def status_command(fmt: FormatOption = OutputFormat.text, *, host: HostOption,
                       host_timeout: HostTimeoutOption = None) -> None:
        """Show the host's devices, the models on disk and the workers."""
        async def call(c: PoolClient) -> Any:
            return await c.status()

        _run(pm, Operation(call, status_cli.print_text), host, fmt, host_timeout)


def _verify_failed(rows: list[dict[str, Any]]) -> RbeesError | None:
    from rbees_core.errors import ChecksumMismatchError

    bad = [r for r in rows if r.get("ok") is False]
    if not bad:
        return None
    return ChecksumMismatchError(f"{bad[0]['path']}: sha256 {bad[0]['sha256']} differs from "
                                 f"the expected {bad[0]['expected_sha256']}")


def _download(model: str, force: bool, fmt: OutputFormat, streaming: bool) -> Operation:
    """``models download``: progress as it arrives on one host (a bar, or JSON lines)."""
    from rbees_core.errors import RbeesError

    def end_json(end: Any) -> dict[str, Any]:
        return {"event": "end", **plain(end)}

    def progress(p: DownloadProgress) -> None:
        if fmt is OutputFormat.json:
            print(json.dumps({"event": "progress", "stage": p.stage,
                              "bytes_done": p.bytes_done, "bytes_total": p.bytes_total,
                              "rate_bps": round(p.rate_bps)}), flush=True)
        elif bar is not None:
            bar(p.bytes_done, p.bytes_total, p.rate_bps, p.stage)

    bar = TerminalProgress(model) if streaming and fmt is OutputFormat.text else None

    async def call(c: PoolClient) -> Any:
        try:
            return await c.models_download(model, force=force,
                                           progress=progress if streaming else None)
        except RbeesError as exc:
            if streaming and fmt is OutputFormat.json:
                print(json.dumps({"event": "error", "code": exc.code, "message": exc.message,
                                  "retriable": exc.retriable}), flush=True)
            raise
        finally:
            if bar is not None:
                bar.close()

    return Operation(call, lambda end: models_cli.print_downloaded({**end, "event": "end"}),
                     as_json=end_json, json_lines=True)


def _models(pm: pluggy.PluginManager, app: typer.Typer) -> None:
    group = typer.Typer(name="models", no_args_is_help=True,
                        help="The model catalog and the models on this host.")

    @group.command("catalog")
    def catalog_command(fmt: FormatOption = OutputFormat.text, *, host: HostOption,
                        host_timeout: HostTimeoutOption = None) -> None:
        """List the models rbees knows by id, and whether each is on this host."""
        async def call(c: PoolClient) -> Any:
            return await c.models_catalog()

        _run(pm, Operation(call, models_cli.print_catalog), host, fmt, host_timeout)

    @group.command("search")
    def search_command(
        text: Annotated[list[str], typer.Argument(
            metavar="TEXT...", help="Words to find: in ids, aliases (qwen2.5:7b), names, "
            "families, tags (coder, reasoning, embedding), kind and size class.")],
        fmt: FormatOption = OutputFormat.text, *, host: HostOption,
        host_timeout: HostTimeoutOption = None,
    ) -> None:
        """Find catalog models on the host's catalog: entries matching every word, an exact
        id or alias first (exit 1 when nothing matches)."""
        from rbees_core.catalog import search_rows

        query = " ".join(text)

        async def call(c: PoolClient) -> Any:
            return [dict(r) for r in search_rows(await c.models_catalog(), query)]

        def none_match(rows: list[dict[str, Any]]) -> RbeesError | None:
            from rbees_core.errors import ModelNotFoundError

            return None if rows else ModelNotFoundError(
                f"no catalog model matches {query!r}", details={"model": query})

        _run(pm, Operation(call, models_cli.print_catalog, check=none_match), host, fmt,
             host_timeout)

    @group.command("list")
    def list_command(fmt: FormatOption = OutputFormat.text, *, host: HostOption,
                     host_timeout: HostTimeoutOption = None) -> None:
        """List the models on this host (downloaded, and provided by installed packages)."""
        async def call(c: PoolClient) -> Any:
            return await c.models_list()

        _run(pm, Operation(call, models_cli.print_list), host, fmt, host_timeout)

    @group.command("download")
    def download_command(
        model: ModelArg,
        force: Annotated[bool, typer.Option(
            "--force", help="Download again even if the model is already here.")] = False,
        fmt: FormatOption = OutputFormat.text, *, host: HostOption,
        host_timeout: HostTimeoutOption = None,
    ) -> None:
        """Download a model, resuming an interrupted download, and verify its sha256.

        A progress bar shows on a terminal, nothing on a pipe; --format json writes JSON
        lines: {"event": "progress", ...} then {"event": "end", ...} (or "error").
        """
        from rbees_core.hosts import ALL

        _run(pm, _download(model, force, fmt, streaming=host != ALL), host, fmt,
             host_timeout)

    @group.command("info")
    def info_command(model: ModelArg, fmt: FormatOption = OutputFormat.text, *,
                     host: HostOption, host_timeout: HostTimeoutOption = None) -> None:
        """Show a model's catalog entry and its copies on this host."""
        async def call(c: PoolClient) -> Any:
            return await c.models_info(model)

        _run(pm, Operation(call, models_cli.print_info), host, fmt, host_timeout)

    @group.command("verify")
    def verify_command(model: ModelArg, fmt: FormatOption = OutputFormat.text, *,
                       host: HostOption, host_timeout: HostTimeoutOption = None) -> None:
        """Hash a model's local copies and compare with their known sha256 (exit 1 if one
        differs)."""
        async def call(c: PoolClient) -> Any:
            return await c.models_verify(model)

        _run(pm, Operation(call, models_cli.print_verify, check=_verify_failed), host, fmt,
             host_timeout)

    @group.command("rm")
    def rm_command(
        model: ModelArg,
        force: Annotated[bool, typer.Option(
            "--force", help="Remove it even if a running worker has it loaded.")] = False,
        fmt: FormatOption = OutputFormat.text, *, host: HostOption,
        host_timeout: HostTimeoutOption = None,
    ) -> None:
        """Delete a downloaded model from this host."""
        async def call(c: PoolClient) -> Any:
            return await c.models_remove(model, force=force)

        _run(pm, Operation(call, models_cli.print_removed), host, fmt, host_timeout)

    app.add_typer(group)


def _workers(pm: pluggy.PluginManager, app: typer.Typer) -> None:
    group = typer.Typer(name="worker", help="Start, list, stop workers on this host.",
                        no_args_is_help=True)

    @group.command("spawn")
    def spawn_command(
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
        backend: Annotated[str, typer.Option("--backend", help="llamacpp or torch")
                           ] = "llamacpp",
        embedding: Annotated[bool, typer.Option(
            "--embedding", help="An embedding worker: serves embeddings, not generation")
        ] = False,
        timeout: Annotated[float, typer.Option("--timeout", min=1, help="Ready wait, s")
                           ] = 60.0,
        n_gpu_layers: Annotated[int | None, typer.Option(
            "--n-gpu-layers", min=0, help="Layers on the GPU, the rest in RAM")] = None,
        tensor_split: Annotated[str | None, typer.Option(
            "--tensor-split", help="Each GPU's share of the model, by index: 0.67,0.33")
        ] = None,
        fmt: FormatOption = OutputFormat.text, *, host: HostOption,
        host_timeout: HostTimeoutOption = None,
    ) -> None:
        """Preflight, start a worker in the background and wait until it is ready."""
        from rbees_core.api.pool import WorkerStartRequest
        from rbees_core.errors import InvalidParamsError
        from rbees_core.planning import parse_shares

        if kind not in ("cpu", "cuda", "metal", "mps"):
            raise InvalidParamsError("kind", "must be cpu, cuda, metal or mps")
        request = WorkerStartRequest(
            model_ref=model, backend=backend, slots=slots, ctx=ctx, threads=threads,
            embedding=embedding, device=kind if device is None else f"{kind}:{device}",
            n_gpu_layers=n_gpu_layers,
            tensor_split=list(parse_shares(tensor_split)) if tensor_split else None)

        async def call(c: PoolClient) -> Any:
            return await c.worker_start(request, port=port, timeout_s=timeout)

        _run(pm, Operation(call, worker_cli.print_spawned), host, fmt, host_timeout)

    @group.command("list")
    def list_command(fmt: FormatOption = OutputFormat.text, *, host: HostOption,
                     host_timeout: HostTimeoutOption = None) -> None:
        """Workers on this host with their live state; dead processes show as dead."""
        async def call(c: PoolClient) -> Any:
            return await c.worker_list()

        _run(pm, Operation(call, worker_cli.print_list), host, fmt, host_timeout)

    @group.command("stop")
    def stop_command(
        worker_id: Annotated[str | None, typer.Argument(help="Worker to stop")] = None,
        all_: Annotated[bool, typer.Option("--all", help="Stop every worker")] = False,
        grace: Annotated[float | None, typer.Option(
            "--grace", min=0, help="Drain time before SIGKILL (default: 30 s; over http, the "
                                   "pool's own)")] = None,
        fmt: FormatOption = OutputFormat.text, *, host: HostOption,
        host_timeout: HostTimeoutOption = None,
    ) -> None:
        """Drain and stop workers (SIGKILL after the grace period)."""
        from rbees_core.errors import InvalidParamsError

        if all_ == (worker_id is not None):
            raise InvalidParamsError("worker_id", "give a worker id or --all")

        async def call(c: PoolClient) -> Any:
            if worker_id is None:
                return await c.worker_stop_all(grace_s=grace)
            return [await c.worker_stop(worker_id, grace_s=grace)]

        _run(pm, Operation(call, worker_cli.print_stopped), host, fmt, host_timeout)

    @group.command("logs")
    def logs_command(
        worker_id: Annotated[str, typer.Argument(help="Worker whose log to show")],
        follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines")
                          ] = False,
        lines: Annotated[int, typer.Option("--lines", "-n", min=1)] = 50,
        *, host: HostOption, host_timeout: HostTimeoutOption = None,
    ) -> None:
        """Print a worker's log (JSON lines), optionally following it."""
        from rbees_core.hosts import ALL

        def echo(line: str) -> None:
            print(line, flush=True)

        streaming = host != ALL

        async def call(c: PoolClient) -> Any:
            return await c.worker_logs(worker_id, lines=lines, follow=follow,
                                       on_line=echo if streaming else None)

        def render(got: list[str]) -> None:
            if not streaming:
                for line in got:
                    echo(line)

        _run(pm, Operation(call, render), host, None, host_timeout)

    app.add_typer(group)


def _git(pm: pluggy.PluginManager, app: typer.Typer) -> None:
    group = typer.Typer(name="git", no_args_is_help=True,
                        help="The pool's git checkout ([pool] checkout) and its submodules.")
    subs = typer.Typer(name="submodules", no_args_is_help=True,
                       help="List, inspect and update the checkout's submodules.")

    @group.command("status")
    def status_command(checkout: CheckoutOption = None, fmt: FormatOption = OutputFormat.text,
                       *, host: HostOption, host_timeout: HostTimeoutOption = None) -> None:
        """Show the checkout's branch, commit, upstream and local changes."""
        async def call(c: PoolClient) -> Any:
            return await c.git_status(checkout=checkout)

        _run(pm, Operation(call, git_cli.print_status), host, fmt, host_timeout)

    @group.command("pull")
    def pull_command(checkout: CheckoutOption = None, fmt: FormatOption = OutputFormat.text,
                     *, host: HostOption, host_timeout: HostTimeoutOption = None) -> None:
        """Fast-forward the checkout from its upstream and update its submodules.

        Refuses uncommitted changes, a detached HEAD and a branch without upstream.
        """
        async def call(c: PoolClient) -> Any:
            return await c.git_pull(checkout=checkout)

        _run(pm, Operation(call, git_cli.print_pull), host, fmt, host_timeout)

    @subs.command("list")
    def submodules_list(checkout: CheckoutOption = None,
                        fmt: FormatOption = OutputFormat.text, *, host: HostOption,
                        host_timeout: HostTimeoutOption = None) -> None:
        """List the submodules declared in .gitmodules."""
        async def call(c: PoolClient) -> Any:
            return await c.git_submodules(checkout=checkout)

        _run(pm, Operation(call, git_cli.print_submodules), host, fmt, host_timeout)

    @subs.command("status")
    def submodules_status(checkout: CheckoutOption = None,
                          fmt: FormatOption = OutputFormat.text, *, host: HostOption,
                          host_timeout: HostTimeoutOption = None) -> None:
        """Show each submodule's state (ok, uninitialized, modified, conflict) and commit."""
        async def call(c: PoolClient) -> Any:
            return await c.git_submodule_status(checkout=checkout)

        _run(pm, Operation(call, git_cli.print_submodule_states), host, fmt, host_timeout)

    @subs.command("update")
    def submodules_update(
        paths: Annotated[list[str] | None, typer.Argument(
            metavar="[PATH]...", help="Submodule paths (default: all).")] = None,
        remote: Annotated[bool, typer.Option(
            "--remote", help="Move to the tip of each submodule's remote branch instead of "
                             "the recorded commit.")] = False,
        checkout: CheckoutOption = None,
        fmt: FormatOption = OutputFormat.text, *, host: HostOption,
        host_timeout: HostTimeoutOption = None,
    ) -> None:
        """Initialise and check out submodules at their recorded commits."""
        async def call(c: PoolClient) -> Any:
            return await c.git_submodule_update(paths or [], remote=remote,
                                                checkout=checkout)

        _run(pm, Operation(call, git_cli.print_submodule_states), host, fmt, host_timeout)

    group.add_typer(subs)
    app.add_typer(group)


def pool_app(pm: pluggy.PluginManager) -> typer.Typer:
    """The ``pool`` group: rbees-pool's status, models, worker and git commands on hosts."""
    app = typer.Typer(name="pool", no_args_is_help=True, help=(
        "Run rbees-pool's commands on pool hosts (--host NAME or all), over each host's "
        "transport (ssh, http, local)."))
    for add in (_status, _models, _workers, _git):
        add(pm, app)
    return app


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    if program == PROGRAM:
        app.add_typer(pool_app(pm))

