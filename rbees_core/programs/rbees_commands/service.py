"""``rbees service install|uninstall|status``: rbees-orcd and pool-managerd as user services
that come back after a reboot (issue 26 item 2).

Linux: systemd user units in ``$XDG_CONFIG_HOME/systemd/user`` (``Type=notify``: the daemons
send ``READY=1`` once they serve, :func:`rbees_core.http.server.notify_ready`; their JSON
lines go to stdout, the journal, with their priority: ``journalctl --user -u rbees-orcd
-p warning``). macOS: launchd agents in
``~/Library/LaunchAgents`` (logs under ``$RBEES_HOME/logs``). The units run this
environment's console scripts with its ``RBEES_HOME`` and config, so a virtualenv install
works as it is.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from rbees_core.hookspecs import hookimpl
from rbees_core.programs.cli_common import FormatOption, OutputFormat, emit

#: service name -> (program, description)
SERVICES = {"rbees-orcd": ("rbees-orcd", "rbees orchestrator"),
            "rbees-pool": ("pool-managerd", "rbees pool daemon (this host's workers)")}
#: environment a unit passes on when this shell has it set
PASSED_ON = ("RBEES_HOME", "RBEES_CONFIG", "RBEES_API_TOKEN_FILE", "RBEES_LOG_LEVEL",
             "XDG_DATA_HOME", "XDG_CONFIG_HOME", "HF_HOME", "HF_ENDPOINT")


def _kind(kind: str | None) -> str:
    return kind or ("launchd" if sys.platform == "darwin" else "systemd")


def unit_dir(kind: str) -> Path:
    """Where the user's service files go for ``kind`` (systemd or launchd)."""
    if kind == "launchd":
        return Path.home() / "Library" / "LaunchAgents"
    from rbees_core.config import config_dir

    return config_dir().parent / "systemd" / "user"


def unit_path(name: str, kind: str) -> Path:
    return unit_dir(kind) / (f"dev.rbees.{name}.plist" if kind == "launchd"
                             else f"{name}.service")


def _environment() -> dict[str, str]:
    env = {key: os.environ[key] for key in PASSED_ON if os.environ.get(key)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin",
                                   "/usr/bin", "/bin"])
    return env


