"""``rbees models retry MODEL [--pool P]``: try again a model marked failed on pools.

A pool marks a model failed after it failed to load there ``[pool] max_load_failures`` times
in a row (:mod:`rbees_core.pool.load_marks`); jobs for it then end with
``MODEL_LOAD_FAILED`` and no worker is started for it. Once the cause is fixed (a new file,
more memory), ``retry`` asks rbees-orcd (``POST /v2/models/retry``) to clear the mark on
the pool, or on every pool, and the next job for the model starts a worker again.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import FormatOption, OutputFormat, print_json


def retry(
    model: Annotated[str, typer.Argument(help="Catalog id or model reference")],
    pool: Annotated[str | None, typer.Option("--pool", help="This pool only (default: all)")
                    ] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Clear MODEL's failed mark so that workers may be started for it again."""
    from rbees_core.errors import RbeesError
    from rbees_core.programs.rbees_commands.jobs import _request

    body = {"model": model, **({"pool": pool} if pool else {})}
    _, answer = _request("POST", "/v2/models/retry", json=body)
    if fmt is OutputFormat.json:
        print_json(answer)
    failed = []
    for entry in answer.get("pools", []):
        pool_id = entry.get("pool_id")
        if "error" in entry:
            failed.append(f"{pool_id}: {entry['error'].get('message')}")
            continue
        if fmt is OutputFormat.json:
            continue
        cleared = entry.get("cleared") or []
        if not cleared:
            print(f"pool {pool_id}: {model} was not marked failed")
        for mark in cleared:
            print(f"pool {pool_id}: cleared {mark.get('model_ref')} (failed to load "
                  f"{mark.get('attempts')} times: {mark.get('reason')})")
    if not answer.get("pools") and fmt is OutputFormat.text:
        print("no pool is registered", file=sys.stderr)
    if failed:
        raise RbeesError("could not ask pool " + "; pool ".join(failed))


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str) -> None:
    if program != "rbees":
        return
    group = typer.Typer(name="models", help="Models across the cluster's pools.",
                        no_args_is_help=True)
    group.command("retry")(retry)
    app.add_typer(group)
