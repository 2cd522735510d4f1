"""The worker preflight asks the worker's backend how much memory its model will hold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pluggy
import pytest

from rbees_core.backend import OVERHEAD_BYTES, Backend, LoadedModel, MemoryEstimate
from rbees_core.hookspecs import hookimpl
from rbees_core.pool.memory import InsufficientMemoryError
from rbees_core.pool.workers import SpawnRequest, preflight

Register = Callable[..., object]


class _Backend(Backend):
    def load(self, path: str, *, device: str, slots: int, ctx: int | None,
             threads: int | None, progress: Callable[[str, float], None]) -> LoadedModel:
        raise NotImplementedError


class Sized(_Backend):
    """Predicts weights of 1 KiB and ``per_token`` bytes of cache per token of every slot
    (1024 tokens unless ``ctx`` says)."""

    name: ClassVar[str] = "sized"
    per_token: ClassVar[int] = 1024
    asked: ClassVar[list[dict[str, Any]]] = []

    def estimate_memory(self, path: str, *, device: str, slots: int, ctx: int | None
                        ) -> MemoryEstimate | None:
        type(self).asked.append({"path": path, "device": device, "slots": slots, "ctx": ctx})
        return MemoryEstimate(weights_bytes=1024, overhead_bytes=0,
                              kv_cache_bytes=slots * (ctx or 1024) * self.per_token)


class Silent(_Backend):
    """Has no estimate: the pool counts the size on disk."""

    name: ClassVar[str] = "silent"


class Backends:
    @hookimpl
    def rbees_register_backends(self) -> list[type[Backend]]:
        return [Sized, Silent]


@pytest.fixture
def model(tmp_path: Path, rbees_register: Register, monkeypatch: pytest.MonkeyPatch) -> str:
    rbees_register(Backends(), name="test-backends")
    monkeypatch.setenv("RBEES_SOURCES_FILE_ROOTS", str(tmp_path))  # a pool serves files there
    path = tmp_path / "m.bin"
    path.write_bytes(b"x" * 5000)
    return str(path)


def test_the_backend_s_estimate_is_what_the_preflight_checks(
        model: str, rbees_pm: pluggy.PluginManager, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Sized, "asked", [])
    checked = preflight(rbees_pm, SpawnRequest(model_ref=model, backend="sized", slots=2))
    assert Sized.asked == [{"path": model, "device": "cpu", "slots": 2, "ctx": None}]
    assert checked.memory_bytes == 1024 + 2 * 1024 * 1024 and checked.memory_kind == "ram"
    monkeypatch.setattr(Sized, "per_token", 2**40)  # a petabyte per token fits nowhere
    with pytest.raises(InsufficientMemoryError) as caught:
        preflight(rbees_pm, SpawnRequest(model_ref=model, backend="sized", slots=4, ctx=64))
    assert caught.value.details["needed_bytes"] == 1024 + 4 * 64 * 2**40


def test_without_an_estimate_the_size_on_disk_counts(
        model: str, rbees_pm: pluggy.PluginManager) -> None:
    checked = preflight(rbees_pm, SpawnRequest(model_ref=model, backend="silent"))
    assert checked.memory_bytes == 5000 + OVERHEAD_BYTES
