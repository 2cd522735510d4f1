"""metal: recorded system_profiler output, through the parser and through a stand-in
``system_profiler`` executable (this machine is not a Mac)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import attrs
import pluggy
import pytest
from rbees_gpu_metal import MetalInventory, parse_displays, parse_size, parse_vm_stat

from rbees_core import plugins
from rbees_core.api.pool import GpuEntry

DATA = Path(__file__).parent / "data"
GPU_KEYS = {"index", "uuid", "name", "backend", "memory_total_bytes", "memory_free_bytes",
            "memory_reserved_bytes", "utilization", "temperature_c", "power_w"}


def load(name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((DATA / name).read_text())
    return data


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.gpu_inventories(rbees_pm)["metal"] is MetalInventory
    names = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert names["gpu-metal"].version == "0.1.0"
    assert names["gpu-metal"].hooks == ["rbees_register_gpu_inventories"]


@pytest.mark.skipif(sys.platform == "darwin", reason="not a Mac")
def test_other_systems_have_no_metal_devices() -> None:
    assert MetalInventory().collect() == []


def test_apple_silicon_shares_the_system_memory() -> None:
    (gpu,) = parse_displays(load("m2max.json"), ram_total=64 * 2**30, ram_free=40 * 2**30)
    assert isinstance(gpu, GpuEntry) and set(attrs.asdict(gpu)) == GPU_KEYS
    assert gpu.name == "Apple M2 Max" and gpu.backend == "metal" and gpu.index == 0
    assert (gpu.memory_total_bytes, gpu.memory_free_bytes) == (64 * 2**30, 40 * 2**30)
    assert gpu.uuid == "metal-0-apple-m2-max" and gpu.device == "metal:0"


def test_an_intel_mac_lists_its_metal_gpus_only() -> None:
    igpu, radeon = parse_displays(load("imac_intel.json"), ram_total=32 * 2**30,
                                  ram_free=2**30)
    assert igpu.name == "Intel UHD Graphics 630"
    assert igpu.memory_total_bytes == 32 * 2**30  # shared memory
    assert radeon.name == "Radeon Pro 580X" and radeon.index == 1
    assert radeon.memory_total_bytes == radeon.memory_free_bytes == 8 * 2**30


def test_sizes_and_vm_stat() -> None:
    assert parse_size("8 GB") == 8 * 2**30
    assert parse_size("1536 MB") == 1536 * 2**20
    assert parse_size("lots") is None
    text = (DATA / "vm_stat.txt").read_text()
    assert parse_vm_stat(text) == (52818 + 811231 + 20554) * 16384


@pytest.fixture
def mac_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``system_profiler`` and ``vm_stat`` executables printing recorded output."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, fixture in (("system_profiler", "m2max.json"), ("vm_stat", "vm_stat.txt")):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\ncat '{DATA / fixture}'\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(sys, "platform", "darwin")
    return bin_dir


def test_on_macos_it_runs_system_profiler(mac_tools: Path) -> None:
    (gpu,) = MetalInventory().collect()
    assert gpu.name == "Apple M2 Max"
    assert gpu.memory_total_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert gpu.memory_free_bytes == (52818 + 811231 + 20554) * 16384


def test_a_failing_system_profiler_means_no_devices(mac_tools: Path) -> None:
    (mac_tools / "system_profiler").write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    assert MetalInventory().collect() == []
    (mac_tools / "system_profiler").write_text("#!/bin/sh\necho 'not json'\n")
    assert MetalInventory().collect() == []
