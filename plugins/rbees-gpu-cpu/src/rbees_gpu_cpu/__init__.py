"""rbees plugin: the host's CPU and RAM as a device inventory entry (``backend: "cpu"``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import GpuInventory

if TYPE_CHECKING:
    from rbees_core.api.pool import CpuEntry


def parse_meminfo(text: str) -> tuple[int, int] | None:
    """``(total, available)`` bytes from ``/proc/meminfo`` text; None if they are missing."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key.strip()] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    if "MemTotal" not in values:
        return None
    available = values.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = sum(values.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return values["MemTotal"], available


def parse_vm_stat(text: str) -> int | None:
    """Reclaimable bytes (free + inactive + speculative pages) from macOS ``vm_stat``."""
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
    wanted = ("Pages free", "Pages inactive", "Pages speculative")
    if not any(k in pages for k in wanted):
        return None
    return sum(pages.get(k, 0) for k in wanted) * page


def ram_bytes() -> tuple[int, int]:
    """``(total, available)`` RAM of this host."""
    try:
        parsed = parse_meminfo(Path("/proc/meminfo").read_text())
        if parsed:
            return parsed
    except OSError:
        pass
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    try:
        return total, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES
        pass
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
        free = parse_vm_stat(out)
    except (OSError, subprocess.SubprocessError):
        free = None
    return total, free if free is not None else 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "cpu"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class CpuInventory(GpuInventory):
    name: ClassVar[str] = "cpu"

    def collect(self) -> list[CpuEntry]:
        from rbees_core.api.pool import CpuEntry

        total, free = ram_bytes()
        return [CpuEntry(cores=usable_cores(), ram_total_bytes=total, ram_free_bytes=free,
                         name=cpu_name())]


@hookimpl
def rbees_register_gpu_inventories() -> list[type[GpuInventory]]:
    return [CpuInventory]
