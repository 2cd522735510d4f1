"""The ``rbees`` and ``rbees-pool`` console scripts, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rbees_core import plugins
from rbees_core.errors import ConfigError
from rbees_core.programs import cli_common, pool_cli, rbees_cli

BIN = Path(sys.executable).parent
PROGRAMS = ["rbees", "rbees-pool"]
INSTALLED = {
    "backend-llamacpp": ("rbees-backend-llamacpp", ["rbees_register_backends"]),
    "source-file": ("rbees-source-file", ["rbees_register_model_sources"]),
    "source-pkg": ("rbees-source-pkg", ["rbees_register_model_sources"]),
}


def run(program: str, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("RBEES_DISABLED_PLUGINS", "RBEES_DISABLE_PLUGIN_AUTOLOAD",
                         "RBEES_DEBUG")}
    return subprocess.run([str(BIN / program), *args], capture_output=True, text=True,
                          env={**base, "COLUMNS": "100", **(env or {})}, timeout=60)


@pytest.mark.parametrize("program", PROGRAMS)
def test_help(program: str) -> None:
    result = run(program, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: {program}" in result.stdout
    assert "plugins" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("program", PROGRAMS)
def test_no_arguments_show_help(program: str) -> None:
    result = run(program)
    assert result.returncode in (0, 2)  # click >= 8.2 treats it as a usage error
    assert f"Usage: {program}" in result.stdout + result.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_version(program: str) -> None:
    result = run(program, "--version")
    assert result.returncode == 0
    # the kernel's distribution: rbees-core (named rbees in a venv set up before the split)
    kernel = plugins.distribution_version("rbees-core") or plugins.distribution_version("rbees")
    assert result.stdout == f"{program} {kernel}\n"


@pytest.mark.parametrize("program", PROGRAMS)
def test_plugins_as_json(program: str) -> None:
    result = run(program, "plugins", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    listed = json.loads(result.stdout)
    assert all(set(entry) == {"name", "version", "hooks"} for entry in listed)
    by_name = {entry["name"]: entry for entry in listed}
    for name, (dist, hooks) in INSTALLED.items():
        assert by_name[name]["version"] == plugins.distribution_version(dist)
        assert by_name[name]["version"] is not None
        assert by_name[name]["hooks"] == hooks
    assert [entry["name"] for entry in listed] == sorted(by_name)


@pytest.mark.parametrize("program", PROGRAMS)
def test_plugins_as_text(program: str) -> None:
    result = run(program, "plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "HOOKS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    for name, (dist, hooks) in INSTALLED.items():
        assert rows[name] == [name, plugins.distribution_version(dist), *hooks]


def test_format_is_case_insensitive() -> None:
    result = run("rbees", "plugins", "--format", "JSON")
    assert result.returncode == 0
    assert isinstance(json.loads(result.stdout), list)


def test_disabled_plugins_are_not_listed() -> None:
    result = run("rbees", "plugins", "--format", "json",
                 env={"RBEES_DISABLED_PLUGINS": "source-file,backend-llamacpp"})
    assert result.returncode == 0, result.stderr
    names = {entry["name"] for entry in json.loads(result.stdout)}
    assert "source-pkg" in names
    assert not names & {"source-file", "backend-llamacpp"}


def test_autoload_off_lists_only_the_builtins() -> None:
    result = run("rbees", "plugins", "--format", "json",
                 env={"RBEES_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"name": name, "version": None, "hooks": ["rbees_register_cli"]}
        for name in sorted(name for name, _ in rbees_cli.BUILTINS)]
    text = run("rbees", "plugins", env={"RBEES_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert text.stdout.split()[:3] == ["NAME", "VERSION", "HOOKS"]
    pool = run("rbees-pool", "plugins", "--format", "json",
               env={"RBEES_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert json.loads(pool.stdout) == [
        {"name": name, "version": None, "hooks": ["rbees_register_cli"]}
        for name in sorted(name for name, _ in pool_cli.BUILTINS)]


def test_rbees_pool_command_groups_are_builtin_plugins() -> None:
    result = run("rbees-pool", "--help")
    commands = [line.split()[0] for line in
                result.stdout.split("Commands:")[1].strip().splitlines()]
    assert commands == ["plugins", "status", "down", "completion", "models", "worker", "git",
                        "daemon"]
    blocked = run("rbees-pool", "git", "status", env={"RBEES_DISABLED_PLUGINS": "pool-git"})
    assert blocked.returncode == 2 and "No such command 'git'" in blocked.stderr
    assert "git" not in run("rbees", "--help").stdout.split("Commands:")[1]


@pytest.mark.parametrize("args", [["--help"], ["models", "list"],
                                  ["models", "list", "--format", "json"]])
def test_rbees_pool_does_not_import_heavy_libraries(args: list[str]) -> None:
    code = textwrap.dedent(f"""
        import sys
        from rbees_core.programs import pool_cli
        try:
            pool_cli.main({args!r})
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        heavy = ["starlette", "uvicorn", "httpx", "llama_cpp", "torch", "prometheus_client",
                 "numpy", "huggingface_hub", "pynvml", "rich", "asyncio", "pydantic",
                 "importlib.metadata"]
        print(",".join(m for m in heavy if m in sys.modules), file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "RBEES_HOME": "/nonexistent-rbees"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("command", ["chat", "repl", "interactive", "shell"])
def test_there_is_no_repl(program: str, command: str) -> None:
    result = run(program, command)
    assert result.returncode == 2
    assert "No such command" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args", [
    ["--no-such-flag"],
    ["plugins", "--format", "xml"],
    ["plugins", "--format"],
    ["plugins", "unexpected-argument"],
])
def test_bad_usage_exits_2(args: list[str]) -> None:
    result = run("rbees", *args)
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    assert result.stderr.strip()


