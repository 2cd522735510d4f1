"""``rbees-pool git status|pull|submodules list|status|update``: the pool's checkout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import FormatOption, OutputFormat, print_json, print_table

PROGRAM = "rbees-pool"
CheckoutOption = Annotated[str | None, typer.Option(
    "--checkout", metavar="PATH",
    help="The git checkout (default: [pool] checkout in the config, RBEES_POOL_CHECKOUT).")]
SUBMODULE_COLUMNS = ("path", "state", "commit", "describe", "url")


def checkout_path(flag: str | None) -> Path:
    """``--checkout`` > ``RBEES_POOL_CHECKOUT`` > ``[pool] checkout``."""
    from rbees_core.config import load_config

    return load_config(flags={"pool": {"checkout": flag}}).pool.checkout_path()


def _short(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "commit": (row.get("commit") or "")[:12] or None}


def print_status(info: dict[str, Any]) -> None:
    """``git status``'s JSON as text."""
    print(f"{'path:':11}{info['path']}")
    print(f"{'branch:':11}{info['branch'] or '(detached)'} at {(info['commit'] or '-')[:12]}")
    tracking = f"{info['upstream']} (ahead {info['ahead']}, behind {info['behind']})" \
        if info["upstream"] else "- (no upstream)"
    print(f"{'upstream:':11}{tracking}")
    changes = f"{len(info['changes'])} changed" if info["dirty"] else "clean"
    if info["untracked"]:
        changes += f", {len(info['untracked'])} untracked"
    print(f"{'tree:':11}{changes}")
    for name, url in info["remotes"].items():
        print(f"{'remote:':11}{name} {url}")


def print_pull(result: dict[str, Any]) -> None:
    """``git pull``'s JSON as text."""
    if result["updated"]:
        print(f"{result['branch']}: {result['before'][:12]} -> {result['after'][:12]}")
    else:
        print(f"{result['branch']}: already up to date at {(result['after'] or '-')[:12]}")
    for sub in result["submodules"]:
        print(f"  {sub['path']}: {sub['state']} at {sub['commit'][:12]}")


def print_submodules(rows: list[dict[str, Any]]) -> None:
    """``git submodules list``'s JSON as text."""
    print_table(rows, ("name", "path", "url", "branch"))


def print_submodule_states(rows: list[dict[str, Any]]) -> None:
    """``git submodules status|update``'s JSON as text."""
    print_table([_short(r) for r in rows], SUBMODULE_COLUMNS)


def status(checkout: CheckoutOption = None, fmt: FormatOption = OutputFormat.text) -> None:
    """Show the checkout's branch, commit, upstream and local changes."""
    from rbees_core.pool import git

    info = git.status(checkout_path(checkout))
    print_json(info) if fmt is OutputFormat.json else print_status(info)


def pull(checkout: CheckoutOption = None, fmt: FormatOption = OutputFormat.text) -> None:
    """Fast-forward the checkout from its upstream and update its submodules.

    Refuses uncommitted changes, a detached HEAD and a branch without upstream.
    """
    from rbees_core.pool import git

    result = git.pull(checkout_path(checkout))
    print_json(result) if fmt is OutputFormat.json else print_pull(result)


def submodules_list(checkout: CheckoutOption = None,
                    fmt: FormatOption = OutputFormat.text) -> None:
    """List the submodules declared in .gitmodules."""
    from rbees_core.pool import git

    rows = git.submodule_list(checkout_path(checkout))
    print_json(rows) if fmt is OutputFormat.json else print_submodules(rows)


def submodules_status(checkout: CheckoutOption = None,
                      fmt: FormatOption = OutputFormat.text) -> None:
    """Show each submodule's state (ok, uninitialized, modified, conflict) and commit."""
    from rbees_core.pool import git

    rows = git.submodule_status(checkout_path(checkout))
    print_json(rows) if fmt is OutputFormat.json else print_submodule_states(rows)


def submodules_update(
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="[PATH]...", help="Submodule paths (default: all).")] = None,
    remote: Annotated[bool, typer.Option(
        "--remote", help="Move to the tip of each submodule's remote branch instead of the "
                         "recorded commit.")] = False,
    checkout: CheckoutOption = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Initialise and check out submodules at their recorded commits."""
    from rbees_core.pool import git

    rows = git.submodule_update(checkout_path(checkout), paths or [], remote=remote)
    print_json(rows) if fmt is OutputFormat.json else print_submodule_states(rows)


def register(app: typer.Typer) -> None:
    group = typer.Typer(name="git", no_args_is_help=True,
                        help="The pool's git checkout ([pool] checkout) and its submodules.")
    group.command("status")(status)
    group.command("pull")(pull)
    subs = typer.Typer(name="submodules", no_args_is_help=True,
                       help="List, inspect and update the checkout's submodules.")
    subs.command("list")(submodules_list)
    subs.command("status")(submodules_status)
    subs.command("update")(submodules_update)
    group.add_typer(subs)
    app.add_typer(group)


#: How each command's JSON reads as text (``rbees pool ... --host`` renders remote JSON).
TEXT_RENDERERS = {
    ("git", "status"): print_status,
    ("git", "pull"): print_pull,
    ("git", "submodules", "list"): print_submodules,
    ("git", "submodules", "status"): print_submodule_states,
    ("git", "submodules", "update"): print_submodule_states,
}


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str) -> None:
    if program == PROGRAM:
        register(app)
