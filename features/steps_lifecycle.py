"""Steps of the model lifecycle: keep-alive (the workers a job's keep_alive unloads)."""

from __future__ import annotations

import json
import os
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
INVENTORIES: dict[str, list[tuple[str, float]]] = {
    "a 24 GB and a 12 GB GPU": [("cpu", 64), ("cuda:0", 24), ("cuda:1", 12)],
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


# -- evict to fit (one memory figure) --------------------------------------------------------


def _workers_by_model(world: World, pool: str) -> dict[str, dict[str, Any]]:
    return {str(w["model_ref"]): w for w in world.pool_workers(pool) if w["state"] in LOADED}


@given(parsers.parse("{pool}'s pool offers memory for two SmolLM2 workers and holds models "
                     "{a}, {b} and {c}"))
def pool_with_room_for_two(world: World, ctx: dict[str, Any], pool: str, a: str, b: str,
                           c: str) -> None:
    """The pool restarted with ``RBEES_POOL_MEMORY_LIMIT`` at 2.5 workers of the embedded
    SmolLM2 (4 slots, rbees-orcd's default), and that one file linked under three names in
    its models directory; the lab's own pool comes back after the scenario (conftest.py)."""
    from rbees_core import plugins
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model
    from rbees_core.pool.memory import Estimates

    pm = plugins.make_manager(plugins.builtin_plugins())
    path = resolve_model(pm, DEFAULT_MODEL_REF)
    one = Estimates(pm).estimate(path, backend="llamacpp", device="cpu", slots=4,
                                 ctx=None).total_bytes
    models = world.host(pool).home / "models"
    models.mkdir(parents=True, exist_ok=True)
    ctx["models"] = {}
    for name in (a, b, c):
        link = models / f"{name}.gguf"
        link.unlink(missing_ok=True)
        os.link(path, link)
        ctx["models"][name] = f"file:{link}"
    ctx["linked"] = [models / f"{name}.gguf" for name in (a, b, c)]
    ctx["pool_changed"] = pool
    world.kill(f"pool:{pool}", signal.SIGTERM)
    world.start_pool(pool, RBEES_POOL_MEMORY_LIMIT=str(int(2.5 * one)))
    ctx["pool"] = pool
    deadline = time.monotonic() + 30
    while not all(ref in {m.get("ref") for m in world.http(
            "GET", f"{world.blep.orcd_url}/v2/pools/{pool}", timeout=10).json()["models"]}
                  for ref in ctx["models"].values()):
        assert time.monotonic() < deadline, "the pool's models never reached rbees-orcd"
        time.sleep(0.1)


def _run_job(world: World, ctx: dict[str, Any], model: str, **extra: Any) -> str:
    body = {"model": ctx["models"][model], "prompt": "Bees are", "max_tokens": 4,
            "temperature": 0, **extra}
    answer = world.http("POST", f"{world.blep.orcd_url}/v2/tasks", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["job_id"])


def _ends(world: World, job_id: str) -> str:
    from rbees_core.testing import parse_sse

    got = world.http("GET", f"{world.blep.orcd_url}/v2/tasks/{job_id}/events", timeout=180)
    return parse_sse(got.text)[-1][1]


@when(parsers.parse("a job for model {model} runs to its end"))
def job_for_model(world: World, ctx: dict[str, Any], model: str) -> None:
    ctx["stopped_worker_of"] = _worker_ids(world, ctx)  # before: whom a stop would name
    started = time.monotonic()
    ctx["job_id"] = _run_job(world, ctx, model)
    assert _ends(world, ctx["job_id"]) == "end"
    print(f"MEASURED: a job for {model}: {time.monotonic() - started:.2f} s")


def _worker_ids(world: World, ctx: dict[str, Any]) -> dict[str, str]:
    """Model name -> the id of its live worker on the scenario's pool."""
    live = _workers_by_model(world, ctx["pool"])
    return {name: str(live[ref]["worker_id"]) for name, ref in ctx["models"].items()
            if ref in live}


@then(parsers.parse("its decision stopped the worker of {model} as the least recently used"))
def decision_stopped(world: World, ctx: dict[str, Any], model: str) -> None:
    why = world.http("GET", f"{world.blep.orcd_url}/v2/tasks/{ctx['job_id']}/decision",
                     timeout=10).json()
    stops = [d for entry in why["decisions"] for d in entry["decisions"]
             if d["action"] == "stop_worker"]
    assert len(stops) == 1, why
    assert stops[0]["worker_id"] == ctx["stopped_worker_of"][model], (stops, ctx)
    assert "evicted (least recently used)" in stops[0]["reason"], stops


@then(parsers.parse("{pool} has workers for {a} and {b} only"))
def workers_for(world: World, ctx: dict[str, Any], pool: str, a: str, b: str) -> None:
    assert set(_workers_by_model(world, pool)) == {ctx["models"][a], ctx["models"][b]}


@when(parsers.parse("a long job for model {model} is running"))
def long_job_of_model(world: World, ctx: dict[str, Any], model: str) -> None:
    worker = _workers_by_model(world, ctx["pool"])[ctx["models"][model]]
    ctx["long_worker"] = worker["worker_id"]
    ctx["long_job"] = _run_job(world, ctx, model, max_tokens=400, prompt="Count: 1, 2, 3,")
    deadline = time.monotonic() + 60
    while world.http("GET", f"{world.blep.orcd_url}/v2/tasks/{ctx['long_job']}",
                     timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)


@then(parsers.parse('the long job ends with "{terminal}" on the worker of {model} it started '
                    "on"))
def long_job_ends(world: World, ctx: dict[str, Any], terminal: str, model: str) -> None:
    record = world.http("GET", f"{world.blep.orcd_url}/v2/tasks/{ctx['long_job']}",
                        timeout=10).json()
    assert record["status"] == "running", record  # still running when the other job ended
    assert _ends(world, ctx["long_job"]) == terminal
    assert _workers_by_model(world, ctx["pool"])[ctx["models"][model]]["worker_id"] == \
        ctx["long_worker"]
