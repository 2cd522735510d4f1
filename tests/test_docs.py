"""docs/: the hook reference is generated from the hookspecs as they are, the worked examples
of docs/plugins.md work with this kernel, and every "CONTRACT section N" the code cites is a
section of docs/contract.md."""

from __future__ import annotations

import importlib.util
import json
import re
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from typer.testing import CliRunner

from rbees_core import plugins
from rbees_core.api.pool import GpuEntry
from rbees_core.backend import Feed, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_MD = ROOT / "docs" / "plugins.md"
CONTRACT_MD = ROOT / "docs" / "contract.md"


def generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_plugin_docs",
                                                  ROOT / "scripts" / "gen_plugin_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_hook_reference_is_up_to_date() -> None:
    page = PLUGINS_MD.read_text(encoding="utf-8")
    assert generator().updated(page) == page, (
        "docs/plugins.md is stale: run python scripts/gen_plugin_docs.py")


def test_every_hook_has_a_worked_example() -> None:
    hooks = {name for name, _, _ in generator().hookspecs()}
    examples = "\n".join(EXAMPLES.values())
    missing = {h for h in hooks if not re.search(rf"^def {h}\(", examples, re.MULTILINE)}
    assert not missing, f"docs/plugins.md has no worked example of {sorted(missing)}"


def test_every_cited_contract_section_exists() -> None:
    sections = set(re.findall(r"^## (\d+)\. ", CONTRACT_MD.read_text(), re.MULTILINE))
    assert sections == {str(n) for n in range(7)}
    cited: dict[str, set[str]] = {}
    dists = ("plugins", "backends", "schedulers", "examples")
    sources = [*ROOT.glob("rbees_core/**/*.py"), ROOT / "README.md",
               *(p for d in dists for p in ROOT.glob(f"{d}/*/src/**/*.py")),
               *(p for d in dists for p in ROOT.glob(f"{d}/*/README.md"))]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"CONTRACT\]?(?:\([^)]*\))? sections? (\d+)(?:[-, and]+(\d+))?",
                                 text):
            for number in filter(None, match.groups()):
                cited.setdefault(number, set()).add(str(path.relative_to(ROOT)))
    assert {"1", "3", "4", "5"} <= set(cited), f"citations found: {cited}"
    unknown = {n: sorted(paths) for n, paths in cited.items() if n not in sections}
    assert not unknown, f"citations of sections docs/contract.md lacks: {unknown}"


# -- the worked examples ----------------------------------------------------------------------

EXAMPLES: dict[str, str] = dict(re.findall(
    r"```python\n# example: ([^\n]+)\n(.*?)```", PLUGINS_MD.read_text(encoding="utf-8"),
    re.DOTALL))


def example(kind: str) -> types.ModuleType:
    """The example of ``kind`` as a module of its own."""
    module = types.ModuleType(f"docs_example_{kind.replace(' ', '_')}")
    exec(compile(EXAMPLES[kind], f"docs/plugins.md ({kind})", "exec"), module.__dict__)
    return module


def registered(module: types.ModuleType, hook: str) -> dict[str, Any]:
    pm = plugins.make_manager([("docs-example", module)], autoload=False)
    classes = [cls for batch in getattr(pm.hook, hook)() for cls in batch]
    return {cls.name: cls for cls in classes}


def test_the_page_has_the_examples_the_tests_run() -> None:
    assert set(EXAMPLES) == {"backend", "model source", "transport", "GPU inventory",
                             "scheduler", "commands and routes"}


def test_backend_example(tmp_path: Path) -> None:
    backend = registered(example("backend"), "rbees_register_backends")["reverse"]()
    (tmp_path / "m.bin").write_bytes(b"")
    seen: list[tuple[str, float]] = []
    model = backend.load(str(tmp_path / "m.bin"), device="cpu", slots=1, ctx=None,
                         threads=None, progress=lambda stage, f: seen.append((stage, f)))
    assert seen == [("load", 1.0)]
    model.begin(0, SamplingParams())
    model.decode([Feed(0, model.tokenize("bées"), logits=True)])
    out = b""
    while not model.is_eog(token := model.sample(0)):
        out += model.token_bytes(token)
        model.decode([Feed(0, [token], logits=True)])
    model.end(0)
    assert out.decode() == "seéb"  # by characters: é stays whole


