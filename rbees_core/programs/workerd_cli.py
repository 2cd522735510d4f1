"""Command line of rbees-workerd (flags of CONTRACT section 2)."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from rbees_core.errors import RbeesError
from rbees_core.models import DEFAULT_MODEL_REF

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
    callback_url: Annotated[str | None, typer.Option("--callback-url")] = None,
    api_token_file: Annotated[str | None, typer.Option("--api-token-file")] = None,
    config: Annotated[str | None, typer.Option("--config", help="TOML config file")] = None,
) -> None:
    """Start the worker (it listens at once, then loads the model)."""
    from rbees_core import plugins
    from rbees_core.api.common import ID_PATTERN
    from rbees_core.config import load_config, load_token
    from rbees_core.http import run_daemon
    from rbees_core.programs import workerd
    from rbees_core.refs import validate_ref
    from rbees_core.schema import check_string

    try:
        check_string(worker_id, "--worker-id", {"pattern": ID_PATTERN})
        validate_ref(model, "--model")
        cfg = load_config(config, flags={"worker": {"slots": slots, "ctx": ctx,
                                                    "threads": threads}})
        settings = workerd.settings_from(
            cfg, worker_id=worker_id, model=model, backend=backend, device=device, bind=bind,
            port=port, callback_url=callback_url, token=load_token(api_token_file))
        pm = plugins.make_manager(plugins.builtin_plugins())
    except RbeesError as exc:
        fail(exc)
    code = run_daemon(workerd.run(settings, pm))
    raise typer.Exit(code)


def fail(exc: RbeesError) -> None:
    if os.environ.get("RBEES_DEBUG") == "1":
        raise exc
    typer.echo(f"rbees-workerd: error: {exc.message}", err=True)
    sys.exit(1)
