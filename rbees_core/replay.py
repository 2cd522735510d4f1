"""Playing scheduling decisions forward without a cluster.

``rbees scheduler simulate`` and ``bench/scheduler.py`` decide a list of jobs one after
another on a snapshot (:mod:`rbees_core.scheduling`), each verdict applied to the snapshot
the next job sees. Pure but for the policy it is given.
"""

from __future__ import annotations

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
