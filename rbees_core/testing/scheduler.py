"""Builders of scheduling snapshots, for tests of placement policies (yours included).

Each builder returns the plain-data shape of :mod:`rbees_core.scheduling`::

    snap = snapshot(
        pool("gpu-box", devices=[device("cuda:0", free_gib=20)],
             workers=[worker("w1", device="cuda:0", slots=4, free=1)]),
        pool("mac", status="unavailable"),
        job=job("smollm2", placement={"avoid_pools": ["gpu-box"]}),
    )
    verdict = MyPolicy().decide(snap)

Memory is given in GiB; ``models`` default to ``["smollm2"]`` and workers hold
``smollm2`` unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rbees_core.scheduling import Snapshot

GIB = 1024 ** 3
#: Wednesday 2026-03-04, 12:00 UTC.
NOON = 1_772_625_600.0


def device(name: str = "cpu", *, free_gib: float = 8.0, total_gib: float | None = None,
           reserved_gib: float = 0.0, kind: str | None = None,
           power_w: float | None = None, cores: int | None = None,
           cores_free: int | None = None) -> dict[str, Any]:
    """A device entry; ``kind`` defaults to the part of ``name`` before the colon. A CPU
    with ``cores`` counts them (``cores_free``, default all, are held by no worker)."""
    out: dict[str, Any] = {
        "device": name, "kind": kind or name.split(":", 1)[0], "name": name,
        "memory_total_bytes": int((total_gib if total_gib is not None else free_gib * 2) * GIB),
        "memory_free_bytes": int(free_gib * GIB),
        "memory_reserved_bytes": int(reserved_gib * GIB),
    }
    if power_w is not None:
        out["power_w"] = power_w
    if cores is not None:
        out["cores_total"] = cores
        out["cores_free"] = cores if cores_free is None else cores_free
    return out


def worker(worker_id: str, *, model: str = "smollm2", device: str = "cpu",
           state: str = "ready", slots: int = 4, free: int | None = None,
           cpus: list[int] | None = None) -> dict[str, Any]:
    """A worker entry with ``slots`` slots of which ``free`` (default all) are free, on
    the CPU set ``cpus`` (its threads: as many) when given."""
    out: dict[str, Any] = {
        "worker_id": worker_id, "model_ref": model, "device": device, "state": state,
        "slots_total": slots, "slots_free": slots if free is None else free,
        "uri": f"http://127.0.0.1:9000/{worker_id}"}
    if cpus is not None:
        out["threads"] = len(cpus)
        out["cpus"] = list(cpus)
    return out


def pool(pool_id: str, *, status: str = "ready", devices: Iterable[dict[str, Any]] | None = None,
         workers: Iterable[dict[str, Any]] = (), models: Iterable[Any] = ("smollm2",),
         disk_free_gib: float | None = None,
         downloading: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """A pool entry; without ``devices`` it has one ``cpu`` device with 8 GiB free.
    ``disk_free_gib`` becomes ``disk_free_bytes``; ``downloading`` its downloads in progress
    (``{"model", "bytes", "total"}``)."""
    out: dict[str, Any] = {"pool_id": pool_id, "status": status,
           "devices": list(devices) if devices is not None else [device("cpu")],
           "workers": list(workers), "models": list(models)}
    if disk_free_gib is not None:
        out["disk_free_bytes"] = int(disk_free_gib * GIB)
    if downloading:
        out["downloading"] = list(downloading)
    return out


def job(model: str = "smollm2", *, job_id: str = "job-1", priority: str = "interactive",
        placement: dict[str, Any] | None = None, memory_gib: float | None = None,
        waited_s: float = 0.0, downloadable: bool = False,
        download_gib: float | None = None) -> dict[str, Any]:
    """The job at the head of the queue; ``memory_gib`` becomes ``memory_bytes``;
    ``downloadable`` (a source can download its model: pull on first use) and
    ``download_gib`` (the file's size, ``download_bytes``) as rbees-orcd sets them."""
    out: dict[str, Any] = {"job_id": job_id, "model": model, "priority": priority,
                           "waited_s": waited_s, "retry_count": 0, "placement": placement}
    if memory_gib is not None:
        out["memory_bytes"] = int(memory_gib * GIB)
    if downloadable:
        out["downloadable"] = True
    if download_gib is not None:
        out["download_bytes"] = int(download_gib * GIB)
    return out


_default_job = job


def snapshot(*pools: dict[str, Any], job: dict[str, Any] | None = None, now: float = NOON,
             queue: list[dict[str, Any]] | None = None,
             throughput: dict[str, float] | None = None,
             worker_defaults: dict[str, Any] | None = None,
             prefix_match: dict[str, int] | None = None) -> Snapshot:
    """A :class:`Snapshot` of ``pools`` for ``job`` (default: an interactive smollm2 job),
    with rbees-orcd's ``worker_defaults`` when given, and ``prefix_match``
    (``{"<pool_id>/<worker_id>": chars}``: how much of the job's prompt each worker's slots
    hold, as rbees-orcd counts what it sent there) when given."""
    head = job if job is not None else _default_job()
    if queue is None:
        queue = [{k: head[k] for k in ("job_id", "model", "priority", "waited_s")}]
    data = {"now": now, "job": head, "queue": queue, "pools": list(pools),
            "throughput": throughput or {}}
    if worker_defaults is not None:
        data["worker_defaults"] = worker_defaults
    if prefix_match is not None:
        data["prefix_match"] = prefix_match
    return Snapshot(data)


def targets(verdict: Any) -> list[tuple[str, str | None, str | None]]:
    """``(action, pool_id, worker_id or device or model)`` of each decision of a verdict
    (the model of a ``download``)."""
    return [(d.action, d.pool_id, d.device if d.action == "start_worker"
             else d.model if d.action == "download" else d.worker_id)
            for d in verdict.decisions]