def test_model_source_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rbees_core.errors import InvalidParamsError

    source = registered(example("model source"), "rbees_register_model_sources")["share"]
    monkeypatch.setenv("SHARE_MODELS", str(tmp_path))
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    assert source().resolve("tiny") == str(tmp_path / "tiny.gguf")
    assert source().resolve("other") is None
    source.validate_ref("tiny")
    with pytest.raises(InvalidParamsError):
        source.validate_ref("../tiny")


async def test_transport_example(tmp_path: Path) -> None:
    from rbees_core.hosts import HostConfig

    transport = registered(example("transport"), "rbees_register_transports")["docker"]
    docker = tmp_path / "docker"
    docker.write_text('#!/bin/sh\nshift 2\necho "$@"\necho warm >&2\nexit 3\n')
    docker.chmod(0o755)
    transport.docker = str(docker)
    lines: list[str] = []
    async with transport(HostConfig(name="box", transport="docker")) as opened:
        result = await opened.run(["models", "list"], on_line=lines.append)
    assert (result.exit_code, result.stdout, result.stderr) == (
        3, "rbees-pool models list\n", "warm\n")
    assert lines == ["rbees-pool models list"]


def test_gpu_inventory_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inventory = registered(example("GPU inventory"), "rbees_register_gpu_inventories")["static"]
    monkeypatch.setenv("STATIC_GPUS", str(tmp_path / "gpus.json"))
    assert inventory().collect() == []
    (tmp_path / "gpus.json").write_text(json.dumps(
        [{"uuid": "GPU-1", "name": "Card", "memory_bytes": 8 << 30}]))
    [entry] = inventory().collect()
    assert isinstance(entry, GpuEntry) and entry.device == "cuda:0"
    assert entry.memory_free_bytes - entry.memory_reserved_bytes == 8 << 30


def test_scheduler_example() -> None:
    from rbees_core.scheduling import Snapshot

    scheduler = registered(example("scheduler"), "rbees_register_schedulers")["first-fit"]()

    def worker(worker_id: str, model: str, free: int) -> dict[str, Any]:
        return {"worker_id": worker_id, "model_ref": model, "device": "cpu",
                "state": "ready", "slots_total": 1, "slots_free": free, "uri": "http://w"}

    def snapshot(*workers: dict[str, Any]) -> Snapshot:
        return Snapshot({"now": 0.0, "queue": [], "throughput": {},
                         "job": {"job_id": "j", "model": "smollm2", "priority": "interactive",
                                 "waited_s": 0.0, "retry_count": 0, "placement": None},
                         "pools": [{"pool_id": "p", "status": "ready", "devices": [],
                                    "models": ["smollm2"], "workers": list(workers)}]})

    verdict = scheduler.decide(snapshot(worker("a", "other", 1), worker("b", "smollm2", 0),
                                        worker("c", "smollm2", 1)))
    assert [d.to_dict() for d in verdict.decisions] == [
        {"action": "dispatch", "pool_id": "p", "worker_id": "c"}]
    assert [c.rejected for c in verdict.candidates] == [
        "holds another model", "has no free slot", None]
    waiting = scheduler.decide(snapshot(worker("b", "smollm2", 0)))
    assert waiting.decisions[0].action == "wait"


async def test_commands_and_routes_example() -> None:
    from rbees_core.programs import pool_cli

    module = example("commands and routes")
    pm = plugins.make_manager([*plugins.builtin_plugins(), *pool_cli.builtin_plugins(),
                               ("docs-example", module)], autoload=False)
    result = CliRunner().invoke(pool_cli.create_app(pm), ["hello", "--name", "you"],
                                prog_name="rbees-pool")
    assert (result.exit_code, result.stdout) == (0, "hello you\n")

    routes = [r for batch in pm.hook.rbees_register_routes(program="pool-managerd")
              for r in batch]
    transport = httpx.ASGITransport(app=Starlette(routes=routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://pool") as client:
        assert (await client.get("/x/hello")).json() == {"hello": "pool-managerd"}
    assert pm.hook.rbees_register_routes(program="rbees-orcd") == [[]]

    pm.hook.rbees_startup(program="pool-managerd", state=None)
    assert module.STARTED == ["pool-managerd"]
    pm.hook.rbees_shutdown(program="pool-managerd", state=None)
    assert module.STARTED == []
