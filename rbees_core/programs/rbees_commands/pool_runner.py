"""How ``rbees pool ... --host NAME|all`` runs one operation of the pool client on hosts and
shows the answers (the command tree is :mod:`rbees_core.programs.rbees_commands.pool`).

One host: the answer is rendered as rbees-pool renders it (its renderers are plain
functions over the JSON), or printed as JSON; the pool's warnings are shown as they
arrive, prefixed with the host; an error is one line ``rbees: error: HOST: ...`` and the
remote exit code becomes ours. ``all``: every host at once, each answer under a
``== NAME (WHERE) ==`` header (or one JSON object by host name), and exit 1 naming the
hosts that failed; the others still answer.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from rbees_core.errors import PoolCommandError, RbeesError, TransportError
from rbees_core.pool_client import to_json as plain
from rbees_core.programs.cli_common import OutputFormat, print_json

if TYPE_CHECKING:
    from rbees_core.hosts import HostConfig
    from rbees_core.pool_client import PoolClient

PROGRAM = "rbees"

Call = Callable[["PoolClient"], Awaitable[Any]]
Render = Callable[[Any], None]


@attrs.frozen
class Operation:
    """One ``rbees pool`` command: what it asks a host's pool client, how its JSON reads as
    text, and an optional check of the answer that fails the command (``models verify``)."""

    call: Call
    render: Render | None = None
    check: Callable[[Any], RbeesError | None] | None = None
    #: The answer as JSON (default :func:`plain`).
    as_json: Callable[[Any], Any] = plain
    #: Print the JSON on one line (a stream of JSON lines: ``models download``).
    json_lines: bool = False


def _timed_out(host: HostConfig, timeout: float | None) -> TransportError:
    return TransportError(f"{host.name}: no answer within {timeout:g} s (--host-timeout)")


async def ask(pm: pluggy.PluginManager, host: HostConfig, op: Operation,
              timeout: float | None, notice: Callable[[str], None] | None = None) -> Any:
    """``op`` on ``host``'s pool client, within ``timeout`` (after connecting as well)."""
    from rbees_core.hosts import open_pool_client

    async with open_pool_client(pm, host) as client:
        client.on_notice = notice
        try:
            return await asyncio.wait_for(op.call(client), timeout)
        except TimeoutError:
            raise _timed_out(host, timeout) from None


def _say_error(message: str) -> None:
    print(f"{PROGRAM}: error: {message}", file=sys.stderr, flush=True)


def _exit_code(exc: RbeesError) -> int:
    return exc.exit_code if isinstance(exc, PoolCommandError) else 1


def run_on(pm: pluggy.PluginManager, op: Operation, *, host: str, fmt: OutputFormat | None,
           timeout: float | None) -> int:
    """Run ``op`` on ``host`` (a name or ``all``), print the answers; the exit code."""
    from rbees_core.hosts import ALL, load_hosts, select_hosts

    targets = select_hosts(host, load_hosts(pm=pm))
    try:
        if host == ALL:
            return asyncio.run(_everywhere(pm, op, targets, fmt, timeout))
        return _one(pm, op, targets[0], fmt, timeout)
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130


def _one(pm: pluggy.PluginManager, op: Operation, host: HostConfig,
         fmt: OutputFormat | None, timeout: float | None) -> int:
    def notice(line: str) -> None:
        print(f"{host.name}: {line}", file=sys.stderr, flush=True)

    try:
        answer = asyncio.run(ask(pm, host, op, timeout, notice))
    except PoolCommandError as exc:
        _say_error(exc.message)
        return exc.exit_code
    show(op, answer, fmt)
    problem = op.check(answer) if op.check is not None else None
    if problem is not None:
        raise problem
    return 0


def show(op: Operation, answer: Any, fmt: OutputFormat | None) -> None:
    """Print one host's answer: JSON, or rbees-pool's text."""
    if fmt is OutputFormat.json and op.json_lines:
        print(json.dumps(op.as_json(answer)), flush=True)
    elif fmt is OutputFormat.json:
        print_json(op.as_json(answer))
    elif op.render is not None:
        op.render(plain(answer))


async def _everywhere(pm: pluggy.PluginManager, op: Operation, targets: list[HostConfig],
                      fmt: OutputFormat | None, timeout: float | None) -> int:
    from rbees_core.hosts import where

    async def one(host: HostConfig) -> tuple[Any, RbeesError | None]:
        try:
            answer = await ask(pm, host, op, timeout)
        except RbeesError as exc:
            return None, exc
        return answer, op.check(answer) if op.check is not None else None

    answers = await asyncio.gather(*(one(h) for h in targets))
    report: dict[str, Any] = {}
    failed: list[str] = []
    for host, (answer, error) in zip(targets, answers, strict=True):
        if error is not None:
            failed.append(host.name)
        unreachable = isinstance(error, TransportError)
        report[host.name] = {
            "ok": error is None,
            "exit_code": None if unreachable else (_exit_code(error) if error else 0),
            "result": None if answer is None else op.as_json(answer),
            "error": error.message if error else None}
        if fmt is OutputFormat.json:
            continue
        print(f"== {host.name} ({where(pm, host)}) ==", flush=True)
        if answer is not None:
            show(op, answer, fmt)
        if error is not None:
            _say_error(error.message)
    if fmt is OutputFormat.json:
        print_json(report)
    if failed:
        _say_error(f"failed on {len(failed)} of {len(targets)} hosts: {', '.join(failed)}")
        return 1
    return 0
