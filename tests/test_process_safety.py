"""Issue 26 item 3 and item 6: pid and url files in the runtime directory, a pid file that
outlived its process never makes rbees signal (or refuse to start beside) whatever got its
pid since, and the XDG directories. Real processes throughout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbees_core.config import config_path, rbees_home, runtime_dir
from rbees_core.http import Daemon
from rbees_core.log import Logger
from rbees_core.processes import pid_file_holder
from rbees_core.testing import find_free_port

BIN = Path(sys.executable).parent
HOUR_AGO = time.time() - 3600


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def stale(path: Path, pid: int) -> Path:
    """A pid file written an hour ago, whose pid another process has now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n")
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


def test_a_daemon_takes_over_a_pid_file_whose_pid_another_process_got(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    pid_file = stale(tmp_path / "run" / "d.pid", sleeper.pid)
    assert pid_file_holder(pid_file) is None
    daemon = Daemon("test-daemon", pid_file=pid_file, log=Logger("test-daemon"))
    daemon.claim()  # no ConflictError: the sleep is not the daemon that wrote the file
    assert pid_file.read_text() == f"{os.getpid()}\n"
    daemon.release()
    assert sleeper.poll() is None
    # a file written while its process ran names it
    pid_file.write_text(f"{sleeper.pid}\n")
    assert pid_file_holder(pid_file) == sleeper.pid


def xdg_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RBEES_HOME", "RBEES_ORCHESTRATOR_URL", "RBEES_CONFIG")}
    env.update(HOME=str(tmp_path / "user"), XDG_RUNTIME_DIR=str(tmp_path / "xdg-run"),
               XDG_DATA_HOME=str(tmp_path / "xdg-data"),
               XDG_CONFIG_HOME=str(tmp_path / "xdg-config"))
    return env


def test_directories_follow_xdg_unless_rbees_home_is_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in xdg_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RBEES_HOME", raising=False)
    monkeypatch.delenv("RBEES_CONFIG", raising=False)
    assert rbees_home() == tmp_path / "xdg-data" / "rbees"
    assert runtime_dir() == tmp_path / "xdg-run" / "rbees"
    assert config_path() == (tmp_path / "xdg-config" / "rbees" / "config.toml", False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/run")  # not absolute: ignored
    monkeypatch.delenv("XDG_DATA_HOME")
    assert runtime_dir() == tmp_path / "user" / ".local" / "share" / "rbees" / "run"
    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "home"))  # RBEES_HOME wins
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg-run"))
    assert rbees_home() == tmp_path / "home"
    assert runtime_dir() == tmp_path / "home" / "run"


def test_stop_commands_ignore_a_lookalike_holding_a_stale_runtime_pid_file(
        tmp_path: Path) -> None:
    """Processes that even run under the daemons' names, but started after their pid files
    were written: `daemon stop`, `orchestrator stop` and `down` signal none of them."""
    env = xdg_env(tmp_path)
    run = tmp_path / "xdg-run" / "rbees"
    lookalikes = {name: subprocess.Popen(
        ["bash", "-c", f"exec -a {name} {sys.executable} -c 'import time; time.sleep(120)'"])
        for name in ("pool-managerd", "rbees-orcd")}
    try:
        time.sleep(0.3)
        for name, proc in lookalikes.items():
            stale(run / f"{name}.pid", proc.pid)
        for argv in (("rbees-pool", "daemon", "stop"), ("rbees", "orchestrator", "stop"),
                     ("rbees-pool", "down"), ("rbees", "down", "--local")):
            done = subprocess.run([str(BIN / argv[0]), *argv[1:]], env=env, text=True,
                                  capture_output=True, timeout=60)
            assert done.returncode == 0, (argv, done.stderr)
        assert "not running" in subprocess.run(
            [str(BIN / "rbees-pool"), "daemon", "stop"], env=env, text=True,
            capture_output=True, timeout=60).stderr
        assert all(proc.poll() is None for proc in lookalikes.values())
    finally:
        for proc in lookalikes.values():
            proc.kill()
            proc.wait()


def test_pool_managerd_keeps_its_pid_and_url_files_in_the_runtime_directory(
        tmp_path: Path) -> None:
    env = xdg_env(tmp_path)
    bind = f"127.0.0.1:{find_free_port()}"
    pool = [str(BIN / "rbees-pool"), "daemon"]
    done = subprocess.run([*pool, "start", "--bind", bind], env=env, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    try:
        run = tmp_path / "xdg-run" / "rbees"
        assert (run / "pool-managerd.url").read_text() == f"http://{bind}"
        pid = int((run / "pool-managerd.pid").read_text())
        assert oct((run).stat().st_mode & 0o777) == oct(0o700)
        assert (tmp_path / "xdg-data" / "rbees" / "logs" / "pool-managerd.log").exists()
        status = subprocess.run([*pool, "status", "--format", "json"], env=env, text=True,
                                capture_output=True, timeout=60)
        assert status.returncode == 0 and f'"pid": {pid}' in status.stdout, status.stdout
    finally:
        done = subprocess.run([*pool, "stop"], env=env, text=True, capture_output=True,
                              timeout=60)
    assert done.returncode == 0 and "stopped" in done.stderr, done.stderr
    assert not (run / "pool-managerd.pid").exists() and not (run / "pool-managerd.url").exists()
