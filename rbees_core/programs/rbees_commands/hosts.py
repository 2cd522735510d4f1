"""``rbees hosts list|add|remove|check``: the pool hosts ``rbees pool ... --host`` drives.

The hosts live in ``hosts.toml`` (``$RBEES_HOME`` when set, else ``~/.config/rbees``; see
:mod:`rbees_core.hosts`). ``add --accept-new`` is the only way rbees trusts an SSH host key
it has not seen: it records the key in rbees' own known_hosts file beside hosts.toml.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import pluggy
import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import FormatOption, OutputFormat, emit, print_json

PROGRAM = "rbees"
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The host's name in rbees.")]


def _row(pm: pluggy.PluginManager, host: Any) -> dict[str, Any]:
    from rbees_core.hosts import where

    fields = _fields(pm, host)
    env = getattr(fields, "env", None) or {}
    return {"name": host.name, "transport": host.transport, "where": where(pm, host),
            "remote_pool": getattr(fields, "remote_pool", None),
            "env": [f"{k}={v}" for k, v in sorted(env.items())]}


def _fields(pm: pluggy.PluginManager, host: Any) -> Any:
    """The host's options as its transport reads them (None: transport not installed)."""
    from rbees_core.hosts import host_fields_types

    cls = host_fields_types(pm).get(host.transport)
    return None if cls is None else host.fields(cls)


def _setting(pm: pluggy.PluginManager, host: Any, key: str) -> Any:
    if key in ("transport", "connect_timeout_s"):
        return getattr(host, key)
    return getattr(_fields(pm, host), key, host.options.get(key))


def list_command(pm: pluggy.PluginManager, fmt: OutputFormat) -> None:
    """List the configured hosts."""
    from rbees_core.hosts import load_hosts

    hosts = load_hosts(pm=pm)
    emit([_row(pm, hosts[name]) for name in sorted(hosts)], fmt,
         ("name", "transport", "where", "remote_pool", "env"))


def _settings(destination: str | None, transport: str | None, url: str | None,
              token_file: str | None, remote_pool: str | None, env: list[str] | None,
              connect_timeout: float | None) -> dict[str, Any]:
    """The host settings given on the command line (those left out are not in the dict)."""
    from rbees_core.errors import InvalidParamsError

    if transport == "http" and destination and url is None and \
            destination.startswith(("http://", "https://")):
        destination, url = None, destination
    given: dict[str, Any] = {"transport": transport, "destination": destination, "url": url,
                             "token_file": token_file, "remote_pool": remote_pool,
                             "connect_timeout_s": connect_timeout}
    if env is not None:
        given["env"] = {}
        for item in env:
            key, sep, value = item.partition("=")
            if not sep:
                raise InvalidParamsError("--env", f"{item!r} is not KEY=VALUE")
            given["env"][key] = value
    return {key: value for key, value in given.items() if value is not None}


def remove_command(name: NameArg) -> None:
    """Remove a host and the SSH host key rbees recorded for it."""
    from rbees_core.hosts import forget_host_keys, load_hosts, save_hosts, select_hosts

    hosts = load_hosts(check=False)  # a host whose transport is gone can still be removed
    select_hosts(name, hosts)  # NotFoundError for an unknown name
    del hosts[name]
    save_hosts(hosts)
    dropped = forget_host_keys(name)
    print(f"removed {name}" + (f" and {dropped} recorded host key(s)" if dropped else ""),
          file=sys.stderr)