def test_help_does_not_import_heavy_libraries() -> None:
    code = textwrap.dedent("""
        import sys
        from rbees_core.programs import rbees_cli
        try:
            rbees_cli.main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        heavy = ["starlette", "uvicorn", "httpx", "llama_cpp", "torch", "prometheus_client",
                 "numpy", "asyncssh", "pynvml", "pydantic", "importlib.metadata"]
        print(",".join(m for m in heavy if m in sys.modules), file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


# -- errors: one line and exit 1; RBEES_DEBUG=1 shows the traceback -------------------------


@pytest.fixture
def broken_plugin_path(tmp_path: Path) -> Path:
    """A directory holding an installed-looking distribution whose plugin misspells a hook."""
    (tmp_path / "rbees_typo_plugin.py").write_text(textwrap.dedent("""
        from rbees_core.hookspecs import hookimpl

        @hookimpl
        def rbees_register_backend():
            return []
    """))
    dist = tmp_path / "rbees_typo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rbees-typo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[rbees]\ntypo-plugin = rbees_typo_plugin\n")
    return tmp_path


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_broken_plugin_is_one_line_and_exit_1(program: str, broken_plugin_path: Path) -> None:
    env = {"PYTHONPATH": str(broken_plugin_path)}
    result = run(program, "plugins", env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"{program}: error: ")
    assert "rbees_register_backend" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    blocked = run(program, "plugins", env={**env, "RBEES_DISABLED_PLUGINS": "typo-plugin"})
    assert blocked.returncode == 0, blocked.stderr


def test_rbees_debug_shows_the_traceback(broken_plugin_path: Path) -> None:
    result = run("rbees", "plugins",
                 env={"PYTHONPATH": str(broken_plugin_path), "RBEES_DEBUG": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "PluginError" in result.stderr


def failing_app(pm: object) -> object:
    app = rbees_cli.create_app(plugins.make_manager(autoload=False))

    @app.command("explode")
    def explode() -> None:
        raise ConfigError("worker.slots: must be <= 64")

    return app


def test_an_error_inside_a_command(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEES_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli_common.run("rbees", failing_app, ["explode"])  # type: ignore[arg-type]
    assert exited.value.code == 1
    assert capsys.readouterr().err == "rbees: error: worker.slots: must be <= 64\n"
    monkeypatch.setenv("RBEES_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli_common.run("rbees", failing_app, ["explode"])  # type: ignore[arg-type]


def test_up_on_a_port_another_daemon_holds_says_so_in_one_line(tmp_path: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Healthy(BaseHTTPRequestHandler):  # answers /health 200, as another rbees-orcd does
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def log_message(self, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Healthy) as other:
        threading.Thread(target=other.serve_forever, daemon=True).start()
        port = other.server_address[1]
        result = run("rbees", "up", "--bind", f"127.0.0.1:{port}", "--timeout", "10",
                     env={"RBEES_HOME": str(tmp_path / "home")})
        other.shutdown()
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port} is taken" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "run" / "rbees-orcd.pid").exists()
