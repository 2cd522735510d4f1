"""Scheduler benchmark: one placement decision on a big cluster, per policy.

A cluster of 100 pools x 8 workers (4 models, GPU and CPU devices, a few pools unavailable)
and 1,000 queued jobs (mixed models and priorities, some with placement hints). Each policy
decides the jobs one after another, and each verdict is applied to the cluster before the
next decision (a dispatch takes a slot, a start adds a starting worker), as
``rbees scheduler simulate`` does. Only ``decide()`` is timed: for the script scheduler that
includes the round trip to its sandbox process. The set-up heap is frozen (``gc.freeze``) so
that garbage collections of the harness's own objects do not land in the timings. Targets:
built-in policies < 1 ms median, the script scheduler < 10 ms median.

Prints one Markdown table and writes it to docs/benchmarks.md under "## Scheduler"
(replacing that section, keeping the others); exits 1 when a target is missed.

Usage: python bench/scheduler.py [--pools 100] [--workers 8] [--jobs 1000] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rbees_core import plugins
from rbees_core.replay import apply_verdict, normalise_job
from rbees_core.scheduling import Snapshot, Verdict

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SCRIPTS = [ROOT / "schedulers" / "examples" / "low_power.star",
           ROOT / "schedulers" / "examples" / "interactive_gpu.star"]
MODELS = ["smollm2", "tinyllama", "qwen", "phi"]
GIB = 1024 ** 3
TARGET_BUILTIN_MS = 1.0
TARGET_SCRIPT_MS = 10.0


def cluster(pools: int, workers: int, rng: random.Random) -> dict[str, Any]:
    out = []
    for i in range(pools):
        gpu = i % 4 != 3
        devices = [{"device": "cpu", "kind": "cpu", "name": "cpu",
                    "memory_total_bytes": 64 * GIB, "memory_free_bytes": rng.randint(8, 48) * GIB,
                    "memory_reserved_bytes": 0}]
        if gpu:
            devices.append({"device": "cuda:0", "kind": "cuda", "name": "RTX",
                            "memory_total_bytes": 24 * GIB,
                            "memory_free_bytes": rng.randint(2, 20) * GIB,
                            "memory_reserved_bytes": rng.choice([0, GIB]),
                            "power_w": float(rng.randint(40, 350))})
        ws = []
        for j in range(workers):
            slots = rng.choice([1, 2, 4])
            ws.append({"worker_id": f"w{j}", "model_ref": MODELS[(i + j) % len(MODELS)],
                       "device": "cuda:0" if gpu and j % 2 == 0 else "cpu",
                       "state": rng.choice(["ready", "ready", "busy", "starting"]),
                       "slots_total": slots, "slots_free": rng.randint(0, slots),
                       "uri": f"http://10.0.{i}.1:{9000 + j}"})
        out.append({"pool_id": f"pool-{i:03d}",
                    "status": "unavailable" if i % 20 == 19 else "ready",
                    "devices": devices, "workers": ws, "models": list(MODELS)})
    return {"now": 1_772_625_600.0, "pools": out, "throughput": {}}


def jobs(n: int, pools: int, rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        placement: dict[str, Any] | None = None
        r = rng.random()
        if r < 0.1:
            placement = {"prefer_pools": [f"pool-{rng.randrange(pools):03d}"]}
        elif r < 0.15:
            placement = {"avoid_pools": [f"pool-{rng.randrange(pools):03d}"]}
        elif r < 0.17:
            placement = {"pool": f"pool-{rng.randrange(pools):03d}"}
        out.append({"job_id": f"job-{i:04d}", "model": rng.choice(MODELS),
                    "priority": rng.choice(["interactive", "batch"]),
                    "waited_s": float(n - i) / 10, "memory_bytes": rng.choice([1, 2, 4]) * GIB,
                    "placement": placement})
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(decide: Callable[[Snapshot], Verdict], snap: dict[str, Any],
        queue: list[dict[str, Any]]) -> tuple[list[float], dict[str, int], int]:
    """Decide every job in turn (as :func:`rbees_core.replay.replay` does, without
    keeping the verdicts); the times of ``decide`` alone, actions taken, fallbacks."""
    data = copy.deepcopy(snap)
    pending = [normalise_job(job, i) for i, job in enumerate(queue)]
    summary = [{k: j[k] for k in ("job_id", "model", "priority", "waited_s")} for j in pending]
    times: list[float] = []
    actions: dict[str, int] = {}
    fallbacks = 0
    gc.collect()
    gc.freeze()  # the cluster and the queue live on; only what decisions allocate is collected
    for i, job in enumerate(pending):
        snapshot = Snapshot({"now": data["now"], "job": job, "queue": summary[i:],
                             "pools": data["pools"], "throughput": {}})
        t0 = time.perf_counter()
        verdict = decide(snapshot)
        times.append((time.perf_counter() - t0) * 1000)
        action = verdict.decisions[0].action if verdict.decisions else "none"
        actions[action] = actions.get(action, 0) + 1
        fallbacks += verdict.fallback is not None
        apply_verdict(data, job, verdict, worker_slots=2)
    gc.unfreeze()
    return times, actions, fallbacks


def write_doc(section: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "## Scheduler"), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    DOC.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=100)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()

    registered = plugins.schedulers(plugins.make_manager())
    rng = random.Random(args.seed)
    snap = cluster(args.pools, args.workers, rng)
    queue = jobs(args.jobs, args.pools, rng)
    rows = []
    ok = True
    candidates: list[tuple[str, Any, float]] = [
        (name, cls(), TARGET_BUILTIN_MS) for name, cls in sorted(registered.items())
        if name != "script"]
    if "script" in registered:
        candidates += [(f"script ({p.name})", registered["script"].from_path(p),
                        TARGET_SCRIPT_MS) for p in SCRIPTS]
    for name, policy, target in candidates:
        try:
            times, actions, fallbacks = run(policy.decide, snap, queue)
        finally:
            policy.close()
        median = statistics.median(times)
        met = median < target
        ok &= met
        rows.append(f"| {name} | {median:.3f} | {percentile(times, 0.99):.3f} | "
                    f"{max(times):.2f} | < {target:g} ms | {'yes' if met else 'NO'} | "
                    f"{actions.get('dispatch', 0)} / {actions.get('start_worker', 0)} / "
                    f"{actions.get('wait', 0)} | {fallbacks} |")
    header = ("| policy | median ms | p99 ms | max ms | target (median) | met | "
              "dispatch / start / wait | fallbacks |\n"
              "|---|---|---|---|---|---|---|---|\n")
    table = header + "\n".join(rows) + "\n"
    print(table)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    section = (
        "## Scheduler\n\n"
        f"`python bench/scheduler.py` ({time.strftime('%Y-%m-%d')}, Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, load average {load} at the "
        "end, shared with other work): "
        f"{args.pools} pools x {args.workers} workers, {args.jobs} queued jobs decided one after "
        "another with each verdict applied to the cluster; only `decide()` is timed (for the "
        "script scheduler including the round trip to its sandbox process).\n\n" + table)
    if not args.no_write:
        write_doc(section)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
