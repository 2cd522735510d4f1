"""Pull on first use, as a scheduling policy sees it (pure functions over a snapshot's pools).

A model no pool holds, that a source can download, comes with ``job.downloadable`` in the
snapshot (:mod:`rbees_core.scheduling`); a policy then asks :func:`downloading` whether a
pool already fetches it (and words the wait with :func:`describe_download`), else
:func:`download_choice` for the pool to fetch it to. rbees-orcd's downloads
(:mod:`rbees_core.orchestrator.downloads`) word ``why`` the same way.
"""

from __future__ import annotations

from typing import Any

from rbees_core.planning import host_of, host_plans, need_of
from rbees_core.scheduling import device_available, gib


def downloading(pools: list[dict[str, Any]], model: str) -> tuple[str, dict[str, Any]] | None:
    """``(pool_id, entry)`` of a download of ``model`` in progress (a pool's
    ``downloading``), else None."""
    for pool in pools:
        for entry in pool.get("downloading") or ():
            if entry.get("model") == model:
                return str(pool.get("pool_id")), entry
    return None


def describe_download(model: str, pool_id: str, entry: dict[str, Any]) -> str:
    """``downloading smollm2 to pool p1 (1048576 of 98362432 bytes)``."""
    of = f" of {entry['total']}" if entry.get("total") else ""
    return f"downloading {model} to pool {pool_id} ({int(entry.get('bytes') or 0)}{of} bytes)"


def download_choice(job: dict[str, Any], pools: list[dict[str, Any]]
                    ) -> tuple[str | None, dict[str, str]]:
    """Where a model no pool holds should be downloaded (pull on first use): the pool id,
    or None, and why each other pool was passed over. A ``ready`` pool the job may run on
    (its pin; ``avoid_pools`` only when nothing else can), with ``disk_free_bytes`` for the
    file when it reports it and a device whose available memory fits the model, whole or
    split or in part (``job.memory_bytes``, else ``job.download_bytes``; planning); then
    ``prefer_pools``, a GPU that fits before a CPU, the most available memory, the pool id.
    Called by the built-in policies when ``job.downloadable`` is set."""
    placement = job.get("placement") or {}
    pin = placement.get("pool")
    prefer = list(placement.get("prefer_pools") or ())
    avoid = set(placement.get("avoid_pools") or ())
    size = job.get("download_bytes")
    need = job.get("memory_bytes") or size or 0
    lost: dict[str, str] = {}
    ranked: list[tuple[Any, ...]] = []
    for pool in pools:
        pool_id = str(pool.get("pool_id"))
        if pool.get("status") != "ready":
            lost[pool_id] = f"pool {pool_id} is {pool.get('status')}"
            continue
        if pin is not None and pool_id != pin:
            lost[pool_id] = f"the job is pinned to pool {pin}"
            continue
        disk = pool.get("disk_free_bytes")
        if isinstance(disk, int) and isinstance(size, int) and disk < size:
            lost[pool_id] = f"pool {pool_id} has {gib(disk)} of disk free, needs {gib(size)}"
            continue
        plans = host_plans(need_of(job, None, int(need)), host_of(pool))  # whole, split, part
        fits = [d for d in pool.get("devices") or () if d.get("device") in plans]
        if not fits:
            lost[pool_id] = f"no device of pool {pool_id} has {gib(int(need))} free"
            continue
        best = max(fits, key=lambda d: (d.get("kind") != "cpu", device_available(d)))
        ranked.append((pool_id in avoid, prefer.index(pool_id) if pool_id in prefer
                       else len(prefer), best.get("kind") == "cpu", -device_available(best),
                       pool_id))
    if not ranked:
        return None, lost
    ranked.sort()
    for key in ranked[1:]:
        lost[key[-1]] = f"pool {ranked[0][-1]} was chosen to download it"
    return ranked[0][-1], lost
