"""What the ``rbees`` and ``rbees-pool`` command lines share (CONTRACT section 6).

- :func:`new_app` builds a root typer app the same way for both: help on no arguments, no
  shell-completion commands, no REPL, ``--version``.
- :data:`FormatOption` is the ``--format text|json`` option of every command that prints
  data; :func:`emit` prints rows as a text table or as JSON on stdout. Diagnostics go to
  stderr.
- :func:`run` is every CLI's ``main()``: it builds the plugin manager and the app, lets
  plugins add commands through :func:`rbees_core.hookspecs.rbees_register_cli`, runs it, and
  turns an :class:`rbees_core.errors.RbeesError` into one line on stderr and exit status 1
  (``RBEES_DEBUG=1`` shows the traceback instead).

Exit codes: 0 ok, 1 error, 2 usage error, 130 interrupted. Keep this module cheap to import:
``rbees --help`` must not load the HTTP stack or an inference library.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import pluggy
import typer

from rbees_core import __version__, plugins
from rbees_core.errors import RbeesError

AppFactory = Callable[[pluggy.PluginManager], typer.Typer]


class OutputFormat(str, enum.Enum):
    text = "text"
    json = "json"


FormatOption = Annotated[
    OutputFormat,
    typer.Option("--format", case_sensitive=False,
                 help="text: a table for people; json: for programs, on stdout."),
]


def debug_enabled() -> bool:
    """``RBEES_DEBUG=1``: show tracebacks instead of one-line errors."""
    return os.environ.get("RBEES_DEBUG") == "1"


def fail(program: str, exc: RbeesError) -> NoReturn:
    """Print ``exc`` as one line on stderr and exit 1 (re-raise under ``RBEES_DEBUG=1``)."""
    if debug_enabled():
        raise exc
    print(f"{program}: error: {exc.message}", file=sys.stderr)
    sys.exit(1)


@contextmanager
def errors_to_exit(program: str) -> Iterator[None]:
    """Turn an :class:`RbeesError` escaping the block into :func:`fail`."""
    try:
        yield
    except RbeesError as exc:
        fail(program, exc)


def _show_version(program: str) -> Callable[[bool], None]:
    def callback(value: bool) -> None:
        if value:
            print(f"{program} {__version__}")
            raise typer.Exit()

    return callback


def new_app(program: str, help: str) -> typer.Typer:
    """A root app with the settings every rbees CLI shares."""
    app = typer.Typer(
        name=program, help=help, no_args_is_help=True, add_completion=False,
        pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]},
    )

    # A callback keeps the app a group even while it holds a single command.
    @app.callback()
    def root(
        version: bool = typer.Option(  # a default, not Annotated: it closes over program
            False, "--version", is_eager=True, callback=_show_version(program),
            help="Print the version and exit."),
    ) -> None:
        pass

    return app


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Left-aligned columns under upper-case headers; None and empty lists show as ``-``."""
    table = [[c.upper() for c in columns]]
    table += [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def emit(rows: Sequence[Mapping[str, Any]], fmt: OutputFormat, columns: Sequence[str]) -> None:
    """Print ``rows`` as JSON (an array of objects) or as a text table of ``columns``."""
    if fmt is OutputFormat.json:
        print_json([dict(row) for row in rows])
    else:
        print_table(rows, columns)


def add_plugins_command(app: typer.Typer, pm: pluggy.PluginManager) -> None:
    """The ``plugins`` command: every loaded plugin with its version and hooks."""

    @app.command("plugins")
    def plugins_command(fmt: FormatOption = OutputFormat.text) -> None:
        """List the loaded plugins, their versions and the hooks they implement."""
        rows = [{"name": p.name, "version": p.version, "hooks": list(p.hooks)}
                for p in plugins.list_plugins(pm)]
        emit(rows, fmt, ("name", "version", "hooks"))


def make_plugin_manager() -> pluggy.PluginManager:
    return plugins.make_manager(plugins.builtin_plugins())


def run(program: str, factory: AppFactory, argv: Sequence[str] | None = None) -> None:
    """Build the plugin manager and the app of ``program``, then run it; never returns."""
    with errors_to_exit(program):
        app = factory(make_plugin_manager())
        app(args=list(argv) if argv is not None else None, prog_name=program)
