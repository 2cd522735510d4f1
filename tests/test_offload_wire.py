"""A model larger than one GPU (issue 22, item 5), from the decision to the worker's flags:
rbees-orcd's start request carries ``n_gpu_layers``/``tensor_split``, pool-managerd's spawn
passes them as rbees-workerd ``--n-gpu-layers``/``--tensor-split``, and rbees-workerd hands
them to a backend that offloads. A real worker on the CPU with ``--n-gpu-layers 0`` is in
tests/test_orch_pool_control.py; llama.cpp's parameters in the llamacpp backend's tests."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from rbees_core.api.pool import CpuEntry, GpuEntry, PoolHeartbeat, WorkerStartRequest
from rbees_core.backend import Backend, LoadedModel, offload_args
from rbees_core.errors import BackendUnavailableError, InvalidParamsError
from rbees_core.log import Logger
from rbees_core.orchestrator.book import Book
from rbees_core.orchestrator.pool_control import PoolControl
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.planning import parse_shares
from rbees_core.pool import workers
from rbees_core.schema import from_mapping


async def test_the_start_request_carries_the_layers_and_the_split() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(409, json={"error": {"code": "INSUFFICIENT_VRAM",
                                                   "message": "no", "retriable": False}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        pools = PoolControl(Book(), PoolRegistry(), Logger("rbees-orcd"), client, token=None,
                            idle_timeout_s=300.0)
        gpus = [GpuEntry(index=i, uuid=f"GPU-{i}", name="gpu", backend="cuda",
                         memory_total_bytes=2 ** 34, memory_free_bytes=2 ** 34)
                for i in range(2)]
        pools.heartbeat(PoolHeartbeat(
            pool_id="p1", host="p1", gpus=gpus, models=[], workers=[], url="http://p1:7000",
            cpu=CpuEntry(cores=2, ram_total_bytes=2 ** 34, ram_free_bytes=2 ** 33), seq=1,
            sent_at=time.time()))
        pools.start_worker("p1", "cuda:0", "big", tensor_split=(0.667, 0.333))
        pools.start_worker("p1", "cuda:1", "other", n_gpu_layers=12)
        await asyncio.wait_for(asyncio.gather(*pools.book.tasks), 10)
    by_model = {b["model_ref"]: b for b in bodies}
    assert by_model["big"]["tensor_split"] == [0.667, 0.333]
    assert "n_gpu_layers" not in by_model["big"]  # unset fields are not sent (older pools)
    assert by_model["other"]["n_gpu_layers"] == 12 and "tensor_split" not in by_model["other"]
    # the pool reads them back as its request type, with their limits
    request = from_mapping(WorkerStartRequest, by_model["big"])
    assert request.tensor_split == [0.667, 0.333]
    with pytest.raises(InvalidParamsError):
        from_mapping(WorkerStartRequest, {**by_model["other"], "n_gpu_layers": -1})


def test_the_pools_spawn_passes_them_as_worker_flags(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RBEES_HOME", str(tmp_path))
    started: list[list[str]] = []

    class Proc:
        pid = 4_000_000

    def popen(argv: list[str], **_: Any) -> Proc:
        started.append(argv)
        return Proc()

    monkeypatch.setattr(subprocess, "Popen", popen)
    checked = workers.Preflight(path="/m/big.gguf", memory_bytes=1, memory_kind="vram",
                                free_bytes=None)
    for n, (layers, split) in enumerate(((None, (0.667, 0.333)), (12, None), (None, None))):
        req = workers.SpawnRequest(model_ref="big", device="cuda:0", worker_id=f"w{n}",
                                   n_gpu_layers=layers, tensor_split=split)
        workers.spawn_process(None, req, checked=checked, taken=set())  # type: ignore[arg-type]
    split, layers, neither = started
    assert split[split.index("--tensor-split") + 1] == "0.667,0.333"
    assert "--n-gpu-layers" not in split
    assert layers[layers.index("--n-gpu-layers") + 1] == "12"
    assert "--tensor-split" not in layers
    assert "--n-gpu-layers" not in neither and "--tensor-split" not in neither


class Offloading(Backend):
    name: ClassVar[str] = "offloading"
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    offloads: ClassVar[bool] = True

    def load(self, path: str, *, device: str, slots: int, ctx: int | None,
             threads: int | None, progress: Callable[[str, float], None],
             **offload: Any) -> LoadedModel:
        raise NotImplementedError


class Whole(Offloading):
    name: ClassVar[str] = "whole"
    offloads: ClassVar[bool] = False


def test_the_worker_hands_them_to_a_backend_that_offloads() -> None:
    assert offload_args(Offloading(), "cuda:0", 12, None) == \
        {"n_gpu_layers": 12, "tensor_split": None}
    assert offload_args(Offloading(), "cuda:0", None, [0.5, 0.5]) == \
        {"n_gpu_layers": None, "tensor_split": (0.5, 0.5)}
    assert offload_args(Whole(), "cuda:0", None, None) == {}  # nothing asked: any backend
    with pytest.raises(BackendUnavailableError, match="llamacpp can"):
        offload_args(Whole(), "cuda:0", 12, None)
    # on the CPU no layer is on a GPU: 0 is accepted (and passed to no backend), more not
    assert offload_args(Whole(), "cpu", 0, None) == {}
    with pytest.raises(InvalidParamsError, match="--tensor-split"):
        offload_args(Offloading(), "cpu", None, [0.5, 0.5])


def test_tensor_split_flag() -> None:
    assert parse_shares("0.667,0.333") == (0.667, 0.333)
    assert parse_shares("0,1,1") == (0.0, 1.0, 1.0)
    for bad in ("", "a,b", "-1,2", "0,0", ",".join(["1"] * 17), "nan,1"):
        with pytest.raises(InvalidParamsError, match="--tensor-split"):
            parse_shares(bad)


async def test_a_pool_reached_by_command_gets_them_as_rbees_pool_flags() -> None:
    """``rbees jobs submit`` without a daemon starts workers with ``rbees-pool worker
    spawn`` on the host (over ssh): the same two fields, as its flags."""
    from types import SimpleNamespace

    from rbees_core.pool_client.command import CommandPoolClient

    seen: list[list[str]] = []

    async def run(argv: list[str], **_: Any) -> Any:
        seen.append(list(argv))
        return SimpleNamespace(exit_code=1, stdout="", stderr="rbees-pool: error: no\n")

    client = CommandPoolClient(run, name="h1")
    request = WorkerStartRequest(model_ref="big", device="cuda:0", n_gpu_layers=12,
                                 tensor_split=[0.667, 0.333])
    with pytest.raises(Exception, match="no"):
        await client.worker_start(request)
    (argv,) = seen
    assert argv[argv.index("--n-gpu-layers") + 1] == "12"
    assert argv[argv.index("--tensor-split") + 1] == "0.667,0.333"
    assert argv[-2:] == ["--", "cuda"] and argv[argv.index("--device") + 1] == "0"
    # and rbees-pool worker spawn takes them
    done = subprocess.run([str(Path(sys.executable).with_name("rbees-pool")),
                           "worker", "spawn", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert "--n-gpu-layers" in done.stdout and "--tensor-split" in done.stdout


def test_the_pools_preflight_checks_each_device_its_part(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """A 40-layer model of ~20 GiB on a 12 + 12 GiB host with 16 GiB of RAM: whole on one
    GPU it is refused; split 0.5/0.5 it fits (each GPU its half); 20 layers on cuda:0 with
    the rest in RAM fits; 20 layers with the rest in 4 GiB of RAM is refused on the CPU's
    part. The same figures as the planner's (planning.device_bytes)."""
    from rbees_core import plugins
    from rbees_core.backend import MemoryEstimate
    from rbees_core.pool import memory

    monkeypatch.setenv("RBEES_HOME", str(tmp_path))
    gib = 2**30
    estimate = MemoryEstimate(weights_bytes=19 * gib, kv_cache_bytes=gib // 2, layers=40,
                              layer_weights_bytes=19 * gib // 40 - 2**20,
                              layer_kv_bytes=gib // 80)
    ram = [16 * gib]
    free = {"cuda:0": 12 * gib, "cuda:1": 12 * gib}

    class Probe:
        @staticmethod
        def available_devices() -> list[str]:
            return ["cpu", "cuda"]

    monkeypatch.setattr(workers, "resolve_model", lambda pm, ref: "/m/big.gguf")
    monkeypatch.setattr(plugins, "lookup", lambda pm, kind, name: Probe())
    monkeypatch.setattr(workers, "estimate_memory", lambda pm, req, path, est=None: estimate)
    monkeypatch.setattr(memory, "device_memory", lambda pm, device: (
        (ram[0], ram[0], "ram") if device == "cpu" else (free[device], free[device], "vram")))
    pm = plugins.make_manager(plugins.builtin_plugins())

    def check(**flags: Any) -> workers.Preflight:
        return workers.preflight(pm, workers.SpawnRequest(model_ref="big", device="cuda:0",
                                                          **flags), limit=None)

    with pytest.raises(memory.InsufficientVramError):
        check()
    assert check(tensor_split=(0.5, 0.5)).memory_bytes == estimate.total_bytes
    assert check(n_gpu_layers=20).path == "/m/big.gguf"
    ram[0] = 4 * gib
    with pytest.raises(memory.InsufficientMemoryError) as refused:
        check(n_gpu_layers=20)
    assert refused.value.details["device"] == "cpu"
