"""cpu: the real probe on this host, and the parsers on recorded text."""

from __future__ import annotations

import os
from pathlib import Path

import pluggy
from rbees_gpu_cpu import CpuInventory, parse_meminfo, parse_vm_stat

from rbees_core import plugins
from rbees_core.api.pool import CpuEntry
from rbees_core.pool import inventory

DATA = Path(__file__).parent / "data"
MEMINFO = """MemTotal:       24684092 kB
MemFree:        20230868 kB
MemAvailable:   23903912 kB
Buffers:          191624 kB
Cached:          3547092 kB
SwapCached:            0 kB
HugePages_Total:       0
"""
OLD_KERNEL = """MemTotal:        1018256 kB
MemFree:          301212 kB
Buffers:           51312 kB
Cached:           402104 kB
"""


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.gpu_inventories(rbees_pm)["cpu"] is CpuInventory
    names = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert names["gpu-cpu"].version == "0.1.0"
    assert names["gpu-cpu"].hooks == ["rbees_register_gpu_inventories"]


def test_the_real_host() -> None:
    (entry,) = CpuInventory().collect()
    assert isinstance(entry, CpuEntry) and entry.name and entry.ram_reserved_bytes == 0
    assert entry.cores == len(os.sched_getaffinity(0))
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(entry.ram_total_bytes - total) < 0.05 * total
    assert 0 < entry.ram_free_bytes <= entry.ram_total_bytes


def test_meminfo() -> None:
    assert parse_meminfo(MEMINFO) == (24684092 * 1024, 23903912 * 1024)
    assert parse_meminfo(OLD_KERNEL) == (1018256 * 1024, (301212 + 51312 + 402104) * 1024)
    assert parse_meminfo("garbage") is None


def test_vm_stat_of_macos() -> None:
    text = (DATA / "vm_stat.txt").read_text()
    assert parse_vm_stat(text) == (52818 + 811231 + 20554) * 16384
    assert parse_vm_stat("") is None


def test_the_pool_inventory_reports_it_as_the_cpu(rbees_pm: pluggy.PluginManager) -> None:
    found = inventory.collect(rbees_pm)
    assert isinstance(found.cpu, CpuEntry)
    assert set(found.to_dict()["cpu"]) == {"name", "cores", "ram_total_bytes", "ram_free_bytes"}
    assert all(g.backend != "cpu" for g in found.gpus)
