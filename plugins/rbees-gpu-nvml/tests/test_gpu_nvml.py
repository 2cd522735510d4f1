"""nvml: the real library where it loads, and recorded pynvml shapes replayed through a fake
``pynvml`` module (this machine has no NVIDIA GPU)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import attrs
import pluggy
import pynvml as real_pynvml
import pytest
from rbees_gpu_nvml import NvmlInventory

from rbees_core import plugins
from rbees_core.api.pool import GpuEntry
from rbees_core.pool import inventory

DATA = Path(__file__).parent / "data"
GPU_KEYS = {"index", "uuid", "name", "backend", "memory_total_bytes", "memory_free_bytes",
            "memory_reserved_bytes", "utilization", "temperature_c", "power_w"}


def fake_pynvml(devices: list[dict[str, Any]], *, init_error: int | None = None,
                lost: set[int] = frozenset()) -> types.ModuleType:  # type: ignore[assignment]
    """A ``pynvml`` stand-in: the real error and struct classes, replayed answers."""
    mod = types.ModuleType("pynvml")
    for name in dir(real_pynvml):
        if name.startswith(("NVMLError", "NVML_", "c_nvml")):
            setattr(mod, name, getattr(real_pynvml, name))
    mod.calls = []  # type: ignore[attr-defined]

    def answer(call: str, index: int, value: Any) -> Any:
        mod.calls.append(call)  # type: ignore[attr-defined]
        if index in lost:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_GPU_IS_LOST)
        if call in devices[index]["unsupported"]:
            raise real_pynvml.NVMLError(real_pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def text(index: int, value: str) -> str | bytes:
        return value.encode() if devices[index].get("as_bytes") else value

    def init() -> None:
        mod.calls.append("nvmlInit")  # type: ignore[attr-defined]
        if init_error is not None:
            raise real_pynvml.NVMLError(init_error)

    def memory(h: int) -> Any:
        m = devices[h]["memory"]
        return answer("nvmlDeviceGetMemoryInfo", h, real_pynvml.c_nvmlMemory_t(
            total=m["total"], free=m["free"], used=m["used"]))

    def utilization(h: int) -> Any:
        u = devices[h]["utilization"]
        return answer("nvmlDeviceGetUtilizationRates", h, real_pynvml.c_nvmlUtilization_t(
            gpu=u["gpu"], memory=u["memory"]))

    def temperature(h: int, sensor: int) -> int:
        assert sensor == real_pynvml.NVML_TEMPERATURE_GPU
        return int(answer("nvmlDeviceGetTemperature", h, devices[h]["temperature"]))

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: mod.calls.append("nvmlShutdown")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: answer(  # type: ignore[attr-defined]
        "nvmlDeviceGetName", h, text(h, devices[h]["name"]))
    mod.nvmlDeviceGetUUID = lambda h: answer(  # type: ignore[attr-defined]
        "nvmlDeviceGetUUID", h, text(h, devices[h]["uuid"]))
    mod.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUtilizationRates = utilization  # type: ignore[attr-defined]
    mod.nvmlDeviceGetTemperature = temperature  # type: ignore[attr-defined]
    mod.nvmlDeviceGetPowerUsage = lambda h: answer(  # type: ignore[attr-defined]
        "nvmlDeviceGetPowerUsage", h, devices[h]["power_mw"])
    return mod


@pytest.fixture
def recorded() -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = json.loads((DATA / "two_gpus.json").read_text())["devices"]
    return devices


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.gpu_inventories(rbees_pm)["nvml"] is NvmlInventory
    names = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert names["gpu-nvml"].version == "0.1.0"
    assert names["gpu-nvml"].hooks == ["rbees_register_gpu_inventories"]


def test_the_real_library_reports_what_this_host_has() -> None:
    try:
        real_pynvml.nvmlInit()
    except real_pynvml.NVMLError:
        assert NvmlInventory().collect() == []  # no driver here: no devices, no error
        return
    count = real_pynvml.nvmlDeviceGetCount()
    real_pynvml.nvmlShutdown()
    found = NvmlInventory().collect()
    assert len(found) == count
    assert all(set(attrs.asdict(gpu)) == GPU_KEYS and gpu.backend == "cuda" for gpu in found)


def test_recorded_gpus_become_contract_entries(monkeypatch: pytest.MonkeyPatch,
                                               recorded: list[dict[str, Any]]) -> None:
    fake = fake_pynvml(recorded)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    h100, rtx = NvmlInventory().collect()
    assert isinstance(h100, GpuEntry)
    # the wire JSON of the entry, key order included (CONTRACT section 4)
    assert json.dumps(attrs.asdict(h100)) == json.dumps({
        "index": 0, "uuid": "GPU-5f0c3a52-8d0e-7b43-9a1f-3c2e61b0d4a7",
        "name": "NVIDIA H100 80GB HBM3", "backend": "cuda",
        "memory_total_bytes": 85520809984, "memory_free_bytes": 84986691584,
        "memory_reserved_bytes": 0, "utilization": 0.37, "temperature_c": 41,
        "power_w": 118.7,
    })
    assert set(attrs.asdict(rtx)) == GPU_KEYS
    assert rtx.name == "NVIDIA GeForce RTX 3090"  # bytes from old bindings decoded
    assert rtx.uuid.startswith("GPU-0a1b2c3d")
    assert (rtx.temperature_c, rtx.power_w) == (None, None)  # NotSupported
    assert fake.calls[0] == "nvmlInit" and fake.calls[-1] == "nvmlShutdown"


@pytest.mark.parametrize("error", [real_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
                                   real_pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
                                   real_pynvml.NVML_ERROR_NO_PERMISSION])
def test_no_usable_nvml_means_no_devices(monkeypatch: pytest.MonkeyPatch,
                                         recorded: list[dict[str, Any]], error: int) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(recorded, init_error=error))
    assert NvmlInventory().collect() == []


def test_no_pynvml_module_means_no_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert NvmlInventory().collect() == []


def test_a_lost_gpu_does_not_hide_the_others(monkeypatch: pytest.MonkeyPatch,
                                             recorded: list[dict[str, Any]]) -> None:
    fake = fake_pynvml(recorded, lost={0})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    (only,) = NvmlInventory().collect()
    assert only.index == 1
    assert fake.calls[-1] == "nvmlShutdown"


def test_the_pool_inventory_lists_them_as_gpus(monkeypatch: pytest.MonkeyPatch,
                                               rbees_pm: pluggy.PluginManager,
                                               recorded: list[dict[str, Any]]) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(recorded))
    found = inventory.collect(rbees_pm)
    cuda = [g for g in found.gpus if g.backend == "cuda"]
    assert [g.index for g in cuda] == [0, 1]
    assert found.problems == []


def test_the_module_does_not_import_pynvml() -> None:
    import subprocess

    code = "import sys, rbees_gpu_nvml; print('pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


async def test_pool_managerd_exports_each_gpu_as_gauges(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rbees_pm: pluggy.PluginManager,
        recorded: list[dict[str, Any]], asgi_client: Any) -> None:
    """Issue 26 item 5: pool-managerd's ``/metrics`` reads the GPUs through the inventory
    probes at each scrape, labelled with the pool and the device; a board that reports no
    temperature or power has no sample of it rather than a made-up 0."""
    from prometheus_client.parser import text_string_to_metric_families

    from rbees_core.log import Logger
    from rbees_core.pool.daemon import PoolService, PoolSettings
    from rbees_core.programs.pool_managerd import create_app

    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(recorded))
    svc = PoolService(PoolSettings(pool_id="p1", host="127.0.0.1", port=9),
                      rbees_pm, Logger("pool-managerd"))
    async with asgi_client(create_app(svc)) as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 200
    samples = {(s.name, s.labels.get("device")): (s.value, s.labels)
               for family in text_string_to_metric_families(answer.text)
               for s in family.samples}
    h100 = {"pool": "p1", "device": "cuda:0", "name": "NVIDIA H100 80GB HBM3"}
    assert samples["rbees_gpu_utilization_ratio", "cuda:0"] == (0.37, h100)
    assert samples["rbees_gpu_memory_total_bytes", "cuda:0"][0] == 85520809984
    assert samples["rbees_gpu_memory_used_bytes", "cuda:0"][0] == 85520809984 - 84986691584
    assert samples["rbees_gpu_temperature_celsius", "cuda:0"][0] == 41
    assert samples["rbees_gpu_power_watts", "cuda:0"][0] == 118.7
    assert samples["rbees_gpu_utilization_ratio", "cuda:1"][0] == 0.0
    assert samples["rbees_gpu_memory_total_bytes", "cuda:1"][0] == 25769803776
    assert ("rbees_gpu_temperature_celsius", "cuda:1") not in samples  # NotSupported
    assert ("rbees_gpu_power_watts", "cuda:1") not in samples
    # the host's CPU and RAM from the cpu probe, and the process collectors
    assert samples["rbees_host_memory_total_bytes", None][0] > 0
    assert samples["rbees_host_cores", None][0] >= 1
    assert samples["process_resident_memory_bytes", None][0] > 0
