"""Playing scheduling decisions forward without a cluster, and re-deciding recorded ones.

``rbees scheduler simulate`` and ``bench/scheduler.py`` decide a list of jobs one after
another on a snapshot (:mod:`rbees_core.scheduling`), each verdict applied to the snapshot
the next job sees (:func:`replay`). ``rbees scheduler replay`` re-decides what rbees-orcd
recorded, each decision on the snapshot it was made from, and says what another policy
would have changed (:func:`rerun`). Pure but for the policy it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rbees_core.placement import core_donor, cores_to_start, cpu_device
from rbees_core.planning import device_bytes, need_of
from rbees_core.scheduling import Snapshot, Verdict, memory_needed, model_entry


def normalise_job(job: Any, index: int) -> dict[str, Any]:
    """A job of a jobs file in the snapshot's ``job`` shape (defaults filled in).

    Raises :class:`rbees_core.errors.InvalidParamsError` naming the bad entry.
    """
    from rbees_core.errors import InvalidParamsError

    where = f"jobs[{index}]"
    if not isinstance(job, dict):
        raise InvalidParamsError(where, "must be an object")
    if not isinstance(job.get("model"), str) or not job["model"]:
        raise InvalidParamsError(f"{where}.model", "must be a non-empty string")
    placement = job.get("placement")
    if placement is not None and not isinstance(placement, dict):
        raise InvalidParamsError(f"{where}.placement", "must be an object")
    out = {
        "job_id": str(job.get("job_id") or f"job-{index + 1}"), "model": job["model"],
        "priority": job.get("priority", "interactive"), "waited_s": job.get("waited_s", 0.0),
        "retry_count": job.get("retry_count", 0), "placement": placement,
    }
    for key in ("memory_bytes", "memory_layers", "memory_layer_bytes", "now", "downloadable",
                "download_bytes"):
        if key in job:
            out[key] = job[key]
    match = job.get("prefix_match")
    if match is not None:
        if not isinstance(match, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in match.values()):
            raise InvalidParamsError(f"{where}.prefix_match",
                                     'must map "<pool_id>/<worker_id>" to characters')
        out["prefix_match"] = match
    return out


def _find(pools: list[dict[str, Any]], pool_id: str | None) -> dict[str, Any] | None:
    return next((p for p in pools if p.get("pool_id") == pool_id), None)


def apply_verdict(data: dict[str, Any], job: dict[str, Any], verdict: Verdict, *,
                  worker_slots: int = 1) -> None:
    """Play ``verdict`` forward on snapshot ``data`` (mutated in place).

    A dispatch takes a slot of its worker; ``start_worker`` adds a ``starting`` worker with
    the decision's slots (else ``worker_slots``), one of them promised to this job, and
    reserves the memory it needs on its device (on each device of a split or partial
    offload: :func:`rbees_core.planning.device_bytes`) and the cores it takes
    (:func:`cores_to_start`); a ``wait`` for a starting worker takes one of its slots;
    ``stop_worker`` removes the worker.
    """
    pools = data.setdefault("pools", [])
    for d in verdict.decisions:
        pool = _find(pools, d.pool_id)
        if pool is None:
            continue
        workers = pool.setdefault("workers", [])
        worker = next((w for w in workers if w.get("worker_id") == d.worker_id), None)
        if d.action in ("dispatch", "wait") and worker is not None:
            worker["slots_free"] = max(0, int(worker.get("slots_free", 0)) - 1)
        elif d.action == "stop_worker" and worker is not None:
            workers.remove(worker)
        elif d.action == "download":
            pool.setdefault("downloading", []).append(
                {"model": d.model or job["model"], "bytes": 0,
                 "total": job.get("download_bytes")})
        elif d.action == "start_worker":
            taken = {w.get("worker_id") for w in workers}
            n = len(workers) + 1
            while f"sim-{n}" in taken:
                n += 1
            slots = d.slots or worker_slots
            model = d.model or job["model"]
            cpu = cpu_device(pool)
            donor = core_donor(pool, model) if cpu is not None and not cpu.get("cores_free") \
                else None
            cores = cores_to_start(pool, str(d.device), d.threads, model)
            workers.append({
                "worker_id": f"sim-{n}", "model_ref": model,
                "device": d.device, "state": "starting", "slots_total": slots,
                "slots_free": max(0, slots - 1), "uri": None,
            })
            if d.embedding:
                workers[-1]["embedding"] = True
            if cores and donor is not None and str(d.device).startswith("cpu"):
                keep = len(donor["cpus"]) - cores  # its pool halves it for this one
                workers[-1].update(threads=cores, cpus=list(donor["cpus"][keep:]))
                donor.update(threads=keep, cpus=list(donor["cpus"][:keep]))
            elif cores and cpu is not None:
                free = int(cpu.get("cores_free") or 0)
                first = int(cpu.get("cores_total") or 0) - free  # the lowest free, as pools do
                workers[-1].update(threads=cores, cpus=list(range(first, first + cores)))
                cpu["cores_free"] = max(0, free - cores)
            model = d.model or job["model"]
            total = memory_needed({**job, "model": model}, pool)
            uses = device_bytes(need_of(job, model_entry(pool, model), total), str(d.device),
                                d.n_gpu_layers, d.tensor_split)  # a split: on each GPU
            for device in pool.get("devices") or ():
                if device.get("device") in uses:
                    device["memory_reserved_bytes"] = (
                        int(device.get("memory_reserved_bytes") or 0)
                        + uses[device.get("device")])


def replay(decide: Any, snapshot: dict[str, Any], jobs: list[Any], *,
           worker_slots: int = 1) -> list[tuple[dict[str, Any], Verdict]]:
    """Decide ``jobs`` one after another on a copy of ``snapshot``, applying each verdict.

    ``decide`` is a :class:`rbees_core.interfaces.Scheduler`'s ``decide``. Each job sees the
    jobs after it as the queue; a job's ``now`` (seconds since the epoch) and
    ``prefix_match`` (what its prompt shares with each worker's slots, as rbees-orcd
    records it) override the snapshot's for its decision. Deterministic for a
    deterministic policy.
    """
    import copy

    data = copy.deepcopy(snapshot)
    data.setdefault("pools", [])
    pending = [normalise_job(job, i) for i, job in enumerate(jobs)]
    out = []
    for i, job in enumerate(pending):
        head = {k: v for k, v in job.items() if k not in ("now", "prefix_match")}
        snap = {
            "now": float(job.get("now", data.get("now", 0.0))), "job": head,
            "queue": [{k: q[k] for k in ("job_id", "model", "priority", "waited_s")}
                      for q in pending[i:]],
            "pools": data["pools"], "throughput": data.get("throughput", {}),
        }
        if "worker_defaults" in data:
            snap["worker_defaults"] = data["worker_defaults"]
        match = job.get("prefix_match", data.get("prefix_match"))
        if match:
            snap["prefix_match"] = match
        verdict = decide(Snapshot(snap))
        apply_verdict(data, head, verdict, worker_slots=worker_slots)
        out.append((head, verdict))
    return out


# -- re-deciding recorded decisions (``rbees scheduler replay``) ----------------------------

#: what a replayed decision changed, in the order a row names the first that applies
CHANGES = ("placement", "wait_avoided", "wait_added", "eviction", "other")
#: the words of a wait rbees-orcd put in place of a policy's start while a crashing model's
#: restart was backed off (rbees_core.orchestrator.recovery): no policy's decision
HELD = "restart backed off"


def target_of(decisions: list[dict[str, Any]]) -> str | None:
    """Where a verdict's decisions (their dicts) place or act: ``pool/worker`` of a dispatch,
    stop or awaited worker, ``pool/device`` of a start, ``pool`` of a download."""
    for d in decisions:
        if d.get("action") in ("dispatch", "stop_worker"):
            return f"{d.get('pool_id')}/{d.get('worker_id')}"
        if d.get("action") == "start_worker":
            return f"{d.get('pool_id')}/{d.get('device')}"
        if d.get("action") == "download":
            return str(d.get("pool_id"))
        if d.get("action") == "wait" and d.get("worker_id"):
            return f"{d.get('pool_id')}/{d.get('worker_id')}"
    return None


def _placed(decisions: list[dict[str, Any]]) -> bool:
    return any(d.get("action") in ("dispatch", "start_worker") for d in decisions)


def _shape(decisions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The decisions without their words (a reason names its policy)."""
    return [(d.get("action"), d.get("pool_id"), d.get("worker_id"), d.get("device"),
             d.get("model"), d.get("n_gpu_layers"), d.get("tensor_split"), d.get("code"))
            for d in decisions]


