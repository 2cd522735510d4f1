"""Whether a job can ever be placed: the judgement behind ``NO_CAPACITY``.

A policy (:mod:`rbees_core.scheduling`) answers "where now, or wait"; this module answers
the question a wait cannot: "ever?". A job can never be placed when

(a) no pool it may run on (its pinned pool, else every pool that is not ``offline``) holds
    its model (on disk, or a worker serving it), and no source can download it: the model is
    not a catalog id and not a reference of a source that downloads (``hf:``). ``file:``
    and ``pkg:`` references and plain paths are pool-local: only a pool that holds them
    can run them. A model a source can download but no pool holds yet waits for the
    download (pull on first use), it is not refused here;
(b) every pool that holds it sizes it (:func:`~rbees_core.scheduling.memory_needed`) above
    the total memory of each of its devices, and it cannot be split across the pool's GPUs
    nor partly offloaded to one of them either (:func:`rbees_core.planning.could_ever_fit`):
    no eviction of idle workers could make room. A pool with a worker for the model
    already, or that cannot size it, can run it.

Called by rbees-orcd's dispatcher for a job its policy told to wait (once per model and
pin and pool change), and by ``rbees jobs submit`` without a daemon before it waits for a
worker; both end the job with ``NO_CAPACITY`` and the reason this returns. Pure functions
over the snapshot's plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rbees_core.planning import could_ever_fit, host_of, need_of
from rbees_core.refs import split_scheme
from rbees_core.scheduling import (
    GONE_STATES,
    failed_mark,
    gib,
    memory_needed,
    model_aliases,
    model_entry,
    same_model,
)

#: The code a job that can never be placed ends with (a decision ``fail`` carries it too).
NO_CAPACITY = "NO_CAPACITY"
#: What kind of "never": the error event's ``reason`` (``/v1`` maps them to 404 and 400).
UNKNOWN_MODEL = "unknown_model"
TOO_LARGE = "too_large"


def source_can_provide(model: str, catalog: Any, sources: Mapping[str, Any]) -> bool:
    """Whether a source could bring ``model`` to a pool that lacks it: a catalog id, or a
    reference whose scheme's source downloads (``can_download``). ``catalog`` has
    ``get(id)`` (:class:`rbees_core.catalog.Catalog`); ``sources`` maps schemes to source
    classes (:func:`rbees_core.plugins.model_sources`)."""
    if catalog is not None and catalog.get(model) is not None:
        return True
    parts = split_scheme(model)
    if parts is None:
        return False
    source = sources.get(parts[0])
    return bool(source is not None and getattr(source, "can_download", False))


def _serves(pool: dict[str, Any], model: str) -> bool:
    aliases = model_aliases(pool)
    return any(w.get("state") not in GONE_STATES
               and same_model(w.get("model_ref"), model, aliases)
               for w in pool.get("workers") or ())


def never_placeable(job: dict[str, Any], pools: list[dict[str, Any]], *,
                    provided: bool) -> tuple[str, str] | None:
    """``(kind, reason)`` when the job can never be placed on these pools (the rules
    above: kind :data:`UNKNOWN_MODEL` or :data:`TOO_LARGE`), else None.

    ``job`` is a snapshot's ``job`` (``model``, ``placement``, ``memory_bytes``?);
    ``pools`` a snapshot's ``pools``; ``provided``: :func:`source_can_provide` of its model.
    """
    model = str(job.get("model") or "")
    placement = job.get("placement") or {}
    pin = placement.get("pool") if isinstance(placement, dict) else None
    usable = [p for p in pools if p.get("status") != "offline"
              and (pin is None or p.get("pool_id") == pin)]
    holders = [p for p in usable if model_entry(p, model) is not None or _serves(p, model)]
    if not holders:
        if provided:
            return None  # a download can bring it (pull on first use)
        where = f"no pool holds {model}"
        if pin is not None and not any(p.get("pool_id") == pin for p in pools):
            where = f"pool {pin}, which the job is pinned to, is not registered"
        elif pin is not None and not usable:
            where = f"pool {pin}, which the job is pinned to, is offline"
        elif pin is not None:
            where = f"pool {pin}, which the job is pinned to, does not hold {model}"
        return UNKNOWN_MODEL, (f"{where}, and no source can download {model} (not a "
                               "catalog id, not a reference a source downloads)")
    largest = 0
    for pool in holders:
        if _serves(pool, model):
            return None
        need = memory_needed(job, pool)
        totals = [int(d.get("memory_total_bytes") or 0) for d in pool.get("devices") or ()]
        if need <= 0 or could_ever_fit(need_of(job, model_entry(pool, model), need),
                                       host_of(pool)):
            return None
        largest = max([largest, *totals])
    need = max(memory_needed(job, p) for p in holders)
    names = ", ".join(str(p.get("pool_id")) for p in holders)
    return TOO_LARGE, (f"{model} needs {gib(need)}, more than any device of the pools that "
                       f"hold it ({names}) has in all (the largest: {gib(largest)}), even "
                       "with every other worker stopped, split across GPUs or offloaded in part")


__all__ = ["NO_CAPACITY", "TOO_LARGE", "UNKNOWN_MODEL", "never_placeable",
           "source_can_provide"]


# -- models that never load (pool load marks) ---------------------------------------------

def failed_loads(pools: list[dict[str, Any]], model: str, *, pin_pool: str | None = None
                 ) -> list[tuple[str, dict[str, Any]]]:
    """``(pool_id, mark)`` of every pool where ``model`` is marked failed, when no pool
    that is not offline could still serve it (has it on disk or a worker holding it), else
    ``[]``: the job waits. Only ``pin_pool`` counts when the job is pinned. Called by
    rbees-orcd's dispatcher before it asks the policy."""
    marks: list[tuple[str, dict[str, Any]]] = []
    for pool in pools:
        pool_id = str(pool.get("pool_id"))
        if pin_pool is not None and pool_id != pin_pool:
            continue
        mark = failed_mark(pool, model)
        if mark is not None:
            marks.append((pool_id, mark))
        elif pool.get("status") != "offline" and (model_entry(pool, model) is not None or any(
                same_model(w.get("model_ref"), model, model_aliases(pool))
                for w in pool.get("workers") or ())):
            return []
    return marks


def describe_failed_loads(model: str, marks: list[tuple[str, dict[str, Any]]]) -> str:
    """``smollm2 failed to load on pool p1 (3 attempts): REASON`` for every mark."""
    return f"{model} failed to load " + "; and ".join(
        f"on pool {pool_id} ({mark.get('attempts')} attempts): {mark.get('reason')}"
        for pool_id, mark in marks)
