"""Steps of the model lifecycle: keep-alive (the workers a job's keep_alive unloads)."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from pytest_bdd import given, parsers, then, when
from world import World

#: states of a worker that still holds its model
LOADED = ("starting", "loading", "ready", "busy")


def _ran_on(world: World, ctx: dict[str, Any]) -> tuple[str, str]:
    record = world.http("GET", f"{world.blep.orcd_url}/v2/tasks/{ctx['job_id']}",
                        timeout=10).json()
    return str(record["pool_id"]), str(record["worker_id"])


def _state(world: World, pool: str, worker_id: str) -> str:
    return next((str(w["state"]) for w in world.pool_workers(pool)
                 if w["worker_id"] == worker_id), "gone")


@then(parsers.re(r"the worker that ran it is stopped within (?P<seconds>\d+) seconds? of the "
                 r"job's end"))
def worker_unloaded(world: World, ctx: dict[str, Any], seconds: str) -> None:
    # "the job ends" read the stream to its end event: the clock starts there
    pool, worker_id = _ran_on(world, ctx)
    start = ctx.get("ended_at") or time.monotonic()
    stopping = None  # when rbees-orcd had asked its pool to stop it
    while (state := _state(world, pool, worker_id)) in (*LOADED, "stopping"):
        if state == "stopping" and stopping is None:
            stopping = time.monotonic() - start
        assert time.monotonic() - start < int(seconds), f"{worker_id} on {pool} is still {state}"
        time.sleep(0.02)
    print(f"MEASURED: keep_alive 0: {worker_id} stopping at {stopping or 0:.2f} s, {state} "
          f"{time.monotonic() - start:.2f} s after the job's end")


@when(parsers.parse("rbees-orcd on blep is restarted with a default keep-alive of {seconds:d} "
                    "seconds"))
def restart_with_keep_alive(world: World, ctx: dict[str, Any], seconds: int) -> None:
    """SIGTERM, then rbees-orcd again with ``--keep-alive``; once the scenario is over, the
    lab's own rbees-orcd comes back (``ctx`` in conftest.py)."""
    ctx["orcd_changed"] = True
    world.kill("orcd", signal.SIGTERM)
    world.start_orcd("--keep-alive", f"{seconds}s")
    ctx["restarted_at"] = time.monotonic()


@then(parsers.parse("the worker that ran it is stopped no sooner than {low:d} and within "
                    "{high:d} seconds of the restart"))
def worker_unloaded_after_restart(world: World, ctx: dict[str, Any], low: int,
                                  high: int) -> None:
    pool, worker_id = _ran_on(world, ctx)
    start = ctx["restarted_at"]
    while (state := _state(world, pool, worker_id)) in LOADED:
        assert time.monotonic() - start < high, f"{worker_id} on {pool} is still {state}"
        time.sleep(0.05)
    took = time.monotonic() - start
    print(f"MEASURED: default keep-alive after a restart: {worker_id} {state} {took:.2f} s "
          "after rbees-orcd answered again")
    assert took >= low, f"stopped after {took:.2f} s"


@then(parsers.parse("the worker that ran it is still ready after {seconds:d} seconds"))
def worker_kept(world: World, ctx: dict[str, Any], seconds: int) -> None:
    pool, worker_id = _ran_on(world, ctx)
    time.sleep(seconds)
    assert _state(world, pool, worker_id) in ("ready", "busy")


# -- placement of models larger than one GPU (issue 22, item 5) ------------------------------

#: hosts as their pools report them: (device, free GiB) each, the CPU's RAM first
INVENTORIES = {"a 24 GB and a 12 GB GPU": [("cpu", 64), ("cuda:0", 24), ("cuda:1", 12)],
               "an 8 GB GPU": [("cpu", 32), ("cuda:0", 7.5)],
               "no GPU": [("cpu", 16)]}


@given(parsers.parse("a scheduling snapshot on blep of a host with {inventory} and a "
                     "{size:g} GiB model of {layers:d} layers"))
def placement_snapshot(world: World, ctx: dict[str, Any], inventory: str, size: float,
                       layers: int) -> None:
    """The inputs of ``rbees scheduler simulate``: the host as a snapshot pool (in
    ``{snapshot}``) and one job for the model, with its shape (in ``{jobs}``)."""
    from rbees_core.testing.scheduler import GIB, device, pool

    folder = world.blep.home / "placement"
    folder.mkdir(parents=True, exist_ok=True)
    devices = [device(name, free_gib=free, total_gib=free)
               for name, free in INVENTORIES[inventory]]
    rest = 1.0  # GiB of the model outside its repeating layers
    snap = {"now": time.time(), "pools": [pool("host", devices=devices, models=["big"])]}
    job = {"model": "big", "memory_bytes": int(size * GIB), "memory_layers": layers,
           "memory_layer_bytes": int((size - rest) * GIB / layers)}
    (folder / "snapshot.json").write_text(json.dumps(snap))
    (folder / "jobs.json").write_text(json.dumps([job]))
    ctx["snapshot"] = str(folder / "snapshot.json")
    ctx["jobs"] = str(folder / "jobs.json")
