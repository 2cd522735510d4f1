"""``rbees pool status|models ...|worker ...|git ... --host NAME|all``: rbees-pool on pool hosts.

The commands are rbees-pool's own (its builtin groups ``status``, ``models``, ``worker``,
``git``), taken from their definitions with an added ``--host`` and ``--host-timeout``, so
both CLIs take the same arguments. Each runs ``rbees-pool ... --format json`` on the host
through the host's transport (:mod:`rbees_core.hosts`) and renders the JSON here with
rbees-pool's own text renderers (``TEXT_RENDERERS`` of each command module), or prints it
with ``--format json``. A download's JSON progress lines are shown as they arrive; the remote
exit code becomes ours. ``--host all`` runs on every host at once and exits 1 naming the
hosts that failed; the others still answer.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, get_args, get_origin

import pluggy
import typer
from typer.models import ArgumentInfo, DefaultPlaceholder, OptionInfo

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import (
    OutputFormat,
    TerminalProgress,
    print_json,
    print_table,
)

if TYPE_CHECKING:
    from rbees_core.hosts import HostConfig
    from rbees_core.interfaces import TransportResult

PROGRAM = "rbees"
#: rbees-pool's command groups that ``rbees pool`` carries to hosts (see pool_cli.BUILTINS).
MIRRORED = ("pool-status", "pool-models", "pool-worker", "pool-git")
#: Commands that print one JSON object per line as they go (progress, then end or error).
STREAMED = frozenset({("models", "download")})
#: Arguments checked here before anything is sent: model refs and paths, worker ids.
_REFS = frozenset({"model", "checkout", "paths"})

HostOption = Annotated[str, typer.Option(
    "--host", metavar="NAME", help="The pool host (rbees hosts list), or all.")]
HostTimeoutOption = Annotated[float | None, typer.Option(
    "--host-timeout", min=0.1, metavar="SECONDS",
    help="Give up on a host after this long (default: no limit once connected; connecting "
         "always times out after the host's connect_timeout_s, 10 s).")]


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, DefaultPlaceholder) else value


def _param_info(annotation: Any) -> OptionInfo | ArgumentInfo | None:
    if get_origin(annotation) is Annotated:
        for extra in get_args(annotation)[1:]:
            if isinstance(extra, OptionInfo | ArgumentInfo):
                return extra
    return None


def _option_names(param: inspect.Parameter, info: OptionInfo | None) -> list[str]:
    decls: list[str] = []
    if info is not None:
        # in Annotated, typer takes Option's first positional argument as the first name
        if isinstance(info.default, str) and info.default.startswith("-"):
            decls.append(info.default)
        decls += list(info.param_decls or ())
    names = [name for decl in decls for name in decl.split("/")]
    return names or [f"--{param.name.replace('_', '-')}"]


def _text(value: Any) -> str:
    return str(value.value if isinstance(value, Enum) else value)


def _check(name: str, value: Any) -> None:
    from rbees_core.api.common import ID_PATTERN
    from rbees_core.errors import InvalidParamsError
    from rbees_core.refs import validate_ref

    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, str):
            continue
        if "\x00" in item or "\n" in item:
            raise InvalidParamsError(name, "must not contain NUL or newlines")
        if name in _REFS:
            validate_ref(item, name)
        elif name == "worker_id" and not re.fullmatch(ID_PATTERN, item):
            raise InvalidParamsError(name, f"{item!r} is not a worker id")


def remote_argv(path: Sequence[str], signature: inspect.Signature, values: dict[str, Any],
                *, json_output: bool) -> list[str]:
    """rbees-pool's argv for a command at ``path`` called with ``values``: options that
    differ from their defaults, ``--format json``, then ``--`` and the positional arguments.
    Refuses a model ref or path with shell syntax, or a malformed worker id, before anything
    is sent."""
    options: list[str] = []
    positional: list[str] = []
    for param in signature.parameters.values():
        if param.name == "fmt":
            continue
        value = values[param.name]
        _check(param.name, value)
        info = _param_info(param.annotation)
        if isinstance(info, ArgumentInfo):
            if value is not None:
                positional += [_text(v) for v in value] if isinstance(value, list) else [
                    _text(value)]
            continue
        if value is None or value == param.default:
            continue
        names = _option_names(param, info)
        longs = [n for n in names if n.startswith("--")] or names
        if isinstance(value, bool):
            negative = next((n for n in longs if n.startswith("--no-")), None)
            if value:
                options.append(longs[0])
            elif negative:
                options.append(negative)
            continue
        for item in value if isinstance(value, list) else [value]:
            options += [longs[0], _text(item)]
    if json_output:
        options += ["--format", "json"]
    return [*path, *options, *(["--", *positional] if positional else [])]


# -- output ----------------------------------------------------------------------------------


def _renderers() -> dict[tuple[str, ...], Callable[[Any], None]]:
    from rbees_core.programs import pool_cli

    found: dict[tuple[str, ...], Callable[[Any], None]] = {}
    for name, module in pool_cli.BUILTINS:
        if name in MIRRORED:
            found.update(getattr(importlib.import_module(module), "TEXT_RENDERERS", {}))
    return found


def render_text(path: tuple[str, ...], data: Any) -> None:
    """Print a command's JSON the way rbees-pool prints it as text."""
    renderer = _renderers().get(path)
    if renderer is not None:
        renderer(data)
    elif isinstance(data, list) and all(isinstance(row, dict) for row in data) and data:
        print_table(data, list(data[0]))
    else:
        print_json(data)


