"""The ssh transport against a real OpenSSH server on loopback (``rbees_sshd``): the shared
contract, then ``rbees hosts`` and ``rbees pool --host`` as real processes."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pluggy
import pytest
from rbees_transport_ssh import SshTransport, remote_command

from rbees_core import plugins
from rbees_core.errors import HostKeyError
from rbees_core.hosts import HostConfig
from rbees_core.models import DEFAULT_MODEL_REF
from rbees_core.testing import find_free_port
from rbees_core.testing.ssh import SshServer, generate_key, venv_rbees_pool
from rbees_core.testing.transport import HUB_FILE, HUB_REPO, ProgramTransportContract

RBEES = str(Path(sys.executable).with_name("rbees"))
#: Every refusal must come within the connect timeout (10 s).
ERROR_WITHIN_S = 10.0


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.transports(rbees_pm)["ssh"] is SshTransport
    names = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert names["transport-ssh"].version == "0.1.0"
    assert names["transport-ssh"].hooks == ["rbees_register_transports"]


def test_the_entry_module_does_not_import_asyncssh() -> None:
    code = "import rbees_transport_ssh, sys; print('asyncssh' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_every_piece_of_the_remote_command_is_quoted() -> None:
    host = HostConfig(name="h", destination="h", remote_pool="/opt/my rbees/rbees-pool",
                      env={"RBEES_HOME": "/data/it's here", "HF_ENDPOINT": "http://x"})
    line = remote_command(host, ["models", "download", "--", "x; rm -rf / $(id) `id`"])
    check, run = line.split("; ", 1)
    assert check == "command -v '/opt/my rbees/rbees-pool' >/dev/null 2>&1 || exit 127"
    assert shlex.split(run) == ["exec", "env", "HF_ENDPOINT=http://x",
                                "RBEES_HOME=/data/it's here", "/opt/my rbees/rbees-pool",
                                "models", "download", "--", "x; rm -rf / $(id) `id`"]
    home = HostConfig(name="h", destination="h", remote_pool="~/.venv/bin/rbees-pool")
    assert remote_command(home, ["status"]).endswith("; exec ~/.venv/bin/rbees-pool status")


# -- the contract --------------------------------------------------------------------------


def remote_env(root: Path, hub: Any = None) -> dict[str, str]:
    """What rbees-pool needs on the far side: its own RBEES_HOME and HOME, and the hub."""
    env = {"RBEES_HOME": str(root / "remote-rbees"), "HOME": str(root / "remote-home")}
    if hub is not None:
        env["HF_ENDPOINT"] = hub.endpoint
    return env


@pytest.fixture
def local_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This side's HOME (for ~/.ssh) and RBEES_HOME (hosts.toml, rbees' known_hosts)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "rbees"))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


class TestSshContract(ProgramTransportContract):
    @pytest.fixture
    async def transport(self, rbees_sshd: SshServer, local_home: Path, tmp_path: Path,
                        fake_hub: Any) -> AsyncIterator[SshTransport]:
        known = tmp_path / "rbees" / "known_hosts"
        known.parent.mkdir(parents=True, exist_ok=True)
        known.write_text(rbees_sshd.known_hosts_line())
        (local_home / ".ssh" / "id_ed25519").write_bytes(rbees_sshd.client_key.read_bytes())
        (local_home / ".ssh" / "id_ed25519").chmod(0o600)
        host = HostConfig(name="pool1", destination=f"{rbees_sshd.user}@127.0.0.1:"
                          f"{rbees_sshd.port}", remote_pool=venv_rbees_pool(),
                          env=remote_env(tmp_path, fake_hub))
        async with SshTransport(host) as transport:
            yield transport


async def test_a_broken_known_hosts_file_is_one_clear_error(rbees_sshd: SshServer,
                                                            local_home: Path) -> None:
    (local_home / ".ssh" / "known_hosts").write_text("[x\n")
    host = HostConfig(name="pool1", destination=f"127.0.0.1:{rbees_sshd.port}")
    async with SshTransport(host) as transport:
        with pytest.raises(HostKeyError, match=r"known_hosts: cannot read this known_hosts"):
            await transport.run(["--version"])
    assert rbees_sshd.wait_no_sessions() == []


# -- rbees hosts and rbees pool over ssh, as real processes --------------------------------


@attrs.define
class Rbees:
    """``rbees`` run with this test's HOME (~/.ssh/config) and RBEES_HOME."""

    env: dict[str, str]
    server: SshServer
    root: Path

    def __call__(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RBEES, *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout)

    def json(self, *args: str) -> Any:
        done = self(*args, "--format", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def add(self, name: str, destination: str, *extra: str, hub: Any = None,
            remote_pool: str | None = None) -> None:
        env = [f"--env={k}={v}" for k, v in remote_env(self.root, hub).items()]
        done = self("hosts", "add", name, destination, "--remote-pool",
                    remote_pool or venv_rbees_pool(), *env, *extra)
        assert done.returncode == 0, done.stderr


@pytest.fixture
def rbees(rbees_sshd: SshServer, tmp_path: Path) -> Rbees:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(rbees_sshd.ssh_config("pool1"))
    default_key = home / ".ssh" / "id_ed25519"  # for destinations that are not aliases
    default_key.write_bytes(rbees_sshd.client_key.read_bytes())
    default_key.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RBEES_", "SSH_")) and k != "HF_ENDPOINT"}
    env.update(HOME=str(home), RBEES_HOME=str(tmp_path / "rbees"), COLUMNS="200")
    return Rbees(env=env, server=rbees_sshd, root=tmp_path)


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rbees: error: "), done.stderr
    return lines[0]


def test_first_contact_status_download_and_a_worker(rbees: Rbees, fake_hub: Any) -> None:
    rbees.add("pool1", "pool1", hub=fake_hub)  # an alias of ~/.ssh/config
    began = time.monotonic()
    refused = error_line(rbees("pool", "status", "--host", "pool1"))
    assert time.monotonic() - began < ERROR_WITHIN_S
    assert "unknown host ssh-ed25519 key SHA256:" in refused
    assert "rbees hosts add pool1 --accept-new" in refused
    assert rbees.server.wait_no_sessions() == []

    accepted = rbees("hosts", "add", "pool1", "--accept-new")
    assert accepted.returncode == 0, accepted.stderr
    assert "trusted the ssh-ed25519 host key" in accepted.stderr
    recorded = (rbees.root / "rbees" / "known_hosts").read_text()
    assert recorded.startswith(f"[127.0.0.1]:{rbees.server.port} {rbees.server.host_key[:80]}")
    (check,) = rbees.json("hosts", "check")
    assert check["reachable"] is True and check["problem"] is None

    state = rbees.json("pool", "status", "--host", "pool1")
    assert DEFAULT_MODEL_REF in {m["ref"] for m in state["models"]}
    text = rbees("pool", "status", "--host", "pool1")
    assert text.returncode == 0 and "devices:" in text.stdout and "smollm2" in text.stdout
    assert DEFAULT_MODEL_REF in {m["ref"] for m in rbees.json("pool", "models", "list",
                                                               "--host", "pool1")}

    fake_hub.add(HUB_REPO, HUB_FILE, os.urandom(32 * 1024 * 1024))
    fake_hub.throttle_bps = 16 * 1024 * 1024
    arrivals = stream_lines([RBEES, "pool", "models", "download", f"hf:{HUB_REPO}/{HUB_FILE}",
                             "--host", "pool1", "--format", "json"], rbees.env)
    events = [json.loads(line) for _, line in arrivals]
    assert events[-1]["event"] == "end" and events[-1]["fetched"] is True
    midway = [at for at, line in arrivals if '"progress"' in line and
              0 < json.loads(line)["bytes_done"] < 32 * 1024 * 1024]
    assert midway and arrivals[-1][0] - midway[0] > 0.2, "progress was not streamed"
    done = rbees("pool", "models", "download", f"hf:{HUB_REPO}/{HUB_FILE}", "--host", "pool1")
    assert done.returncode == 0 and "already here at" in done.stdout

    spawned = rbees.json("pool", "worker", "spawn", "cpu", "--model", DEFAULT_MODEL_REF,
                         "--host", "pool1")
    try:
        assert spawned["state"] == "ready"
        listed = rbees("pool", "worker", "list", "--host", "pool1")
        assert spawned["worker_id"] in listed.stdout and "ready" in listed.stdout
    finally:
        stopped = rbees.json("pool", "worker", "stop", spawned["worker_id"], "--host", "pool1")
    assert [w["state"] for w in stopped] == ["stopped"]
    assert rbees.json("pool", "worker", "list", "--host", "pool1") == []
    assert rbees.server.wait_no_sessions() == []


def stream_lines(argv: list[str], env: dict[str, str]) -> list[tuple[float, str]]:
    """Each stdout line of a process with the time it arrived."""
    arrivals = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            arrivals.append((time.monotonic(), line.rstrip("\n")))
        assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    return arrivals


def test_the_alias_s_known_hosts_file_is_honoured(rbees: Rbees) -> None:
    known = rbees.root / "alias_known_hosts"
    known.write_text(rbees.server.known_hosts_line())
    config = Path(rbees.env["HOME"]) / ".ssh" / "config"
    config.write_text(rbees.server.ssh_config("trusted", known_hosts=known))
    rbees.add("trusted", "trusted")
    assert rbees.json("pool", "worker", "list", "--host", "trusted") == []


def test_a_remote_error_keeps_its_exit_code(rbees: Rbees) -> None:
    rbees.add("pool1", "pool1", "--accept-new")
    line = error_line(rbees("pool", "models", "info", "no-such-model", "--host", "pool1"))
    assert line.startswith("rbees: error: pool1: ") and "no-such-model" in line
    usage = rbees("pool", "worker", "spawn", "cpu", "--host", "pool1")
    assert usage.returncode == 2 and "--model" in usage.stderr  # refused here, not sent


def test_shell_metacharacters_are_refused_before_connecting(rbees: Rbees, tmp_path: Path
                                                            ) -> None:
    rbees.add("dead", f"root@127.0.0.1:{find_free_port()}")
    marker = tmp_path / "pwned"
    for model in (f"x;touch {marker}", f"$(touch {marker})", "../../etc/passwd"):
        line = error_line(rbees("pool", "models", "download", model, "--host", "dead"))
        assert "model: must not" in line  # the dead host was never tried
    assert not marker.exists()


# -- failures: one distinct line each, within the connect timeout, nothing left running ------


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for sock in [server, *held]:
        sock.close()


def test_each_failure_is_one_distinct_line(rbees: Rbees, tmp_path: Path, silent_port: int
                                           ) -> None:
    server = rbees.server
    ssh = Path(rbees.env["HOME"]) / ".ssh"
    good = tmp_path / "good_known_hosts"
    good.write_text(server.known_hosts_line())
    generate_key(tmp_path / "stranger_key")
    (ssh / "config").write_text(
        server.ssh_config("pool1", known_hosts=good)
        + server.ssh_config("intruder", identity=tmp_path / "stranger_key", known_hosts=good))
    other_host_key = generate_key(tmp_path / "other_host_key")
    (ssh / "known_hosts").write_text(server.known_hosts_line(other_host_key))
    rbees.add("changed", f"{server.user}@127.0.0.1:{server.port}")  # ~/.ssh/known_hosts
    rbees.add("unreachable", f"{server.user}@127.0.0.1:{find_free_port()}")
    rbees.add("silent", f"{server.user}@127.0.0.1:{silent_port}", "--connect-timeout", "1")
    rbees.add("intruder", "intruder")
    rbees.add("nopool", "pool1", remote_pool="/nonexistent/bin/rbees-pool")

    expected = {
        "changed": ("has CHANGED", "rbees hosts add changed --accept-new",
                    f"ssh-keygen -R '[127.0.0.1]:{server.port}' -f {ssh / 'known_hosts'}"),
        "unreachable": ("cannot reach", "connection refused"),
        "silent": ("cannot reach", "no answer within 1 s"),
        "intruder": ("refused authentication",),
        "nopool": ("no rbees-pool at '/nonexistent/bin/rbees-pool'", "--remote-pool PATH"),
    }
    lines = {}
    for name, fragments in expected.items():
        began = time.monotonic()
        line = error_line(rbees("pool", "status", "--host", name))
        took = time.monotonic() - began
        assert took < ERROR_WITHIN_S, (name, took)
        assert line.startswith(f"rbees: error: {name}: "), line
        for fragment in fragments:
            assert fragment in line, (name, line)
        assert server.wait_no_sessions() == [], name
        lines[name] = line
        print(f"{name}: {took:.2f} s: {line}")
    assert len(set(lines.values())) == len(lines)


def test_host_all_reports_each_host_and_names_the_dead_one(rbees: Rbees) -> None:
    server = rbees.server
    rbees.add("pool1", "pool1", "--accept-new")
    rbees.add("pool2", f"{server.user}@127.0.0.1:{server.port}", "--accept-new")
    rbees.add("dead", f"{server.user}@127.0.0.1:{find_free_port()}")
    began = time.monotonic()
    done = rbees("pool", "status", "--host", "all", "--format", "json")
    assert time.monotonic() - began < ERROR_WITHIN_S
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["pool1"]["ok"] and report["pool2"]["ok"] and not report["dead"]["ok"]
    assert report["pool1"]["result"]["models"] and report["pool2"]["exit_code"] == 0
    assert "cannot reach" in report["dead"]["error"]
    assert done.stderr.strip().splitlines()[-1] == \
        "rbees: error: failed on 1 of 3 hosts: dead"
    text = rbees("pool", "worker", "list", "--host", "all")
    assert text.returncode == 1
    assert "== pool1 (pool1) ==" in text.stdout and "== pool2" in text.stdout
    assert "rbees: error: dead: cannot reach" in text.stderr
    assert server.wait_no_sessions() == []
