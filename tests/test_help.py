"""``--help`` of every console script and of every command and sub-command exits 0 and says
something, on the typer the project pins (tests/test_library_internals.py checks the pin).

Each console script runs once as a real process, from its entry point in pyproject.toml; the
command trees are walked in-process with click's runner, which is fast enough for all of
them. A help text that rich would read as markup (``[/FILE]``) crashed ``rbees-workerd
--help`` once; these tests are what would have caught it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
#: The console scripts of rbees-core (the root) and of the distributions beside it
#: (rbees-testing's bdd-runner).
SCRIPTS: dict[str, str] = {
    name: target
    for pyproject in (ROOT / "pyproject.toml", *sorted(ROOT.glob("distributions/*/pyproject.toml")))
    for name, target in tomllib.loads(pyproject.read_text())["project"].get("scripts", {}).items()
}


def rbees_app() -> typer.Typer:
    from rbees_core.programs import cli_common, rbees_cli

    return rbees_cli.create_app(cli_common.make_plugin_manager(rbees_cli.builtin_plugins()))


def pool_app() -> typer.Typer:
    from rbees_core.programs import cli_common, pool_cli

    return pool_cli.create_app(cli_common.make_plugin_manager(pool_cli.builtin_plugins()))


def workerd_app() -> typer.Typer:
    from rbees_core.programs import workerd

    return workerd.app


def pool_managerd_app() -> typer.Typer:
    from rbees_core.programs import pool_managerd

    return pool_managerd.app


def orcd_app() -> typer.Typer:
    from rbees_core.programs import orcd

    return orcd.app


def bdd_runner_app() -> typer.Typer:
    from rbees_core.programs import bdd_runner

    return bdd_runner.app


#: The typer app behind each console script, as its ``main()`` builds it.
APPS: dict[str, Callable[[], typer.Typer]] = {
    "rbees": rbees_app,
    "rbees-pool": pool_app,
    "rbees-workerd": workerd_app,
    "pool-managerd": pool_managerd_app,
    "rbees-orcd": orcd_app,
    "bdd-runner": bdd_runner_app,
}


def test_every_console_script_has_its_app_here() -> None:
    assert set(APPS) == set(SCRIPTS), "add the new console script's app to APPS"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_of_the_console_script_in_its_own_process(script: str) -> None:
    module, _, function = SCRIPTS[script].partition(":")
    code = (f"import sys; sys.argv[0] = {script!r}; "
            f"from {module} import {function}; {function}()")
    env = {**os.environ, "COLUMNS": "100", "RBEES_DISABLE_PLUGIN_AUTOLOAD": ""}
    done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: "), done.stdout
    assert not done.stderr, done.stderr


def command_paths(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """``path`` and the path of every command below ``command`` (typer's click command),
    hidden ones included."""
    yield path
    if isinstance(command, TyperGroup):
        ctx = typer.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name!r} but cannot make it"
            yield from command_paths(sub, (*path, name))


def every_command() -> Iterator[tuple[str, tuple[str, ...]]]:
    for script in sorted(APPS):
        for path in command_paths(get_command(APPS[script]())):
            yield script, path


@pytest.mark.parametrize(("script", "path"), list(every_command()),
                         ids=lambda value: " ".join(value) if isinstance(value, tuple)
                         else value)
def test_help_of_every_command(script: str, path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(APPS[script](), [*path, "--help"], prog_name=script,
                                env={"COLUMNS": "100"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    usage = " ".join(("Usage:", script, *path))
    assert result.output.startswith(usage), result.output
    assert len(result.output.splitlines()) > 2, result.output


def test_the_walk_sees_the_command_trees() -> None:
    paths = {" ".join((script, *path)) for script, path in every_command()}
    assert {"rbees", "rbees-pool models list", "rbees-workerd", "bdd-runner"} <= paths
    assert sum(p.startswith("rbees ") for p in paths) >= 10, sorted(paths)