def _parse(host: str, stdout: str) -> Any:
    from rbees_core.errors import TransportError

    try:
        return json.loads(stdout)
    except ValueError:
        raise TransportError(f"{host}: rbees-pool printed something that is not JSON: "
                             f"{stdout.strip()[:200]!r}") from None


def _stderr_line(host: str, line: str) -> str:
    prefix = "rbees-pool: error: "
    if line.startswith(prefix):
        return f"{PROGRAM}: error: {host}: {line[len(prefix):]}"
    return f"{host}: {line}"


class _Printer:
    """Shows one host's output as it arrives (streamed commands, commands without JSON) or
    once it is complete."""

    def __init__(self, path: tuple[str, ...], fmt: OutputFormat | None, host: str,
                 label: str) -> None:
        self.path, self.fmt, self.host = path, fmt, host
        self.bar = TerminalProgress(label) if fmt is OutputFormat.text else None

    def line(self, line: str) -> None:
        if self.fmt is None:
            print(line, flush=True)
        elif self.path in STREAMED and line.strip():
            event = _parse(self.host, line)
            if self.fmt is OutputFormat.json:
                print(line, flush=True)
            elif event.get("event") == "progress" and self.bar is not None:
                self.bar(event["bytes_done"], event["bytes_total"], event.get("rate_bps", 0),
                         event.get("stage", "download"))
            elif event.get("event") == "end":
                self.close()
                render_text(self.path, event)

    def stderr(self, line: str) -> None:
        print(_stderr_line(self.host, line), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self, stdout: str) -> None:
        self.close()
        if self.fmt is None or self.path in STREAMED or not stdout.strip():
            return
        data = _parse(self.host, stdout)
        if self.fmt is OutputFormat.json:
            print_json(data)
        else:
            render_text(self.path, data)


async def _run_on(pm: pluggy.PluginManager, host: HostConfig, argv: list[str],
                  timeout: float | None, printer: _Printer | None = None) -> TransportResult:
    import asyncio

    from rbees_core.errors import TransportError
    from rbees_core.hosts import open_transport

    async with open_transport(pm, host) as transport:
        call = transport.run(argv, on_line=printer.line if printer else None,
                             on_stderr=printer.stderr if printer else None)
        try:
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:
            raise TransportError(f"{host.name}: no answer within {timeout:g} s "
                                 "(--host-timeout)") from None


def run_remote(pm: pluggy.PluginManager, path: tuple[str, ...], argv: list[str], *,
               host: str, fmt: OutputFormat | None, timeout: float | None, label: str) -> int:
    """Run rbees-pool ``argv`` on ``host`` (a name or ``all``), print what it printed;
    returns the exit code."""
    import asyncio

    from rbees_core.hosts import ALL, select_hosts

    targets = select_hosts(host)
    try:
        if host != ALL:
            printer = _Printer(path, fmt, targets[0].name, label)
            try:
                result = asyncio.run(_run_on(pm, targets[0], argv, timeout, printer))
            finally:
                printer.close()
            printer.finish(result.stdout)
            return int(result.exit_code)
        return asyncio.run(_run_everywhere(pm, path, targets, argv, fmt, timeout))
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130


