"""``rbees up|down`` and ``rbees orchestrator start|stop|status|logs``.

``rbees up`` starts rbees-orcd and a local pool-managerd in the background on the embedded
defaults (SQLite under RBEES_HOME, SmolLM2 from its package), waits until the pool has
registered, and prints the URLs; ``rbees down`` stops both (the pool drains its workers),
any worker left here by a pool that died, and runs ``rbees-pool down`` on every host of
hosts.toml (:mod:`rbees_core.pool.leftovers`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import pluggy
import typer

from rbees_core.files import open_private, private_dir, write_private
from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import (
    FormatOption,
    OutputFormat,
    emit,
    print_json,
    print_log,
)

DEFAULT_ORCD = "127.0.0.1:8080"
DEFAULT_POOL = "127.0.0.1:9200"


def _home() -> Path:
    from rbees_core.config import rbees_home

    return rbees_home()


def _run() -> Path:
    from rbees_core.config import runtime_dir

    return runtime_dir()


def orchestrator_url() -> str:
    """Where ``rbees`` finds rbees-orcd: RBEES_ORCHESTRATOR_URL, else what ``rbees up`` or
    ``rbees orchestrator start`` recorded, else http://127.0.0.1:8080."""
    env = os.environ.get("RBEES_ORCHESTRATOR_URL")
    if env:
        return env.rstrip("/")
    recorded = _run() / "rbees-orcd.url"
    if recorded.exists():
        return recorded.read_text().strip()
    return f"http://{DEFAULT_ORCD}"


#: The daemons ``rbees up`` starts, with the module each runs.
DAEMONS = {"rbees-orcd": "rbees_core.programs.orcd",
           "pool-managerd": "rbees_core.programs.pool_managerd"}


def _process(name: str) -> Any:
    """The daemon ``name`` of this RBEES_HOME (a psutil process), if its pid file names a
    live ``name`` started before the file was written: a reused pid is never signalled."""
    from rbees_core.processes import pid_file_process

    return pid_file_process(_run() / f"{name}.pid", name, DAEMONS[name])


def _pid(name: str) -> int | None:
    proc = _process(name)
    return None if proc is None else int(proc.pid)


