"""The devices of this host, from every installed GPU inventory probe (cpu, nvml, metal).

Shared by ``rbees-pool status`` and pool-managerd's ``/v2/state``. A probe that raises
(it should not: see :class:`rbees_core.interfaces.GpuInventory`) or returns something other
than :class:`~rbees_core.api.pool.GpuEntry` / :class:`~rbees_core.api.pool.CpuEntry` is
reported in :attr:`Inventory.problems` and the others still count.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pluggy

from rbees_core import plugins
from rbees_core.api.pool import CpuEntry, GpuEntry

log = logging.getLogger(__name__)
#: The keys of the CPU in ``rbees-pool status --format json``.
CPU_KEYS = ("name", "cores", "ram_total_bytes", "ram_free_bytes")


@attrs.frozen
class Inventory:
    """GPU entries (CONTRACT section 4), the CPU, and probes that failed."""

    gpus: list[GpuEntry]
    cpu: CpuEntry | None
    problems: list[str] = attrs.field(factory=list)

    def to_dict(self) -> dict[str, Any]:
        """``gpus`` and ``cpu`` as ``rbees-pool status --format json`` prints them."""
        return {"gpus": [attrs.asdict(g) for g in self.gpus],
                "cpu": {k: getattr(self.cpu, k) for k in CPU_KEYS}
                if self.cpu is not None else None}


def collect(pm: pluggy.PluginManager) -> Inventory:
    """Ask every registered probe for its devices, in probe-name order."""
    gpus: list[GpuEntry] = []
    cpu: CpuEntry | None = None
    problems: list[str] = []
    for name, cls in sorted(plugins.gpu_inventories(pm).items()):
        try:
            entries = list(cls().collect())
        except Exception as exc:  # a broken probe must not hide the other devices
            log.warning("GPU inventory %s failed: %s", name, exc)
            problems.append(f"{name}: {exc}")
            continue
        for entry in entries:
            if isinstance(entry, CpuEntry):
                cpu = entry
            elif isinstance(entry, GpuEntry):
                gpus.append(entry)
            else:
                log.warning("GPU inventory %s returned a %s", name, type(entry).__name__)
                problems.append(f"{name}: returned a {type(entry).__name__}, not a GpuEntry "
                                "or CpuEntry")
                break
    gpus.sort(key=lambda g: (g.backend, g.index))
    return Inventory(gpus=gpus, cpu=cpu, problems=problems)
