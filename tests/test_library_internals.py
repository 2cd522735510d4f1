"""The private parts of typer and uvicorn that rbees relies on, checked against the pins.

Two modules use what these libraries do not document, so pyproject.toml pins both to the exact
versions they were written against:

- :mod:`rbees_core.programs.cli_coercion` gives typer's parameters a coercion of their own
  (typer's imports pydantic: about 110 ms of the 250 ms that ``rbees-pool models list``
  takes), through ``typer._coercion``, ``typer._param_types`` and ``typer.core._TyperParameter``.
- :func:`rbees_core.http.serve` subclasses ``uvicorn.Server``: ``capture_signals`` (the
  daemon owns its signals), ``startup`` (a failed lifespan start-up is raised by
  ``serve``, not a ``SystemExit`` out of the event loop) and ``main_loop`` (one tick a
  second through ``on_tick``, not ten).

The hf source's resumable download (``rbees_source_hf._fetch.fetch``) calls
``huggingface_hub.file_download.http_get`` and ``huggingface_hub.utils.build_hf_headers``;
its pyproject.toml caps huggingface_hub below the next minor release for that.

The llama.cpp backend's grammar sampling (``rbees_backend_llamacpp.grammar`` and
``LlamaCppModel._sample_constrained``) relies on ``llama_cpp.llama_grammar.json_schema_to_gbnf``
(not part of llama-cpp-python's documented API) and on the ctypes layout of
``llama_token_data``; its pyproject.toml pins llama-cpp-python exactly for that.

When a test here fails, the library changed under rbees: read the failure, adapt the module
named in it to the new version (or drop the use), then move the pin.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def pinned(distribution: str, pyproject: str = "pyproject.toml") -> str:
    """The exact version ``pyproject`` (the root's by default) pins ``distribution`` to."""
    dependencies = tomllib.loads((ROOT / pyproject).read_text())["project"][
        "dependencies"]
    for requirement in dependencies:
        match = re.fullmatch(rf"{distribution}==([^;\s]+)", requirement.strip())
        if match:
            return match.group(1)
    raise AssertionError(f"pyproject.toml must pin {distribution} exactly ({distribution}==X): "
                         "rbees uses its internals")


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize("distribution", ["typer", "uvicorn"])
def test_the_installed_version_is_the_pinned_one(distribution: str) -> None:
    installed = importlib.metadata.version(distribution)
    assert installed == pinned(distribution), (
        f"{distribution} {installed} is installed but pyproject.toml pins "
        f"{pinned(distribution)}: rbees uses its internals (see this test's module); check "
        "them against the new version before moving the pin")


LLAMACPP_PYPROJECT = "backends/rbees-backend-llamacpp/pyproject.toml"


def test_llama_cpp_python_is_the_pinned_one() -> None:
    installed = importlib.metadata.version("llama-cpp-python")
    assert installed == pinned("llama-cpp-python", LLAMACPP_PYPROJECT), (
        f"llama-cpp-python {installed} is installed but {LLAMACPP_PYPROJECT} pins another: "
        "the grammar sampling uses its internals (see this module); check them first")


def test_llama_cpp_internals_used_by_grammar_sampling() -> None:
    import ctypes

    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    where = "rbees_backend_llamacpp (grammar.py, LlamaCppModel._sample_constrained) relies on"
    gbnf = json_schema_to_gbnf('{"type": "object", "properties": {"a": {"const": "m"}}, '
                               '"required": ["a"]}')
    assert 'a ::= "\\"m\\""' in gbnf, f"{where} a const string being the literal rule {gbnf}"
    assert "root ::=" in gbnf, f"{where} the converter's root rule being called root"
    assert [name for name, _ in llama_cpp.llama_token_data._fields_] == ["id", "logit", "p"]
    assert [t for _, t in llama_cpp.llama_token_data._fields_] == [
        ctypes.c_int32, ctypes.c_float, ctypes.c_float], f"{where} llama_token_data's layout"
    assert [name for name, _ in llama_cpp.llama_token_data_array._fields_] == [
        "data", "size", "selected", "sorted"], f"{where} llama_token_data_array's fields"
    for name in ("llama_sampler_init_grammar", "llama_sampler_apply", "llama_sampler_accept",
                 "llama_get_logits_ith", "llama_vocab_n_tokens"):
        assert hasattr(llama_cpp, name), f"{where} {name}"
    assert len(llama_cpp.llama_sampler_init_grammar.argtypes) == 3, (
        f"{where} llama_sampler_init_grammar(vocab, grammar, root)")


def test_typer_internals_used_by_cli_coercion() -> None:
    from rbees_core.programs import cli_coercion

    where = "rbees_core/programs/cli_coercion.py relies on"
    assert cli_coercion.SUPPORTED, (
        f"{where} typer._coercion, typer._param_types and typer.core._TyperParameter; this "
        "typer lacks one of them, so every command now imports pydantic again")
    from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
    from typer._param_types import coerce_cli_choice
    from typer.core import TyperCommand, TyperGroup, _TyperParameter
    from typer.models import ParameterInfo

    assert dataclasses.is_dataclass(RuntimeParam), f"{where} RuntimeParam being a dataclass"
    assert [f.name for f in dataclasses.fields(RuntimeParam)] == [
        "parameter_info", "annotation"], f"{where} RuntimeParam(parameter_info, annotation)"
    assert parameters(RuntimeParam._coerce_value) == ["self", "value", "param", "ctx"], (
        f"{where} RuntimeParam._coerce_value(value, param, ctx)")
    assert "_coerce_value" in inspect.getsource(RuntimeParam.coerce), (
        f"{where} RuntimeParam.coerce passing values other than None to _coerce_value")
    assert parameters(build_runtime_param) == ["descriptor"], (
        f"{where} build_runtime_param(descriptor)")
    assert parameters(coerce_cli_choice) == ["value", "choices", "case_sensitive", "ctx"], (
        f"{where} coerce_cli_choice(value, *, choices, case_sensitive, ctx)")
    for name in ("annotation", "parameter_info", "is_file", "is_list", "is_choice", "choices",
                 "case_sensitive"):
        assert hasattr(TypeDescriptor, name) or name in {
            f.name for f in dataclasses.fields(TypeDescriptor)}, f"{where} TypeDescriptor.{name}"
    info = inspect.signature(ParameterInfo.__init__).parameters
    for name in ("parser", "clamp", "min", "max"):
        assert name in info, f"{where} ParameterInfo.{name}"
    annotations = inspect.get_annotations(_TyperParameter)
    for name in ("_runtime_param", "type_descriptor"):
        assert name in annotations, f"{where} _TyperParameter.{name}"
    assert "self._runtime_param" in inspect.getsource(_TyperParameter.get_runtime_param), (
        f"{where} _TyperParameter taking its coercion from _runtime_param")
    for command in (TyperCommand, TyperGroup):
        assert parameters(command.get_help_option) == ["self", "ctx"], (
            f"{where} {command.__name__}.get_help_option(ctx) making the help option")
    assert isinstance(TyperGroup(name="t").commands, dict), f"{where} TyperGroup.commands"


def test_uvicorn_internals_used_by_serve() -> None:
    import uvicorn

    where = "rbees_core/http/server.py (_server_class, serve) relies on"
    server = uvicorn.Server
    assert parameters(server.startup) == ["self", "sockets"], f"{where} Server.startup(sockets)"
    assert "sys.exit" in inspect.getsource(server.startup), (
        f"{where} Server.startup ending a failed lifespan start-up with SystemExit")
    assert "self.capture_signals()" in inspect.getsource(server.serve), (
        f"{where} Server.serve installing its signal handlers through capture_signals()")
    assert parameters(server.capture_signals) == ["self"], f"{where} Server.capture_signals()"
    assert parameters(server.serve) == ["self", "sockets"], f"{where} Server.serve(sockets)"
    assert "self.main_loop()" in inspect.getsource(server._serve), (
        f"{where} Server._serve running main_loop() once started")
    assert parameters(server.main_loop) == ["self"], f"{where} Server.main_loop()"
    assert parameters(server.on_tick) == ["self", "counter"], f"{where} Server.on_tick(counter)"
    tick = inspect.getsource(server.on_tick)
    assert "counter % 10 == 0" in tick and "default_headers" in tick, (
        f"{where} Server.on_tick refreshing the Date header when counter % 10 == 0")
    made = server(uvicorn.Config(app="rbees_core.http:build_app"))
    for name in ("should_exit", "started"):
        assert hasattr(made, name), f"{where} Server.{name}"


async def test_serve_leaves_the_daemons_signal_handlers_alone() -> None:
    """The override of ``capture_signals`` works: serving changes no signal handler."""
    import asyncio

    from rbees_core.http import serve
    from rbees_core.testing import find_free_port

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    shutdown = asyncio.Event()
    serving = asyncio.create_task(serve(app, "127.0.0.1", find_free_port(), shutdown))
    for _ in range(100):
        await asyncio.sleep(0.01)
        assert {s: signal.getsignal(s) for s in before} == before
    shutdown.set()
    await asyncio.wait_for(serving, 10)


async def test_an_idle_server_ticks_once_a_second_and_exits_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The override of ``main_loop``: uvicorn's own woke every idle daemon ten times a
    second; this one ticks once a second, still sends the Date header, and ends as soon as
    ``shutdown`` is set, not at its next tick."""
    import asyncio
    import time

    import httpx
    import uvicorn

    from rbees_core.http import serve
    from rbees_core.testing import find_free_port

    ticks: list[int] = []
    on_tick = uvicorn.Server.on_tick

    async def counted(self: uvicorn.Server, counter: int) -> bool:
        ticks.append(counter)
        return await on_tick(self, counter)

    monkeypatch.setattr(uvicorn.Server, "on_tick", counted)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = find_free_port()
    shutdown = asyncio.Event()
    serving = asyncio.create_task(serve(app, "127.0.0.1", port, shutdown))
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            await asyncio.sleep(0.02)
            if ticks:
                break
        await asyncio.sleep(2.5)
        answer = await client.get(f"http://127.0.0.1:{port}/")
    assert answer.status_code == 204 and answer.headers["date"].endswith(" GMT")
    assert 2 <= len(ticks) <= 5, ticks  # 0, 10, 20 (and 30): uvicorn's loop made 26 here
    assert all(t % 10 == 0 for t in ticks), ticks
    started = time.monotonic()
    shutdown.set()
    await asyncio.wait_for(serving, 10)
    assert time.monotonic() - started < 0.5


HF_PYPROJECT = "plugins/rbees-source-hf/pyproject.toml"


def test_huggingface_hub_internals_used_by_the_hf_source() -> None:
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]
    from packaging.requirements import Requirement

    where = "rbees_source_hf._fetch.fetch relies on"
    signature = inspect.signature(http_get).parameters
    assert list(signature)[:2] == ["url", "temp_file"], f"{where} http_get(url, temp_file, ...)"
    for name in ("resume_size", "headers", "expected_size", "displayed_filename", "tqdm_class"):
        assert name in signature, f"{where} http_get(..., {name}=)"
    assert isinstance(build_hf_headers(token=False), dict), f"{where} build_hf_headers()"
    requirement = next(
        Requirement(r) for r in tomllib.loads((ROOT / HF_PYPROJECT).read_text())["project"][
            "dependencies"] if r.startswith("huggingface_hub"))
    assert any(spec.operator == "<" for spec in requirement.specifier), (
        f"{HF_PYPROJECT} must cap huggingface_hub: the hf source uses its internals")
    assert requirement.specifier.contains(importlib.metadata.version("huggingface_hub")), (
        f"huggingface_hub {importlib.metadata.version('huggingface_hub')} is installed but "
        f"{HF_PYPROJECT} asks for {requirement.specifier}: check the internals, then move it")