async def _run_everywhere(pm: pluggy.PluginManager, path: tuple[str, ...],
                          targets: list[HostConfig],
                          argv: list[str], fmt: OutputFormat | None,
                          timeout: float | None) -> int:
    import asyncio

    from rbees_core.errors import RbeesError

    async def one(host: HostConfig) -> tuple[TransportResult | None, Any, str | None]:
        """The host's result, its JSON, and what went wrong there (None when all went well)."""
        try:
            result = await _run_on(pm, host, argv, timeout)
            lines = result.stdout.strip().splitlines()
            data = None if fmt is None or not lines else _parse(
                host.name, lines[-1] if path in STREAMED else result.stdout)
        except RbeesError as exc:
            return None, None, exc.message
        if result.exit_code == 0:
            return result, data, None
        last = (result.stderr.strip().splitlines() or [f"exit {result.exit_code}"])[-1]
        return result, data, f"{host.name}: {last.removeprefix('rbees-pool: error: ')}"

    answers = await asyncio.gather(*(one(h) for h in targets))
    report: dict[str, Any] = {}
    failed: list[str] = []
    for host, (result, data, error) in zip(targets, answers, strict=True):
        if error:
            failed.append(host.name)
        report[host.name] = {"ok": error is None,
                             "exit_code": None if result is None else result.exit_code,
                             "result": data, "error": error}
        if fmt is OutputFormat.json:
            continue
        print(f"== {host.name} ({host.where}) ==", flush=True)
        if error:
            print(f"{PROGRAM}: error: {error}", file=sys.stderr, flush=True)
        elif fmt is None and result is not None:
            print(result.stdout, end="")
        elif data is not None:
            render_text(path, data)
    if fmt is OutputFormat.json:
        print_json(report)
    if failed:
        print(f"{PROGRAM}: error: failed on {len(failed)} of {len(targets)} hosts: "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# -- the command tree ------------------------------------------------------------------------


def _mirror(pm: pluggy.PluginManager, path: tuple[str, ...], callback: Callable[..., Any]
            ) -> Callable[..., None]:
    """A command taking ``callback``'s arguments plus ``--host`` that runs it on hosts."""
    signature = inspect.signature(callback, eval_str=True)
    json_output = "fmt" in signature.parameters
    extra = [inspect.Parameter("host", inspect.Parameter.KEYWORD_ONLY, annotation=HostOption),
             inspect.Parameter("host_timeout", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=HostTimeoutOption)]

    def command(**values: Any) -> None:
        host, timeout = values.pop("host"), values.pop("host_timeout")
        fmt = values.get("fmt") if json_output else None
        argv = remote_argv(path, signature, values, json_output=json_output)
        label = str(values.get("model") or " ".join(path))
        code = run_remote(pm, path, argv, host=host, fmt=fmt, timeout=timeout, label=label)
        if code:
            raise typer.Exit(code)

    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), *extra], return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in [
        *signature.parameters.values(), *extra]}
    command.__doc__ = callback.__doc__
    command.__name__ = callback.__name__
    return command


def _copy_group(pm: pluggy.PluginManager, source: typer.Typer, target: typer.Typer,
                path: tuple[str, ...]) -> None:
    for info in source.registered_commands:
        assert info.callback is not None
        name = info.name or info.callback.__name__.lower().replace("_", "-")
        target.command(name, help=info.help)(_mirror(pm, (*path, name), info.callback))
    for group in source.registered_groups:
        sub = group.typer_instance
        assert sub is not None
        name = _plain(group.name) or _plain(sub.info.name)
        copy = typer.Typer(name=name, help=_plain(group.help) or _plain(sub.info.help),
                           no_args_is_help=True)
        _copy_group(pm, sub, copy, (*path, name))
        target.add_typer(copy)


def pool_app(pm: pluggy.PluginManager) -> typer.Typer:
    """The ``pool`` group: rbees-pool's builtin status, models, worker and git commands."""
    from rbees_core import plugins
    from rbees_core.programs import pool_cli

    source = typer.Typer()
    modules = [(name, importlib.import_module(module))
               for name, module in reversed(pool_cli.BUILTINS) if name in MIRRORED]
    plugins.make_manager(modules, autoload=False).hook.rbees_register_cli(
        app=source, program=pool_cli.PROGRAM, pm=pm)
    app = typer.Typer(name="pool", no_args_is_help=True, help=(
        "Run rbees-pool's commands on pool hosts (--host NAME or all), over each host's "
        "transport (ssh, http, local)."))
    _copy_group(pm, source, app, ())
    return app


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    if program == PROGRAM:
        app.add_typer(pool_app(pm))
