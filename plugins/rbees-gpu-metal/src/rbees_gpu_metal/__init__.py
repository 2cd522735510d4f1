"""rbees plugin: Apple GPUs (Metal) on macOS, from ``system_profiler SPDisplaysDataType -json``.

On other systems the probe reports no devices without running anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import GpuInventory

if TYPE_CHECKING:
    from rbees_core.api.pool import GpuEntry

PROFILER = ["system_profiler", "SPDisplaysDataType", "-json"]
_UNITS = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_size(text: str) -> int | None:
    """``"8 GB"`` / ``"1536 MB"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", text or "")
    return int(float(match[1]) * _UNITS[match[2]]) if match else None


def supports_metal(gpu: Mapping[str, Any]) -> bool:
    family = str(gpu.get("spdisplays_mtlgpufamilysupport", ""))
    legacy = str(gpu.get("spdisplays_metal", gpu.get("spdisplays_metalfamily", "")))
    return family.startswith("spdisplays_metal") or legacy in (
        "spdisplays_supported", "spdisplays_metalfeaturesetfamily") or legacy.startswith(
        "spdisplays_metal")


def parse_displays(data: Mapping[str, Any], *, ram_total: int, ram_free: int
                   ) -> list[GpuEntry]:
    """GPU entries (CONTRACT section 4) from system_profiler's JSON.

    ``ram_total``/``ram_free`` stand for the memory of GPUs that share the system memory
    (Apple Silicon, integrated Intel graphics).
    """
    from rbees_core.api.pool import GpuEntry

    entries: list[GpuEntry] = []
    for gpu in data.get("SPDisplaysDataType", []):
        if not isinstance(gpu, Mapping) or not supports_metal(gpu):
            continue
        vram = parse_size(str(gpu.get("spdisplays_vram", gpu.get("sppci_vram", ""))))
        total, free = (vram, vram) if vram else (ram_total, ram_free)
        index = len(entries)
        name = str(gpu.get("sppci_model") or gpu.get("_name") or "Apple GPU")
        entries.append(GpuEntry(
            index=index,
            uuid=f"metal-{index}-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}",
            name=name,
            backend="metal",
            memory_total_bytes=total,
            memory_free_bytes=free,
            memory_reserved_bytes=0,
            utilization=0.0,
            temperature_c=None,
            power_w=None,
        ))
    return entries


def parse_vm_stat(text: str) -> int | None:
    """Reclaimable bytes (free + inactive + speculative pages) from ``vm_stat`` output."""
    lines = text.splitlines()
    if not lines or "page size of" not in lines[0]:
        return None
    page = int(lines[0].split("page size of")[1].split()[0])
    pages: dict[str, int] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        value = value.strip().rstrip(".")
        if value.isdigit():
            pages[key.strip()] = int(value)
    return page * sum(pages.get(k, 0) for k in
                      ("Pages free", "Pages inactive", "Pages speculative"))


def system_ram() -> tuple[int, int]:
    """``(total, reclaimable)`` bytes on macOS (``sysconf`` and ``vm_stat``)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
        free = parse_vm_stat(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        free = None
    return total, free or 0


class MetalInventory(GpuInventory):
    name: ClassVar[str] = "metal"

    def collect(self) -> list[GpuEntry]:
        if sys.platform != "darwin":
            return []
        try:
            out = subprocess.run(PROFILER, capture_output=True, check=True, timeout=30).stdout
            data = json.loads(out)
        except (OSError, subprocess.SubprocessError, ValueError):
            return []
        ram_total, ram_free = system_ram()
        return list(parse_displays(data, ram_total=ram_total, ram_free=ram_free))


@hookimpl
def rbees_register_gpu_inventories() -> list[type[GpuInventory]]:
    return [MetalInventory]