def register(app: typer.Typer, pm: pluggy.PluginManager) -> None:
    group = typer.Typer(name="hosts", no_args_is_help=True, help=(
        "The pool hosts that `rbees pool --host` drives, kept in hosts.toml under "
        "$RBEES_HOME (when set) or ~/.config/rbees."))

    @group.command("list")
    def list_hosts(fmt: FormatOption = OutputFormat.text) -> None:
        """List the configured hosts."""
        list_command(pm, fmt)

    @group.command("add")
    def add_command(
        name: NameArg,
        destination: Annotated[str | None, typer.Argument(
            metavar="DESTINATION",
            help="ssh: user@host[:port] or a ~/.ssh/config alias (not needed for http, local).")
        ] = None,
        transport: Annotated[str | None, typer.Option(
            "--transport", help="ssh (the default), http or local.")] = None,
        url: Annotated[str | None, typer.Option(
            "--url", help="http: pool-managerd's URL, e.g. http://gpu1:9200.")] = None,
        token_file: Annotated[str | None, typer.Option(
            "--token-file", metavar="PATH", help="http: file holding the API token (mode 600).")
        ] = None,
        remote_pool: Annotated[str | None, typer.Option(
            "--remote-pool", metavar="PATH",
            help="The rbees-pool program on the host (default: rbees-pool on its PATH).")] = None,
        env: Annotated[list[str] | None, typer.Option(
            "--env", metavar="KEY=VALUE", help="Environment of rbees-pool on the host; repeat.")
        ] = None,
        connect_timeout: Annotated[float | None, typer.Option(
            "--connect-timeout", min=0.1, max=600, metavar="SECONDS",
            help="Give up connecting after this long (default 10).")] = None,
        accept_new: Annotated[bool, typer.Option(
            "--accept-new", help="ssh: connect now and trust the host key if it was never seen "
                                 "(a changed key is still refused).")] = False,
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Add a pool host. For a host that exists, the settings given must be the stored
        ones (the others keep their values): `rbees hosts add NAME --accept-new` trusts the
        key of a host added before."""
        import asyncio

        from rbees_core.errors import ConflictError
        from rbees_core.hosts import (
            host_fields_types,
            host_from_table,
            hosts_file,
            load_hosts,
            open_transport,
            save_hosts,
            where,
        )

        given = _settings(destination, transport, url, token_file, remote_pool, env,
                          connect_timeout)
        hosts = load_hosts(pm=pm)
        if name in hosts:
            host = hosts[name]
            differ = sorted(k for k, v in given.items() if _setting(pm, host, k) != v)
            if differ:
                raise ConflictError(
                    f"host {name!r} exists with other settings ({', '.join(differ)}); to "
                    f"change it: rbees hosts remove {name}, then rbees hosts add",
                    details={"host": name})
        else:
            host = host_from_table(name, {"transport": "ssh", **given}, host_fields_types(pm))
            save_hosts({**hosts, name: host})
            print(f"added {name} ({host.transport} {where(pm, host)}) to {hosts_file()}",
                  file=sys.stderr)
        trusted = None
        if accept_new:
            async def accept() -> str | None:
                async with open_transport(pm, host) as connection:
                    return await connection.accept_new()

            trusted = asyncio.run(accept())
            print(f"{name}: {trusted or 'nothing new to trust'}", file=sys.stderr)
        if fmt is OutputFormat.json:
            print_json({**host.to_toml_table(), "name": name, "trusted": trusted})

    group.command("remove")(remove_command)

    @group.command("check")
    def check_command(
        name: Annotated[str, typer.Argument(
            metavar="NAME", help="A host, or all (the default).")] = "all",
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Check that hosts answer, and that their rbees-pool is this rbees' version."""
        import asyncio

        from rbees_core import __version__
        from rbees_core.errors import PoolCommandError, RbeesError
        from rbees_core.hosts import load_hosts, open_pool_client, select_hosts, where

        async def probe(host: Any) -> dict[str, Any]:
            row = {"name": host.name, "transport": host.transport, "where": where(pm, host),
                   "reachable": False, "version": None, "problem": None}
            try:
                async with open_pool_client(pm, host) as client:
                    version = await client.version()
            except PoolCommandError as exc:  # it answered, but not as rbees-pool does
                return {**row, "reachable": True, "problem": exc.message}
            except RbeesError as exc:
                return {**row, "problem": exc.message}
            row.update(reachable=True, version=version)
            if version != __version__:
                row["problem"] = (f"{host.name}: version mismatch: rbees-pool {version} there, "
                                  f"rbees {__version__} here")
            return row

        async def probe_all() -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(probe(h) for h in select_hosts(
                name, load_hosts(pm=pm)))))

        rows = asyncio.run(probe_all())
        if fmt is OutputFormat.json:
            print_json(rows)
        else:
            emit([{**r, "reachable": "yes" if r["reachable"] else "no",
                   "problem": r["problem"] or "ok"} for r in rows], fmt,
                 ("name", "transport", "where", "reachable", "version", "problem"))
        bad = [r for r in rows if r["problem"]]
        for row in bad:
            print(f"{PROGRAM}: error: {row['problem']}", file=sys.stderr)
        if bad:
            raise typer.Exit(1)

    app.add_typer(group)


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    if program == PROGRAM:
        register(app, pm)
