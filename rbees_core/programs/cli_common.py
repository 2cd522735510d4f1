"""What the ``rbees`` and ``rbees-pool`` command lines share (CONTRACT section 6).

- :func:`new_app` builds a root typer app the same way for both: help on no arguments, no
  REPL, ``--version``, and ``completion bash|zsh|fish`` (the script to source; typer's
  ``--install-completion`` options stay off, and typer's completion machinery is loaded only
  while a shell asks for completions: :func:`completing`).
- :data:`FormatOption` is the ``--format text|json`` option of every command that prints
  data; :func:`emit` prints rows as a text table or as JSON on stdout. Diagnostics go to
  stderr.
- :func:`run` is every CLI's ``main()``: it builds the plugin manager and the app, lets
  plugins add commands through :func:`rbees_core.hookspecs.rbees_register_cli`, runs it, and
  turns an :class:`rbees_core.errors.RbeesError` into one line on stderr and its exit status
  (1, or 2 for a usage error; ``RBEES_DEBUG=1`` shows the traceback instead).

Exit codes: 0 ok, 1 error, 2 usage error, 130 interrupted. Keep this module cheap to import:
``rbees --help`` must not load the HTTP stack or an inference library.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import pluggy
import typer

from rbees_core import __version__, plugins
from rbees_core.errors import RbeesError
from rbees_core.programs.cli_coercion import PlainCoercionGroup

AppFactory = Callable[[pluggy.PluginManager], typer.Typer]


class OutputFormat(str, enum.Enum):
    text = "text"
    json = "json"


class Shell(str, enum.Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def complete_var(program: str) -> str:
    """The variable a shell's completion function sets when it runs ``program`` for
    completions (click's rule: ``rbees-pool`` -> ``_RBEES_POOL_COMPLETE``)."""
    return f"_{program.replace('-', '_').replace('.', '_').upper()}_COMPLETE"


def completing(program: str) -> bool:
    """Whether a shell runs ``program`` for completions now; then typer's completion
    classes are registered (typer registers them only with its completion options, which
    rbees leaves off). Every other start
    pays one environment lookup, nothing more."""
    if not os.environ.get(complete_var(program)):
        return False
    # typer.completion has no __all__; these two are what its own options use
    from typer.completion import completion_init  # type: ignore[attr-defined]

    completion_init()  # registers bash, zsh, fish (and powershell)
    return True


def add_completion_command(app: typer.Typer, program: str) -> None:
    """``<program> completion bash|zsh|fish``: print the script that makes the shell
    complete ``program``'s commands and options (by running it with
    :func:`complete_var` set)."""

    @app.command("completion")
    def completion(shell: Annotated[Shell, typer.Argument(case_sensitive=False)]) -> None:
        """Print the shell completion script: eval "$(PROGRAM completion bash)" in
        ~/.bashrc, or write it to a file your shell reads (zsh: a file in $fpath named
        _PROGRAM; fish: ~/.config/fish/completions/PROGRAM.fish)."""
        from typer.completion import get_completion_script  # type: ignore[attr-defined]

        print(get_completion_script(prog_name=program, complete_var=complete_var(program),
                                    shell=shell.value))


FormatOption = Annotated[
    OutputFormat,
    typer.Option("--format", case_sensitive=False,
                 help="text: a table for people; json: for programs, on stdout."),
]


def debug_enabled() -> bool:
    """``RBEES_DEBUG=1``: show tracebacks instead of one-line errors."""
    return os.environ.get("RBEES_DEBUG") == "1"


def fail(program: str, exc: RbeesError) -> NoReturn:
    """Print ``exc`` as one line on stderr and exit with its ``exit_status`` (1, or 2 for a
    usage error; re-raise under ``RBEES_DEBUG=1``)."""
    if debug_enabled():
        raise exc
    print(f"{program}: error: {exc.message}", file=sys.stderr)
    sys.exit(exc.exit_status)


@contextmanager
def errors_to_exit(program: str) -> Iterator[None]:
    """Turn an :class:`RbeesError` escaping the block into :func:`fail`."""
    try:
        yield
    except RbeesError as exc:
        fail(program, exc)


def _use_ca_file(ctx: typer.Context, value: str | None) -> str | None:
    if value:  # every client of this run verifies with it (rbees_core.tls.client_context)
        from rbees_core.tls import use_ca_file

        with errors_to_exit(ctx.find_root().info_name or "rbees"):
            use_ca_file(value)
    return value


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
        # plain click help: importing rich costs ~100 ms of every --help, and its markup
        # would swallow "[pool]" and "[PATH]" in help texts
        rich_markup_mode=None,
        # typer's own coercion of option values imports pydantic: ~80 ms of every command
        cls=PlainCoercionGroup,
    )

    # A callback keeps the app a group even while it holds a single command.
    @app.callback()
    def root(
        version: bool = typer.Option(  # a default, not Annotated: it closes over program
            False, "--version", is_eager=True, callback=_show_version(program),
            help="Print the version and exit."),
        ca_file: str | None = typer.Option(
            None, "--ca-file", metavar="PEM", callback=_use_ca_file,
            help="Verify the daemons' TLS certificates with these CA certificates instead "
                 "of the system store (RBEES_CA_FILE)"),
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


def make_plugin_manager(builtins: Iterable[tuple[str, object]] = ()) -> pluggy.PluginManager:
    """The plugin manager of a CLI: every program's builtins, then ``builtins``, then the
    installed plugins."""
    return plugins.make_manager([*plugins.builtin_plugins(), *builtins])


def run(program: str, factory: AppFactory, argv: Sequence[str] | None = None, *,
        builtins: Iterable[tuple[str, object]] = ()) -> None:
    """Build the plugin manager (with ``program``'s ``builtins``, ``(name, plugin)`` pairs
    that can be blocked by name like any plugin) and the app, then run it; never returns."""
    with errors_to_exit(program), tls_errors_to_exit(program):
        completing(program)
        app = factory(make_plugin_manager(builtins))
        app(args=list(argv) if argv is not None else None, prog_name=program)


@contextmanager
def tls_errors_to_exit(program: str) -> Iterator[None]:
    """A TLS failure that escaped a command (a daemon's certificate this client does not
    trust) becomes one line and exit 1, never a traceback: whatever command met it."""
    try:
        yield
    except Exception as exc:
        if debug_enabled() or not type(exc).__module__.startswith(("httpx", "httpcore",
                                                                    "ssl")):
            raise
        from rbees_core.tls import tls_failure

        why = tls_failure(exc)
        if why is None:
            raise
        print(f"{program}: error: {why}", file=sys.stderr)
        sys.exit(1)


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``-``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class TerminalProgress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal.

    Call it with ``(done, total, rate_bps, stage)`` as often as you like (from any thread);
    it redraws at most ten times a second. :meth:`close` ends the line.
    """

    def __init__(self, label: str, *, stream: Any = None, width: int = 28) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int | None, rate_bps: float = 0.0,
                 stage: str = "download", *, force: bool = False) -> None:
        import time

        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1 and (total is None or done < total):
            return
        self._last = now
        if total:
            filled = min(self.width, int(self.width * done / total))
            bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {done / total:6.1%}"
        else:
            bar = "[" + "?" * self.width + "]"
        rate = f" {human_bytes(rate_bps)}/s" if rate_bps and stage == "download" else ""
        line = (f"\r{self.label} {stage} {bar} {human_bytes(done)}/{human_bytes(total)}"
                f"{rate}\x1b[K")
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def print_log(path: Any, *, lines: int, follow: bool, what: str) -> None:
    """Print the last ``lines`` of a daemon's log, then (``follow``) new lines as they come;
    Ctrl+C ends following with exit 130. ``what`` names the daemon in the error."""
    import time

    from rbees_core.errors import NotFoundError

    if not path.exists():
        raise NotFoundError(f"{what} has no log here yet")
    with open(path, errors="replace") as log:
        for line in log.readlines()[-lines:]:
            print(line, end="")
        try:
            while follow:
                line = log.readline()
                if line:
                    print(line, end="", flush=True)
                else:
                    time.sleep(0.2)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def builtin_modules(builtins: Sequence[tuple[str, str]]) -> list[tuple[str, object]]:
    """``(name, module path)`` pairs as ``(name, module)`` plugins, registered last-first
    because pluggy calls the last registered first: the command groups then appear in
    ``--help`` in the given order. The modules must be cheap (typer only)."""
    import importlib

    return [(name, importlib.import_module(module)) for name, module in reversed(builtins)]


def app_factory(program: str, help: str) -> AppFactory:
    """The factory of a CLI's root app: shared settings, ``plugins``, then the commands the
    plugins add through :func:`rbees_core.hookspecs.rbees_register_cli`."""
    def create_app(pm: pluggy.PluginManager) -> typer.Typer:
        app = new_app(program, help)
        add_plugins_command(app, pm)
        pm.hook.rbees_register_cli(app=app, program=program, pm=pm)
        add_completion_command(app, program)  # last in --help
        return app

    return create_app