def _stops(decisions: list[dict[str, Any]]) -> set[tuple[Any, Any]]:
    return {(d.get("pool_id"), d.get("worker_id")) for d in decisions
            if d.get("action") == "stop_worker"}


def _comparable(verdict: dict[str, Any]) -> dict[str, Any]:
    return {k: verdict.get(k) for k in ("policy", "decisions", "candidates", "summary",
                                        "fallback")}


def change_of(recorded: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> str | None:
    """What the replayed decisions change against the recorded ones (:data:`CHANGES`), None
    when they act alike: ``placement`` (both place, elsewhere), ``wait_avoided`` (recorded
    wait, replay places), ``wait_added`` (the other way), ``eviction`` (other workers
    stopped), ``other`` (a fail, a download...)."""
    if _shape(recorded) == _shape(replayed):
        return None
    placed, replaces = _placed(recorded), _placed(replayed)
    if placed and replaces and target_of(recorded) != target_of(replayed):
        return "placement"
    if not placed and replaces:
        return "wait_avoided"
    if placed and not replaces:
        return "wait_added"
    if _stops(recorded) != _stops(replayed):
        return "eviction"
    return "other"


def _side(verdict: dict[str, Any]) -> dict[str, Any]:
    decisions = list(verdict.get("decisions") or [])
    return {"policy": verdict.get("policy"),
            "action": "+".join(str(d.get("action")) for d in decisions),
            "target": target_of(decisions), "decisions": decisions,
            "summary": verdict.get("summary") or "", "fallback": verdict.get("fallback")}


def rerun(decide: Any, records: Iterable[dict[str, Any]], *,
          policy_for: Any = None) -> dict[str, Any]:
    """Re-decide recorded decisions, each on the snapshot it was made from (no play
    forward: a pure re-run, so the policy that made them reproduces each one exactly).

    ``records`` are ``GET /v2/decisions``' entries (``job_id``, ``decision_id``,
    ``decided_at``, ``decision``, ``snapshot``); ``decide`` a
    :class:`rbees_core.interfaces.Scheduler`'s, or None with ``policy_for(name)`` giving
    the ``decide`` of the policy a decision was made by (the check that it reproduces its
    decisions). Returns ``{"rows": [...], "summary":
    {...}}``: per decision the recorded and replayed ``action``/``target``/``summary``,
    ``exact`` (the same verdict word for word, timings aside), ``change``
    (:func:`change_of`) and ``held`` (rbees-orcd held the policy's start back while the
    model's restart was backed off: even the same policy does not reproduce it, as the
    backoff is not in the snapshot); the summary counts them. Called by ``rbees scheduler
    replay`` and rbees-orcd's ``GET /v2/tasks/{id}/replay``."""
    import copy

    rows = []
    counts = {"decisions": 0, "exact": 0, "same": 0, **dict.fromkeys(CHANGES, 0), "held": 0}
    policy = None
    for record in records:
        snapshot = record["snapshot"]
        before = record["decision"]
        chosen = decide if decide is not None else policy_for(str(before.get("policy")))
        verdict = chosen(Snapshot(copy.deepcopy(snapshot))).to_dict()
        policy = verdict.get("policy") if decide is not None else "each its own"
        change = change_of(list(before.get("decisions") or []),
                           list(verdict.get("decisions") or []))
        exact = _comparable(before) == _comparable(verdict)
        held = any(HELD in str(d.get("reason") or "") for d in before.get("decisions") or ())
        job = snapshot.get("job") or {}
        rows.append({"job_id": record["job_id"], "decision_id": record.get("decision_id"),
                     "decided_at": record.get("decided_at"), "model": job.get("model"),
                     "priority": job.get("priority"), "recorded": _side(before),
                     "replayed": _side(verdict), "exact": exact, "change": change,
                     "held": held})
        counts["decisions"] += 1
        counts["held"] += held
        counts["exact"] += exact
        counts[change or "same"] += 1
    jobs = {r["job_id"] for r in rows}
    changed = {r["job_id"] for r in rows if r["change"]}
    return {"rows": rows, "summary": {"policy": policy, "jobs": len(jobs),
                                      "jobs_changed": len(changed), **counts}}