def _quote(word: str) -> str:
    """A word of a systemd command line or Environment= value."""
    if word and all(c.isalnum() or c in "/._-:=@+," for c in word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def render_systemd(name: str, argv: list[str], env: dict[str, str], after: str | None) -> str:
    """A systemd user unit running ``argv`` with ``env``."""
    description = SERVICES[name][1]
    lines = ["[Unit]", f"Description={description}",
             *([f"After={after}.service", f"Wants={after}.service"] if after else []), "",
             "[Service]", "Type=notify", "NotifyAccess=main",
             "ExecStart=" + " ".join(_quote(a) for a in argv)]
    lines += [f"Environment={_quote(f'{k}={v}')}" for k, v in sorted(env.items())]
    lines += [
        # SIGTERM to the daemon alone: it drains (pool-managerd stops its workers itself);
        # whatever is left gets SIGKILL after the timeout
        "KillMode=mixed", "TimeoutStopSec=90", "Restart=on-failure", "RestartSec=3",
        "StandardOutput=journal", "StandardError=journal", "",
        "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


def render_launchd(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> bytes:
    """A launchd agent's plist running ``argv`` with ``env``."""
    return plistlib.dumps({
        "Label": f"dev.rbees.{name}", "ProgramArguments": argv,
        "EnvironmentVariables": env, "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False}, "ExitTimeOut": 90,
        "StandardOutPath": str(log_dir / f"{name}.log"),
        "StandardErrorPath": str(log_dir / f"{name}.log")})


def _chosen(orchestrator: bool, pool: bool) -> list[str]:
    if not orchestrator and not pool:
        return list(SERVICES)
    return [n for n, wanted in (("rbees-orcd", orchestrator), ("rbees-pool", pool)) if wanted]


def _manager(kind: str, *args: str) -> subprocess.CompletedProcess[str] | None:
    """``systemctl --user ARGS`` or ``launchctl ARGS``; None when the tool is missing."""
    tool = ["launchctl"] if kind == "launchd" else ["systemctl", "--user"]
    if shutil.which(tool[0]) is None:
        return None
    return subprocess.run([*tool, *args], capture_output=True, text=True, timeout=120)


def install(
    orchestrator: Annotated[bool, typer.Option("--orchestrator",
                                               help="rbees-orcd (both when neither is given)")
                            ] = False,
    pool: Annotated[bool, typer.Option("--pool", help="pool-managerd")] = False,
    bind: Annotated[str, typer.Option("--bind", help="rbees-orcd's HOST:PORT")
                    ] = "127.0.0.1:8080",
    pool_bind: Annotated[str, typer.Option("--pool-bind", help="pool-managerd's HOST:PORT")
                         ] = "127.0.0.1:9200",
    orchestrator_url: Annotated[str | None, typer.Option(
        "--orchestrator-url", help="where the pool registers (default: --bind's URL)")] = None,
    kind: Annotated[str | None, typer.Option(
        "--kind", help="systemd or launchd (default: this system's)")] = None,
    start: Annotated[bool, typer.Option("--start/--no-start",
                                        help="enable and start them now")] = True,
    tls: Annotated[bool, typer.Option(
        "--tls", help="Serve HTTPS with this host's certificate from the home-lab CA of "
                      "the data directory (made when missing, as by rbees up --tls)")] = False,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Install rbees-orcd and/or pool-managerd as user services started at login/boot."""
    from rbees_core.config import rbees_home
    from rbees_core.errors import InvalidParamsError
    from rbees_core.files import private_dir

    kind = _kind(kind)
    if kind not in ("systemd", "launchd"):
        raise InvalidParamsError("--kind", "must be systemd or launchd")
    names = _chosen(orchestrator, pool)
    env = _environment()
    scheme = "https" if tls else "http"
    url = orchestrator_url or f"{scheme}://{bind.replace('0.0.0.0', '127.0.0.1')}"
    tls_flags: list[str] = []
    if tls:
        from rbees_core.programs.rbees_commands.cluster import lab_tls

        tls_flags = lab_tls()[0]
    rows: list[dict[str, Any]] = []
    for name in names:
        program = str(Path(sys.executable).with_name(SERVICES[name][0]))
        argv = [program, "--bind", bind] if name == "rbees-orcd" else [
            program, "--bind", pool_bind, "--orchestrator", url]
        argv += tls_flags
        path = unit_path(name, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "launchd":
            logs = rbees_home() / "logs"
            private_dir(logs)
            path.write_bytes(render_launchd(name, argv, env, logs))
        else:
            after = "rbees-orcd" if name == "rbees-pool" and "rbees-orcd" in names else None
            # the JSON lines on stdout, the journal, each with its priority (rbees_core.log)
            path.write_text(render_systemd(name, [*argv, "--log-to", "stdout"], env, after))
        rows.append({"service": name, "file": str(path), "started": False})
    if start:
        for row in rows:
            if kind == "systemd":
                _manager(kind, "daemon-reload")
                done = _manager(kind, "enable", "--now", f"{row['service']}.service")
            else:
                done = _manager(kind, "load", "-w", row["file"])
            row["started"] = done is not None and done.returncode == 0
            if done is not None and done.returncode != 0:
                print(f"rbees: {row['service']} not started: {done.stderr.strip()}",
                      file=sys.stderr)
    emit(rows, fmt, ("service", "file", "started"))


def uninstall(
    orchestrator: Annotated[bool, typer.Option("--orchestrator")] = False,
    pool: Annotated[bool, typer.Option("--pool")] = False,
    kind: Annotated[str | None, typer.Option("--kind")] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Stop and remove the services (both when neither flag is given)."""
    kind = _kind(kind)
    rows: list[dict[str, Any]] = []
    for name in _chosen(orchestrator, pool):
        path = unit_path(name, kind)
        if path.exists():
            if kind == "systemd":
                _manager(kind, "disable", "--now", f"{name}.service")
            else:
                _manager(kind, "unload", "-w", str(path))
            path.unlink()
            if kind == "systemd":
                _manager(kind, "daemon-reload")
        rows.append({"service": name, "file": str(path), "removed": not path.exists()})
    emit(rows, fmt, ("service", "file", "removed"))


def status(
    kind: Annotated[str | None, typer.Option("--kind")] = None,
    fmt: FormatOption = OutputFormat.text,
) -> None:
    """Which services are installed, and whether they run (per systemctl or launchctl)."""
    kind = _kind(kind)
    rows: list[dict[str, Any]] = []
    for name in SERVICES:
        path = unit_path(name, kind)
        state = None
        if path.exists():
            done = _manager(kind, "is-active", f"{name}.service") if kind == "systemd" \
                else _manager(kind, "list", f"dev.rbees.{name}")
            if done is not None:
                state = done.stdout.strip() if kind == "systemd" else (
                    "loaded" if done.returncode == 0 else "not loaded")
        rows.append({"service": name, "installed": path.exists(), "state": state,
                     "file": str(path)})
    emit(rows, fmt, ("service", "installed", "state", "file"))


@hookimpl
def rbees_register_cli(app: typer.Typer, program: str) -> None:
    if program != "rbees":
        return
    group = typer.Typer(name="service", no_args_is_help=True,
                        help="Run rbees-orcd and pool-managerd as user services "
                             "(systemd, launchd).")
    group.command("install")(install)
    group.command("uninstall")(uninstall)
    group.command("status")(status)
    app.add_typer(group)