def _exe(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _check_free(name: str, bind: str) -> None:
    """Refuse a port that something already listens on: its /health would pass for the
    daemon about to start (another rbees-orcd's does)."""
    import socket

    from rbees_core.errors import ConflictError
    from rbees_core.http import parse_bind

    host, port = parse_bind(bind)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not taken
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConflictError(f"cannot start {name}: {bind} is taken by another process "
                                f"({exc.strerror}); stop it or choose another --bind") from exc


def _start(name: str, argv: list[str], url: str, timeout: float) -> int:
    import httpx

    from rbees_core.errors import RbeesError
    from rbees_core.tls import client_context

    _check_free(name, argv[argv.index("--bind") + 1])
    log_path = _home() / "logs" / f"{name}.log"
    private_dir(_run())
    with open_private(log_path, "ab") as log:
        proc = subprocess.Popen([_exe(name), *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RbeesError(f"{name} exited at start: " + " | ".join(tail))
        try:
            if httpx.get(f"{url}/health", timeout=1,
                         verify=client_context()).status_code == 200:
                write_private(_run() / f"{name}.url", url)
                return proc.pid
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RbeesError(f"{name} did not answer at {url} within {timeout:.0f} s")


def _stop(name: str, timeout: float) -> int | None:
    from rbees_core.errors import RbeesError
    from rbees_core.processes import pid_alive

    proc = _process(name)
    if proc is None:
        return None
    pid = int(proc.pid)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        raise RbeesError(f"{name} (pid {pid}) still running after {timeout:.0f} s")
    (_run() / f"{name}.url").unlink(missing_ok=True)
    return pid


def _url(bind: str, tls: bool = False) -> str:
    from rbees_core.http import parse_bind

    host, port = parse_bind(bind)
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"{'https' if tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"


def start_orchestrator(bind: str, extra: list[str], timeout: float,
                       tls: bool = False) -> tuple[int, str]:
    from rbees_core.errors import ConflictError

    if (pid := _pid("rbees-orcd")) is not None:
        raise ConflictError(f"rbees-orcd is already running (pid {pid})")
    url = _url(bind, tls)
    return _start("rbees-orcd", ["--bind", bind, *extra], url, timeout), url


def lab_tls() -> tuple[list[str], Any]:
    """``rbees up --tls``: this host's certificate from the home-lab CA of the data
    directory (both made when missing, :mod:`rbees_core.tls_ca`), as the daemons' flags,
    and what was issued. The CA is what this process's own calls verify with."""
    from rbees_core.tls import CA_ENV, TLS_DIR
    from rbees_core.tls_ca import issue, this_host

    names, addresses = this_host()
    issued = issue(_home() / TLS_DIR, "server", names, addresses)
    os.environ[CA_ENV] = str(issued.ca)
    return ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key),
            "--ca-file", str(issued.ca)], issued


def up(
    bind: Annotated[str, typer.Option("--bind", help="rbees-orcd HOST:PORT")] = DEFAULT_ORCD,
    pool_bind: Annotated[str, typer.Option("--pool-bind", help="pool-managerd HOST:PORT")
                         ] = DEFAULT_POOL,
    pool_id: Annotated[str | None, typer.Option("--pool-id", help="Default: host name")
                       ] = None,
    heartbeat_interval: Annotated[float, typer.Option("--heartbeat-interval", min=0.1)
                                  ] = 5.0,
    timeout: Annotated[float, typer.Option("--timeout", min=1)] = 60.0,
    tls: Annotated[bool, typer.Option(
        "--tls", help="Serve HTTPS: a home-lab CA and this host's certificate are made under "
        "the data directory (kept for the next time); prints how to trust the CA")] = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Start a local cluster: rbees-orcd plus a pool-managerd on this host."""
    import httpx

    from rbees_core.config import auth_headers
    from rbees_core.errors import RbeesError
    from rbees_core.tls import client_context

    hb = ["--heartbeat-interval", str(heartbeat_interval)]
    issued = None
    if tls:
        tls_flags, issued = lab_tls()
        hb += tls_flags
    orcd_pid, orcd_url = start_orchestrator(bind, hb, timeout, tls)
    try:
        pool_url = _url(pool_bind, tls)
        if _pid("pool-managerd") is not None:
            raise RbeesError("pool-managerd is already running here; `rbees down` first")
        argv = ["--bind", pool_bind, "--orchestrator", orcd_url, *hb]
        if pool_id:
            argv += ["--pool-id", pool_id]
        pool_pid = _start("pool-managerd", argv, pool_url, timeout)
        deadline = time.monotonic() + timeout
        pools: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            pools = httpx.get(f"{orcd_url}/v2/pools", headers=auth_headers(), timeout=2,
                              verify=client_context()).json().get("pools", [])
            if any(p.get("status") == "ready" for p in pools):
                break
            time.sleep(0.05)
        else:
            raise RbeesError("the pool did not register with the orchestrator in time")
    except BaseException:
        _stop("pool-managerd", 30)
        _stop("rbees-orcd", 30)
        raise
    info = {"orchestrator": orcd_url, "pool": pool_url, "pool_id": pools[0]["pool_id"],
            "orchestrator_pid": orcd_pid, "pool_pid": pool_pid, "home": str(_home()),
            "ca_file": None if issued is None else str(issued.ca)}
    write_private(_run() / "cluster.json", json.dumps(info))
    if issued is not None:
        from rbees_core.tls_ca import trust_hint

        print(trust_hint(issued.ca), file=sys.stderr)
    if fmt is OutputFormat.json:
        print_json(info)
    else:
        print(f"orchestrator  {orcd_url}\npool          {pool_url} ({info['pool_id']})\n"
              f"web UI        {orcd_url}/\n"
              f"try: rbees jobs submit --model smollm2 --prompt \"Hello\"")


def down(pm: pluggy.PluginManager, timeout: float, grace: float, local: bool,
         fmt: OutputFormat) -> None:
    """``rbees down``: this host's pool-managerd and every worker still recorded here
    (:func:`rbees_core.pool.leftovers.down`: a worker whose pool died too), ``rbees-pool
    down`` on every configured host (unless ``local``), then rbees-orcd. A host that could
    not be reached or failed is one line and exit status 1, after the rest was stopped."""
    from rbees_core.errors import RbeesError
    from rbees_core.pool import leftovers

    here = leftovers.down(timeout=timeout, grace=grace)
    hosts = [] if local else down_hosts(pm, timeout=timeout, grace=grace)
    failed: list[str] = []
    try:
        orcd = _stop("rbees-orcd", timeout)
    except RbeesError as exc:
        orcd, failed = None, [exc.message]
    (_run() / "cluster.json").unlink(missing_ok=True)
    failed += [f"{h['host']}: {h['error']}" for h in hosts if h["state"] == "failed"]
    if fmt is OutputFormat.json:
        print_json({"here": here, "hosts": hosts, "rbees_orcd": orcd})
    else:
        pool = here["pool_managerd"]
        print(f"stopped: pool-managerd {pool['pid'] or '-'}, rbees-orcd {orcd or '-'}"
              + "".join(f", {w['worker_id']} {w['state']}" for w in here["workers"]
                        if w["state"] != "dead"), file=sys.stderr)
        for h in hosts:
            print(f"{h['host']}: {h['state']} ({h['error'] or _summary(h['result'])})",
                  file=sys.stderr)
    if failed:
        raise RbeesError("not everything was stopped: " + "; ".join(failed))


def _summary(result: dict[str, Any]) -> str:
    """What ``rbees-pool down`` stopped on a host, in words."""
    pool = result.get("pool_managerd") or {}
    ended = [w for w in result.get("workers") or [] if w.get("state") != "dead"]
    return f"pool-managerd {pool.get('state', '?')}, " + (
        ", ".join(f"{w['worker_id']} {w['state']}" for w in ended) or "no worker running")


def down_hosts(pm: pluggy.PluginManager, *, timeout: float, grace: float
               ) -> list[dict[str, Any]]:
    """``rbees-pool down`` on every host of hosts.toml at once, through its transport: one
    row per host, ``state`` ``down`` (with ``result``, what it stopped), ``skipped`` (its
    transport runs no programs: ``http``) or ``failed`` (with ``error``)."""
    import asyncio

    from rbees_core.errors import RbeesError, UnsupportedCommandError
    from rbees_core.hosts import load_hosts, open_pool_client

    async def one(host: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"host": host.name, "state": "down", "error": None,
                               "result": None}
        try:
            async with open_pool_client(pm, host) as client:
                row["result"] = await client.down(timeout_s=timeout, grace_s=grace)
        except UnsupportedCommandError as exc:
            row.update(state="skipped", error=exc.message)
        except RbeesError as exc:
            row.update(state="failed", error=exc.message)
        return row

    async def all_hosts() -> list[dict[str, Any]]:
        hosts = load_hosts(pm=pm)
        return list(await asyncio.gather(*(one(hosts[n]) for n in sorted(hosts))))

    return asyncio.run(all_hosts())


def orch_start(
    bind: Annotated[str, typer.Option("--bind", help="HOST:PORT")] = DEFAULT_ORCD,
    config: Annotated[str | None, typer.Option("--config")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1)] = 30.0,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Start rbees-orcd in the background (HTTPS when the config file's [tls] says so)."""
    from rbees_core.config import load_config

    tls = bool(load_config(config).tls.cert)
    pid, url = start_orchestrator(bind, ["--config", config] if config else [], timeout, tls)
    if fmt is OutputFormat.json:
        print_json({"pid": pid, "url": url})
    else:
        print(f"rbees-orcd {url} (pid {pid})")


def orch_stop(timeout: Annotated[float, typer.Option("--timeout", min=1)] = 30.0) -> None:
    """Stop rbees-orcd."""
    pid = _stop("rbees-orcd", timeout)
    print(f"rbees-orcd {f'stopped (pid {pid})' if pid else 'was not running'}",
          file=sys.stderr)


def orch_status(fmt: FormatOption = OutputFormat.text) -> None:
    """Whether rbees-orcd answers, with its queue and pools."""
    import httpx

    from rbees_core.config import auth_headers
    from rbees_core.tls import client_context

    url = orchestrator_url()
    row: dict[str, Any] = {"url": url, "running": False, "pid": _pid("rbees-orcd"),
                           "version": None, "pools": None}
    try:
        health = httpx.get(f"{url}/health", timeout=2, verify=client_context()).json()
        row.update(running=True, version=health.get("version"))
        pools = httpx.get(f"{url}/v2/pools", headers=auth_headers(), timeout=2,
                          verify=client_context()).json()
        row["pools"] = len(pools.get("pools", []))
    except (httpx.HTTPError, ValueError):
        pass
    emit([row], fmt, ("url", "running", "pid", "version", "pools"))
    if not row["running"]:
        raise typer.Exit(1)


def orch_logs(
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1)] = 50,
) -> None:
    """Print rbees-orcd's log (JSON lines)."""
    print_log(_home() / "logs" / "rbees-orcd.log", lines=lines, follow=follow,
              what="rbees-orcd")


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str, pm: pluggy.PluginManager) -> None:
    if program != "rbees":
        return
    app.command("up")(up)

    @app.command("down")
    def down_command(
        timeout: Annotated[float, typer.Option("--timeout", min=1,
                                               help="Wait for each daemon's drain")] = 60.0,
        grace: Annotated[float, typer.Option("--grace", min=0,
                                             help="Drain time of a leftover worker")] = 10.0,
        local: Annotated[bool, typer.Option("--local", help="Only this host, not the hosts "
                                            "of hosts.toml")] = False,
        fmt: FormatOption = OutputFormat.text,
    ) -> None:
        """Stop the cluster: rbees-orcd, pool-managerd and every worker here and on each
        configured host (workers whose pool died too; SIGKILL after the grace)."""
        down(pm, timeout, grace, local, fmt)

    group = typer.Typer(name="orchestrator", help="Start, stop and inspect rbees-orcd.",
                        no_args_is_help=True)
    group.command("start")(orch_start)
    group.command("stop")(orch_stop)
    group.command("status")(orch_status)
    group.command("logs")(orch_logs)
    app.add_typer(group)
