"""Slots and cores of new workers, as a scheduling snapshot tells them (pure functions).

Part of the scheduling contract (:mod:`rbees_core.scheduling`): the
built-in policies, :func:`rbees_core.replay.apply_verdict` and script policies' helpers
read a snapshot's ``worker_defaults`` and a CPU device's ``cores_total``/``cores_free``
through these, so that every policy accounts cores alike.
"""

from __future__ import annotations

from typing import Any


def cpu_device(pool: dict[str, Any]) -> dict[str, Any] | None:
    """The pool's CPU device entry, or None."""
    return next((d for d in pool.get("devices") or () if d.get("device") == "cpu"), None)


def worker_defaults(snapshot: dict[str, Any], device: str) -> dict[str, Any]:
    """``{"slots", "ctx", "threads"}`` of a worker started on ``device`` (its kind's
    ``worker_defaults``; ``{}`` when the snapshot has none)."""
    kind = "cpu" if device.split(":", 1)[0] == "cpu" else "gpu"
    return dict((snapshot.get("worker_defaults") or {}).get(kind) or {})


def cores_to_start(pool: dict[str, Any], device: str, wanted: int | None) -> int | None:
    """Cores a new worker on ``pool``'s ``device`` gets: on the CPU ``wanted`` (None: all)
    of the cores no worker holds, at most those, 0 when none is free (it must not start
    there); on a GPU 1 (its host thread; one is spared when none is free: a GPU worker is
    never refused for cores). None when the pool does not count its cores (every worker
    gets what its pool gives). The core accounting of the built-in policies and of
    :func:`apply_verdict`; pure."""
    cpu = cpu_device(pool)
    if cpu is None or cpu.get("cores_total") is None:
        return None
    free = max(0, int(cpu.get("cores_free") or 0))
    if device.split(":", 1)[0] != "cpu":
        return 1
    return free if wanted is None else min(int(wanted), free)
