"""pytest plugin for rbees plugin authors (loaded automatically through ``pytest11`` once
the rbees-testing distribution is installed; a runtime install of rbees does not register it).

Fixtures:

- ``rbees_pm``: a fresh plugin manager with the installed plugins (entry points loaded).
- ``rbees_register``: ``rbees_register(plugin, name=None)`` registers a plugin on
  ``rbees_pm`` for one test only.
- ``asgi_client``: ``async with asgi_client(app) as client`` gives an ``httpx.AsyncClient``
  talking to an ASGI app in-process (lifespan included).
- ``free_port``: a TCP port free on 127.0.0.1.
- ``rbees_process``: ``rbees_process(argv, env=None)`` starts a real process with its output
  in a log file, and stops it (SIGTERM, then SIGKILL) after the test.
- ``rbees_worker``: ``rbees_worker(model=..., backend=..., slots=...)`` starts a real
  ``rbees-workerd`` on a free port and waits until it is ready; returns a
  :class:`WorkerHandle`.
- ``smollm2_path``: the path of the embedded SmolLM2 GGUF file.
- ``fake_hub``: a running :class:`rbees_core.testing.hub.FakeHub` (loopback Hugging Face
  Hub file protocol) with ``HF_ENDPOINT`` pointing at it for the test.
- ``rbees_cluster``: a real cluster (``rbees up`` on loopback with the embedded SmolLM2),
  one per test module (:class:`rbees_core.testing.cluster.Cluster`; ``up`` there starts
  one with other flags or environment).
- ``rbees_sshd``: a real OpenSSH server on loopback for the test session
  (:class:`rbees_core.testing.ssh.SshServer`); fails, never skips, when sshd is missing.

Contract suites a plugin's tests subclass, one per plugin kind: transports
(:mod:`rbees_core.testing.transport`), schedulers (:mod:`rbees_core.testing.scheduler`).
Structural fuzzing of any daemon's routes, from its route table: :mod:`rbees_core.testing.fuzz`
(needs hypothesis).
Every run ends with a scan of the logs it wrote for keys and tokens
(:mod:`rbees_core.testing.leaks`); a leak fails the run.
Helpers for simulated hosts, the fake hub and the SSH server live beside them
(:mod:`~rbees_core.testing.hosts`, :mod:`~rbees_core.testing.hub`,
:mod:`~rbees_core.testing.ssh`); processes and ports in :mod:`rbees_core.testing.processes`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import pluggy
import pytest

from rbees_core import plugins, sse
from rbees_core.models import DEFAULT_MODEL_REF, resolve_model
from rbees_core.testing.processes import ManagedProcess, find_free_port, times_run, wait_http
from rbees_core.testing.streams import parse_sse


@attrs.define
class LiveEvents:
    """A job's event stream read on a thread as it arrives (:func:`follow_events`).

    ``seen`` holds ``(time.monotonic(), event, data)`` per frame; ``first_token`` is set when
    the first ``token`` frame arrives; ``thread`` ends with the stream."""

    seen: list[tuple[float, str, Any]]
    first_token: threading.Event
    thread: threading.Thread


def follow_events(url: str, *, headers: dict[str, str] | None = None,
                  timeout: float = 60) -> LiveEvents:
    """Start reading the SSE stream at ``url`` (``GET``) on a daemon thread."""
    live = LiveEvents(seen=[], first_token=threading.Event(), thread=threading.Thread())

    def read() -> None:
        with httpx.stream("GET", url, headers=headers, timeout=timeout) as answer:
            for frame in sse.iter_events(answer.iter_lines()):
                live.seen.append((time.monotonic(), frame.event, frame.json()))
                if frame.event == "token":
                    live.first_token.set()

    live.thread = threading.Thread(target=read, daemon=True)
    live.thread.start()
    return live


@attrs.define
class WorkerHandle:
    process: ManagedProcess
    port: int
    worker_id: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def execute(self, body: dict[str, Any], *, timeout: float = 120.0
                ) -> list[tuple[int | None, str, dict[str, Any]]]:
        """POST /v2/execute and return every frame of the stream."""
        response = httpx.post(f"{self.url}/v2/execute", json=body, timeout=timeout)
        response.raise_for_status()
        return parse_sse(response.text)

    def text(self, body: dict[str, Any]) -> str:
        return "".join(d["t"] for _, e, d in self.execute(body) if e == "token")


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """Run an ASGI app's lifespan startup and shutdown around the block."""
    import asyncio

    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(message: dict[str, Any]) -> None:
        await from_app.put(message)

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"},
                                    "state": {}}, to_app.get, send))
    await to_app.put({"type": "lifespan.startup"})
    message = await from_app.get()
    if message["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup failed: {message}")
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        await from_app.get()
        await task


