"""The devices of this host, from every installed GPU inventory probe (cpu, nvml, metal).

Shared by ``rbees-pool status`` and pool-managerd's ``/v2/state``. A probe that raises
(it should not: see :class:`rbees_core.interfaces.GpuInventory`) is reported in
:attr:`Inventory.problems` and the others still count.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pluggy

from rbees_core import plugins

log = logging.getLogger(__name__)
CPU_KEYS = ("name", "cores", "ram_total_bytes", "ram_free_bytes")


@attrs.frozen
class Inventory:
    """GPU entries (CONTRACT section 4), the CPU summary, and probes that failed."""

    gpus: list[dict[str, Any]]
    cpu: dict[str, Any] | None
    problems: list[str] = attrs.field(factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": [dict(g) for g in self.gpus],
                "cpu": dict(self.cpu) if self.cpu is not None else None}


def collect(pm: pluggy.PluginManager) -> Inventory:
    """Ask every registered probe for its devices, in probe-name order."""
    gpus: list[dict[str, Any]] = []
    cpu: dict[str, Any] | None = None
    problems: list[str] = []
    for name, cls in sorted(plugins.gpu_inventories(pm).items()):
        try:
            entries = list(cls().collect())
        except Exception as exc:  # a broken probe must not hide the other devices
            log.warning("GPU inventory %s failed: %s", name, exc)
            problems.append(f"{name}: {exc}")
            continue
        for entry in entries:
            if entry.get("backend") == "cpu":
                cpu = {k: entry.get(k) for k in CPU_KEYS}
            else:
                gpus.append(dict(entry))
    gpus.sort(key=lambda g: (str(g.get("backend")), int(g.get("index", 0))))
    return Inventory(gpus=gpus, cpu=cpu, problems=problems)
