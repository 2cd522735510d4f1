"""Processes and ports for tests: what the fixtures of :mod:`rbees_core.testing`, the SSH
server (:mod:`rbees_core.testing.ssh`) and the simulated hosts share. Import these names from
:mod:`rbees_core.testing`."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import httpx


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def times_run(pid: int) -> int:
    """How many times the kernel has run the threads of ``pid`` (``schedstat``'s third
    field, Linux): each wake-up of an idle daemon counts once or more."""
    return sum(int((task / "schedstat").read_text().split()[2])
               for task in Path(f"/proc/{pid}/task").iterdir())


def wait_http(url: str, *, timeout: float = 60.0, ok: Callable[[httpx.Response], bool]
              = lambda r: r.status_code == 200, proc: subprocess.Popen[bytes] | None = None,
              headers: dict[str, str] | None = None,
              verify: ssl.SSLContext | bool = True) -> httpx.Response:
    """Poll ``url`` until ``ok(response)``; fail early if ``proc`` exits. ``verify``: an
    HTTPS URL's CA (``ssl.create_default_context(cafile=...)``)."""
    deadline = time.monotonic() + timeout
    last: Exception | httpx.Response | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            response = httpx.get(url, timeout=2.0, headers=headers, verify=verify)
            if ok(response):
                return response
            last = response
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last!r})")


@attrs.define
class ManagedProcess:
    """A process a test started, its output in ``log_path``; :meth:`stop` ends it (SIGTERM,
    then SIGKILL after ``grace`` s) and gives its exit code."""

    argv: Sequence[str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
