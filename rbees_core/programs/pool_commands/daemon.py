"""``rbees-pool daemon start|stop|status|logs``: pool-managerd on this host, one per RBEES_HOME."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from rbees_core.files import open_private, write_private
from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import (
    FormatOption,
    OutputFormat,
    emit,
    print_json,
    print_log,
)
from rbees_core.tls import client_context


def start(
    bind: Annotated[str, typer.Option("--bind", help="HOST:PORT")] = "127.0.0.1:9200",
    pool_id: Annotated[str | None, typer.Option("--pool-id")] = None,
    orchestrator: Annotated[str | None, typer.Option("--orchestrator")] = None,
    config: Annotated[str | None, typer.Option("--config")] = None,
    api_token_file: Annotated[str | None, typer.Option("--api-token-file")] = None,
    tls_cert: Annotated[str | None, typer.Option(
        "--tls-cert", metavar="PEM", help="Serve HTTPS with this certificate (with "
        "--tls-key; [tls] cert); its workers too")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", metavar="PEM")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1)] = 30.0,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Start pool-managerd in the background and wait until it answers. Its heartbeats
    verify the orchestrator with this command's CA (rbees-pool --ca-file, RBEES_CA_FILE)."""
    import httpx

    from rbees_core.errors import ConflictError, RbeesError
    from rbees_core.http import parse_bind
    from rbees_core.pool.via_daemon import daemon_files, running_pid

    if (pid := running_pid()) is not None:
        raise ConflictError(f"pool-managerd is already running (pid {pid})")
    host, port = parse_bind(bind)
    log_path = daemon_files().log
    argv = [str(Path(sys.executable).with_name("pool-managerd")), "--bind", bind]
    for flag, value in (("--pool-id", pool_id), ("--orchestrator", orchestrator),
                        ("--config", config), ("--api-token-file", api_token_file),
                        ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if value:
            argv += [flag, value]
    with open_private(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    from rbees_core.config import load_config

    tls = bool(tls_cert or load_config(config).tls.cert)
    where = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"{'https' if tls else 'http'}://{where}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RbeesError("pool-managerd exited at start: " + " | ".join(tail))
        try:
            if httpx.get(f"{url}/health", timeout=1,
                         verify=client_context()).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        proc.kill()
        raise RbeesError(f"pool-managerd did not answer within {timeout:.0f} s")
    write_private(daemon_files().url, url)
    info = {"pid": proc.pid, "url": url, "log": str(log_path)}
    if fmt is OutputFormat.json:
        print_json(info)
    else:
        print(f"pool-managerd {url} (pid {proc.pid})")


def stop(
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Wait for the drain")
                       ] = 45.0,
) -> None:
    """Stop pool-managerd gracefully (its workers drain first)."""
    from rbees_core.errors import RbeesError
    from rbees_core.pool.leftovers import pool_managerd
    from rbees_core.pool.via_daemon import daemon_files

    proc = pool_managerd()  # the pid file's process, if it is still pool-managerd
    if proc is None:
        print("pool-managerd is not running", file=sys.stderr)
        return
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while proc.is_running() and proc.status() != "zombie" and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.is_running() and proc.status() != "zombie":
        raise RbeesError(f"pool-managerd (pid {proc.pid}) still running after {timeout:.0f} s")
    daemon_files().url.unlink(missing_ok=True)
    print(f"pool-managerd stopped (pid {proc.pid})", file=sys.stderr)


def down(
    timeout: Annotated[float, typer.Option("--timeout", min=1,
                                           help="Wait for pool-managerd's drain")] = 45.0,
    grace: Annotated[float, typer.Option("--grace", min=0,
                                         help="Drain time of a leftover worker")] = 10.0,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Stop everything rbees runs here: pool-managerd, then any worker still running
    (one whose pool died, or one `worker spawn` started); SIGKILL after the grace."""
    from rbees_core.pool import leftovers

    done = leftovers.down(timeout=timeout, grace=grace)
    if fmt is OutputFormat.json:
        print_json(done)
        return
    pool = done["pool_managerd"]
    print(f"pool-managerd {pool['state']}" + (f" (pid {pool['pid']})" if pool["pid"] else ""))
    for worker in done["workers"]:
        print(f"{worker['worker_id']} {worker['state']} (pid {worker['pid']})")


def status(fmt: FormatOption = OutputFormat.text) -> None:
    """Whether pool-managerd runs here, its URL and its workers."""
    import httpx

    from rbees_core.config import auth_headers
    from rbees_core.pool.via_daemon import daemon_files, running_pid

    pid = running_pid()
    row: dict[str, Any] = {"running": pid is not None, "pid": pid, "url": None, "workers": None}
    if pid is not None and daemon_files().url.exists():
        row["url"] = daemon_files().url.read_text().strip()
        try:
            state = httpx.get(f"{row['url']}/v2/workers", timeout=2,
                              headers=auth_headers(), verify=client_context()).json()
            row["workers"] = len(state.get("workers", []))
        except (httpx.HTTPError, ValueError):
            row["workers"] = None
    emit([row], fmt, ("running", "pid", "url", "workers"))
    if pid is None:
        raise typer.Exit(1)


def logs(
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1)] = 50,
) -> None:
    """Print pool-managerd's log (JSON lines)."""
    from rbees_core.pool.via_daemon import daemon_files

    print_log(daemon_files().log, lines=lines, follow=follow, what="pool-managerd")


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str) -> None:
    if program != "rbees-pool":
        return
    group = typer.Typer(name="daemon", help="Start, stop and inspect pool-managerd here.",
                        no_args_is_help=True)
    group.command("start")(start)
    group.command("stop")(stop)
    group.command("status")(status)
    group.command("logs")(logs)
    app.add_typer(group)
    app.command("down")(down)
