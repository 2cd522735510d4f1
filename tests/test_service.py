"""Services (issue 26 item 2): ``rbees service install|uninstall|status`` render systemd user
units and launchd agents, ``systemd-analyze verify`` accepts the units, and a daemon started
with ``NOTIFY_SOCKET`` tells that socket READY=1 once it serves. Real processes and a real
datagram socket."""

from __future__ import annotations

import os
import plistlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rbees_core.http.server import notify_ready
from rbees_core.testing import find_free_port

BIN = Path(sys.executable).parent


def rbees(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path / "user"), "RBEES_HOME": str(tmp_path / "home"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.run([str(BIN / "rbees"), "service", *args], env=env, text=True,
                          capture_output=True, timeout=60)


def test_systemd_units_are_written_verified_listed_and_removed(tmp_path: Path) -> None:
    done = rbees(tmp_path, "install", "--kind", "systemd", "--no-start", "--bind",
                 "127.0.0.1:8181", "--pool-bind", "127.0.0.1:9292")
    assert done.returncode == 0, done.stderr
    units = tmp_path / "config" / "systemd" / "user"
    orcd = (units / "rbees-orcd.service").read_text()
    pool = (units / "rbees-pool.service").read_text()
    assert "Type=notify" in orcd and "NotifyAccess=main" in orcd
    assert f"ExecStart={BIN / 'rbees-orcd'} --bind 127.0.0.1:8181 --log-to stdout\n" in orcd
    assert (f"ExecStart={BIN / 'pool-managerd'} --bind 127.0.0.1:9292 "
            "--orchestrator http://127.0.0.1:8181 --log-to stdout\n") in pool
    assert "After=rbees-orcd.service" in pool and "KillMode=mixed" in pool
    assert f"Environment=RBEES_HOME={tmp_path / 'home'}" in orcd
    assert "WantedBy=default.target" in orcd
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:  # Linux with systemd: the units must be valid
        check = subprocess.run([analyze, "verify", str(units / "rbees-orcd.service"),
                                str(units / "rbees-pool.service")], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stderr

    listed = rbees(tmp_path, "status", "--kind", "systemd", "--format", "json")
    assert '"installed": true' in listed.stdout, listed.stdout
    done = rbees(tmp_path, "uninstall", "--kind", "systemd", "--pool")
    assert done.returncode == 0, done.stderr
    assert not (units / "rbees-pool.service").exists()
    assert (units / "rbees-orcd.service").exists()


def test_launchd_agents_are_plists_running_this_environment(tmp_path: Path) -> None:
    done = rbees(tmp_path, "install", "--kind", "launchd", "--no-start", "--orchestrator")
    assert done.returncode == 0, done.stderr
    agents = tmp_path / "user" / "Library" / "LaunchAgents"
    assert not (agents / "dev.rbees.rbees-pool.plist").exists()
    agent = plistlib.loads((agents / "dev.rbees.rbees-orcd.plist").read_bytes())
    assert agent["Label"] == "dev.rbees.rbees-orcd"
    assert agent["ProgramArguments"] == [str(BIN / "rbees-orcd"), "--bind", "127.0.0.1:8080"]
    assert agent["EnvironmentVariables"]["RBEES_HOME"] == str(tmp_path / "home")
    assert agent["RunAtLoad"] is True
    assert agent["StandardErrorPath"] == str(tmp_path / "home" / "logs" / "rbees-orcd.log")


def listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    return sock


def test_pool_managerd_tells_notify_socket_it_is_ready_once_it_serves(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    port = find_free_port()
    with listener(path) as sock:
        env = {**os.environ, "RBEES_HOME": str(tmp_path / "home"), "NOTIFY_SOCKET": str(path)}
        proc = subprocess.Popen([str(BIN / "pool-managerd"), "--bind", f"127.0.0.1:{port}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            message = sock.recv(4096).decode()
            assert "READY=1" in message and f"MAINPID={proc.pid}" in message
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        finally:
            proc.terminate()
            assert proc.wait(60) == 0


def test_notify_ready_speaks_to_abstract_sockets_and_forgets_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"rbees-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify_ready()
        assert sock.recv(4096).startswith(b"READY=1\n")
    assert "NOTIFY_SOCKET" not in os.environ
    assert not notify_ready()  # once only
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/socket")
    assert not notify_ready()  # an unreachable socket is not an error
