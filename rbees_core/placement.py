"""Slots and cores of new workers, as a scheduling snapshot tells them (pure functions).

Part of the scheduling contract (:mod:`rbees_core.scheduling`): the
built-in policies, :func:`rbees_core.replay.apply_verdict` and script policies' helpers
read a snapshot's ``worker_defaults`` and a CPU device's ``cores_total``/``cores_free``
through these, so that every policy accounts cores alike.
"""

from __future__ import annotations

from typing import Any

from rbees_core.scheduling import model_aliases, same_model


def cpu_device(pool: dict[str, Any]) -> dict[str, Any] | None:
    """The pool's CPU device entry, or None."""
    return next((d for d in pool.get("devices") or () if d.get("device") == "cpu"), None)


def worker_defaults(snapshot: dict[str, Any], device: str) -> dict[str, Any]:
    """``{"slots", "ctx", "threads"}`` of a worker started on ``device`` (its kind's
    ``worker_defaults``; ``{}`` when the snapshot has none)."""
    kind = "cpu" if device.split(":", 1)[0] == "cpu" else "gpu"
    return dict((snapshot.get("worker_defaults") or {}).get(kind) or {})


def core_donor(pool: dict[str, Any], model: str | None = None) -> dict[str, Any] | None:
    """The worker whose cores a new worker on ``pool`` shares when none is free: the CPU
    worker holding the most cores of its own (at least two; the first listed of equals),
    which its pool halves, giving the upper half of its CPU set to the new worker
    (``ready``/``busy``, not an embedding worker: only a decoding engine can change its
    thread count at run time). None when no worker can give cores, while a CPU start
    rbees-orcd asked for is under way there (``expected``: it may be taking them), or when
    a worker of ``model`` already runs there (a second copy of a model on half of the
    cores its first one had gains nothing: the job waits for a slot of it). Pure;
    pool-managerd picks the worker it halves with it too (``model`` None there)."""
    best: dict[str, Any] | None = None
    if any(w.get("expected") and str(w.get("device") or "").startswith("cpu")
           for w in pool.get("workers") or ()):
        return None  # a start is under way: it may be taking those cores now
    aliases = model_aliases(pool)
    if model is not None and any(same_model(w.get("model_ref"), model, aliases)
                                 for w in pool.get("workers") or ()):
        return None
    for w in pool.get("workers") or ():
        cpus = w.get("cpus") or ()
        if (len(cpus) >= 2 and not w.get("cpu_shared") and not w.get("embedding")
                and w.get("state") in ("ready", "busy")
                and str(w.get("device") or "").split(":", 1)[0] == "cpu"
                and (best is None or len(cpus) > len(best["cpus"]))):
            best = w
    return best


def cores_to_start(pool: dict[str, Any], device: str, wanted: int | None,
                   model: str | None = None) -> int | None:
    """Cores a new worker on ``pool``'s ``device`` gets: on the CPU ``wanted`` (None: all)
    of the cores no worker holds, at most those; when none is free, the half the
    :func:`core_donor` gives up for a worker of ``model`` (its pool halves it: two busy
    models on one host each run on cores of their own rather than one waiting for the
    other or both spinning on the same cores), else 0 (it must not start there). On a GPU
    1 (its host thread; one is spared when none is free: a GPU worker is never refused for
    cores). None when the pool
    does not count its cores (every worker gets what its pool gives). The core accounting
    of the built-in policies and of :func:`apply_verdict`; pure."""
    cpu = cpu_device(pool)
    if cpu is None or cpu.get("cores_total") is None:
        return None
    free = max(0, int(cpu.get("cores_free") or 0))
    if device.split(":", 1)[0] != "cpu":
        return 1
    if free == 0:
        donor = core_donor(pool, model)
        free = len(donor["cpus"]) // 2 if donor is not None else 0
    return free if wanted is None else min(int(wanted), free)


def held_back(slots_total: int, interactive_slots: int) -> int:
    """Slots of a worker of ``slots_total`` that batch-priority jobs leave free for
    interactive ones: ``interactive_slots``, on a worker with more slots than that (a
    one-slot worker still runs batch jobs)."""
    return interactive_slots if slots_total > interactive_slots else 0


def hold_back(pools: list[dict[str, Any]], interactive_slots: int) -> list[dict[str, Any]]:
    """The snapshot's pools as a batch-priority job sees them: each worker's
    ``slots_free`` less the slots it keeps for interactive jobs (:func:`held_back`). The
    pools given are not changed (a copy, where anything differs). Pure."""
    if interactive_slots <= 0:
        return pools
    out = []
    for pool in pools:
        workers = pool.get("workers") or ()
        if not any(held_back(int(w.get("slots_total") or 0), interactive_slots)
                   for w in workers):
            out.append(pool)
            continue
        out.append({**pool, "workers": [
            {**w, "slots_free": max(0, int(w.get("slots_free") or 0) - held_back(
                int(w.get("slots_total") or 0), interactive_slots))} for w in workers]})
    return out
