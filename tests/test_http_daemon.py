"""rbees_core.http.daemon: the one runner of rbees-orcd, pool-managerd and rbees-workerd."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from rbees_core.errors import ConflictError
from rbees_core.http import Daemon
from rbees_core.log import Logger
from rbees_core.testing import find_free_port


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


APP = Starlette(routes=[Route("/", hello)])


async def test_serves_until_the_signal_then_removes_its_pid_file(tmp_path: Path) -> None:
    pid_file, port = tmp_path / "run" / "d.pid", find_free_port()
    daemon = Daemon("test-daemon", pid_file=pid_file, log=Logger("test-daemon"))
    beside_ran, after_ran, signalled = asyncio.Event(), [], []

    async def beside() -> None:
        beside_ran.set()
        await asyncio.sleep(3600)

    def on_signal() -> None:
        signalled.append(True)
        daemon.shutdown.set()

    serving = asyncio.create_task(daemon.serve(
        APP, "127.0.0.1", port, on_signal=on_signal, beside=beside,
        after=lambda: after_ran.append(True), exit_code=lambda: 3, url="x"))
    await asyncio.wait_for(beside_ran.wait(), 10)
    assert pid_file.read_text() == f"{os.getpid()}\n"
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            try:
                assert (await client.get(f"http://127.0.0.1:{port}/")).text == "hello"
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving, 10) == 3
    assert signalled and after_ran and not pid_file.exists()


def test_an_exclusive_daemon_refuses_to_start_beside_a_live_one(tmp_path: Path) -> None:
    pid_file = tmp_path / "d.pid"
    pid_file.write_text(f"{os.getppid()}\n")  # alive: the process that runs the tests
    daemon = Daemon("test-daemon", pid_file=pid_file, log=Logger("test-daemon"))
    with pytest.raises(ConflictError, match=f"already running .*pid {os.getppid()}"):
        daemon.claim()
    Daemon("worker", pid_file=pid_file, log=Logger("w"), exclusive=False).claim()
    assert pid_file.read_text() == f"{os.getpid()}\n"


def test_a_daemon_that_fails_before_serving_leaves_no_pid_file(tmp_path: Path) -> None:
    pid_file = tmp_path / "d.pid"
    daemon = Daemon("test-daemon", pid_file=pid_file, log=Logger("test-daemon"))
    with pytest.raises(ConflictError, match="the store"), daemon.claimed():
        assert pid_file.read_text() == f"{os.getpid()}\n"
        raise ConflictError("the store is locked")
    assert not pid_file.exists()


def test_a_stale_pid_file_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    pid_file = tmp_path / "d.pid"
    pid_file.write_text(f"{dead.pid}\n")
    daemon = Daemon("test-daemon", pid_file=pid_file, log=Logger("test-daemon"))
    daemon.claim()
    assert pid_file.read_text() == f"{os.getpid()}\n"
    daemon.release()
    assert not pid_file.exists()


@pytest.mark.parametrize("argv", [
    ["rbees-orcd"], ["pool-managerd"],
    ["rbees-workerd", "--worker-id", "w1", "--model", "file:/nonexistent.gguf"],
])
def test_a_taken_port_is_one_line_and_exit_1(tmp_path: Path, argv: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        binary = Path(sys.executable).parent / argv[0]
        done = subprocess.run([str(binary), *argv[1:], "--bind", f"127.0.0.1:{port}"],
                              env={**os.environ, "RBEES_HOME": str(tmp_path)},
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    # stderr is no terminal here but a log (a pool's worker.log): JSON lines only, the
    # failure one of them, as the person at a terminal gets it in one plain line
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    errors = [line for line in lines if line["event"] == "start_failed"]
    assert len(errors) == 1 and errors[0]["level"] == "error", done.stderr
    assert "in use" in errors[0]["error"]
    assert not list((tmp_path / "run").glob("*.pid"))


def test_an_unknown_scheduler_is_one_line_and_leaves_no_pid_file(tmp_path: Path) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "rbees-orcd"), "--scheduler",
                           "nope", "--bind", f"127.0.0.1:{find_free_port()}"],
                          env={**os.environ, "RBEES_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    errors = [line["error"] for line in lines if line["event"] == "start_failed"]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("no scheduler named 'nope' is installed (installed: "), errors
    assert "least-loaded" in errors[0]
    assert not list(tmp_path.glob("run/*.pid"))


def test_a_taken_port_is_said_plainly_at_a_terminal(tmp_path: Path) -> None:
    """At a terminal the JSON line is followed by the plain one a person reads."""
    import pty

    main, sub = pty.openpty()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(Path(sys.executable).parent / "rbees-orcd"), "--bind", f"127.0.0.1:{port}"],
            env={**os.environ, "RBEES_HOME": str(tmp_path)}, stdout=subprocess.DEVNULL,
            stderr=sub, timeout=60)
    os.close(sub)
    said = b""
    with contextlib.suppress(OSError):  # EIO once everything written was read
        while chunk := os.read(main, 4096):
            said += chunk
    os.close(main)
    text = said.decode().replace("\r\n", "\n")
    assert done.returncode == 1
    assert '"event": "start_failed"' in text and "\nrbees-orcd: error: " in text, text
