"""Tests of the echo backend, through rbees's public lookup and its real decode loop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pluggy
import pytest

pytest.importorskip("rbees_backend_echo", reason="install this distribution first")

from rbees_backend_echo import EchoBackend, EchoModel

from rbees_core import plugins
from rbees_core.backend import SamplingParams
from rbees_core.engine import Engine
from rbees_core.testing.backend import BackendContract


def test_found_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert rbees_pm.has_plugin("backend-echo")
    assert plugins.backends(rbees_pm)["echo"] is EchoBackend


def test_one_token_per_byte() -> None:
    model = EchoModel(slots=1, ctx=64)
    tokens = model.tokenize("aé😀")
    assert tokens == list("aé😀".encode())
    assert len(tokens) == 1 + 2 + 4
    assert b"".join(model.token_bytes(t) for t in tokens) == "aé😀".encode()


def generate(tmp_path: Path, pm: pluggy.PluginManager, prompt: str, **job: Any
             ) -> list[tuple[str, dict[str, Any]]]:
    model_file = tmp_path / "anything.bin"
    model_file.write_bytes(b"the echo backend does not read this")
    backend = plugins.backends(pm)["echo"]()
    model = backend.load(str(model_file), device="cpu", slots=1, ctx=None, threads=None,
                         progress=lambda stage, fraction: None)
    engine = Engine(model, slots=1, model_name="echo", worker_id="w-test")
    events: list[tuple[str, dict[str, Any]]] = []
    done = threading.Event()

    def sink(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))
        if event in ("end", "error"):
            done.set()

    engine.start()
    try:
        engine.submit(engine.prepare("j1", prompt, params=SamplingParams(),
                                     sink=sink, **{"max_tokens": 1000, "stop": [], **job}))
        assert done.wait(10)
    finally:
        engine.stop()
    return events


@pytest.mark.parametrize("prompt", ["hello", "é€😀", "naïve café ☕ 日本語"])
def test_echoes_the_prompt_in_whole_characters(
    tmp_path: Path, rbees_pm: pluggy.PluginManager, prompt: str
) -> None:
    events = generate(tmp_path, rbees_pm, prompt)
    pieces = [d["t"] for e, d in events if e == "token"]
    assert "".join(pieces) == prompt
    assert all("\ufffd" not in p for p in pieces)
    end = events[-1]
    assert end[0] == "end"
    assert end[1]["stop_reason"] == "eos"
    assert end[1]["tokens_out"] == len(prompt.encode())


def test_stop_string_and_max_tokens(tmp_path: Path, rbees_pm: pluggy.PluginManager) -> None:
    stopped = generate(tmp_path, rbees_pm, "one. two. three.", stop=["two"])
    assert "".join(d["t"] for e, d in stopped if e == "token") == "one. "
    assert stopped[-1][1]["stop_reason"] == "stop"
    cut = generate(tmp_path, rbees_pm, "abcdef", max_tokens=3)
    assert "".join(d["t"] for e, d in cut if e == "token") == "abc"
    assert cut[-1][1]["stop_reason"] == "max_tokens"


class TestEchoContract(BackendContract):
    """The backend contract suite every rbees backend passes, run by this outsider plugin
    as a third party would. The echo backend loads any existing file: this one."""

    backend_name = "echo"
    model_ref = __file__