@pytest.fixture
def rbees_pm() -> pluggy.PluginManager:
    return plugins.make_manager(plugins.builtin_plugins())


@pytest.fixture
def rbees_register(rbees_pm: pluggy.PluginManager) -> Iterator[Callable[..., object]]:
    added: list[object] = []

    def register(plugin: object, name: str | None = None) -> object:
        rbees_pm.register(plugin, name=name)
        rbees_pm.check_pending()
        added.append(plugin)
        return plugin

    yield register
    for plugin in added:
        rbees_pm.unregister(plugin)


@pytest.fixture
def asgi_client() -> Callable[[Any], contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]:
    @contextlib.asynccontextmanager
    async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
        async with lifespan(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://rbees.test") as c:
                yield c

    return client


@pytest.fixture
def free_port() -> int:
    return find_free_port()


@pytest.fixture
def rbees_process(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    started: list[ManagedProcess] = []

    def start(argv: Sequence[str], env: dict[str, str] | None = None,
              name: str | None = None) -> ManagedProcess:
        log_path = tmp_path / f"{name or Path(argv[0]).name}-{len(started)}.log"
        full_env = {**os.environ, **(env or {})}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                    env=full_env, start_new_session=True)
        managed = ManagedProcess(argv=argv, proc=proc, log_path=log_path)
        started.append(managed)
        return managed

    yield start
    for managed in started:
        managed.stop(grace=5.0)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from rbees_core.testing.hub import FakeHub

    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def rbees_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from rbees_core.testing.cluster import up

    cluster = up(tmp_path_factory.mktemp("cluster") / "home")
    yield cluster
    cluster.rbees("down")


@pytest.fixture(scope="session")
def rbees_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from rbees_core.testing.ssh import MISSING_SSHD, SSHD, SshServer

    if not os.access(SSHD, os.X_OK):
        pytest.fail(MISSING_SSHD)
    server = SshServer.start(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smollm2_path(rbees_pm: pluggy.PluginManager) -> str:
    return resolve_model(rbees_pm, DEFAULT_MODEL_REF)


def workerd_argv(worker_id: str, port: int, *, model: str = DEFAULT_MODEL_REF,
                 backend: str = "llamacpp", device: str = "cpu", slots: int = 1,
                 extra: Sequence[str] = ()) -> list[str]:
    exe = Path(sys.executable).with_name("rbees-workerd")
    return [str(exe), "--worker-id", worker_id, "--model", model, "--backend", backend,
            "--device", device, "--port", str(port), "--slots", str(slots), *extra]


@pytest.fixture
def rbees_worker(rbees_process: Callable[..., ManagedProcess], tmp_path: Path
                 ) -> Callable[..., WorkerHandle]:
    def start(*, model: str = DEFAULT_MODEL_REF, backend: str = "llamacpp",
              device: str = "cpu", slots: int = 1, worker_id: str = "w1",
              extra: Sequence[str] = (), env: dict[str, str] | None = None,
              ready_timeout: float = 120.0) -> WorkerHandle:
        port = find_free_port()
        proc = rbees_process(
            workerd_argv(worker_id, port, model=model, backend=backend, device=device,
                         slots=slots, extra=extra),
            env={"RBEES_HOME": str(tmp_path / "rbees-home"), **(env or {})},
            name=f"workerd-{worker_id}",
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/v2/ready", timeout=ready_timeout,
                      proc=proc.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- worker log ---\n{proc.log()}") from exc
        return WorkerHandle(process=proc, port=port, worker_id=worker_id)

    return start


@pytest.hookimpl
def pytest_configure(config: pytest.Config) -> None:
    from rbees_core.testing import leaks

    leaks.configure(config)


@pytest.hookimpl
def pytest_unconfigure(config: pytest.Config) -> None:
    from rbees_core.testing import leaks

    leaks.unconfigure()


@pytest.hookimpl
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    from rbees_core.testing import leaks

    leaks.note_report(report)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    from rbees_core.testing import leaks

    leaks.finish(session)


__all__ = [
    "LiveEvents", "ManagedProcess", "WorkerHandle", "asgi_client", "fake_hub", "find_free_port",
    "follow_events", "free_port", "lifespan", "parse_sse", "rbees_cluster", "rbees_pm",
    "rbees_process",
    "rbees_register", "rbees_sshd", "rbees_worker", "smollm2_path", "times_run", "wait_http",
    "workerd_argv",
]
