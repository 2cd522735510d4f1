"""Steps of the model lifecycle: keep-alive (the workers a job's keep_alive unloads)."""

from __future__ import annotations

import time
from typing import Any

from pytest_bdd import parsers, then
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


@then(parsers.parse("the worker that ran it is stopped within {seconds:d} seconds of the "
                    "job's end"))
def worker_unloaded(world: World, ctx: dict[str, Any], seconds: int) -> None:
    # "the job ends" read the stream to its end event: the clock starts about there
    pool, worker_id = _ran_on(world, ctx)
    start = time.monotonic()
    while (state := _state(world, pool, worker_id)) in LOADED:
        assert time.monotonic() - start < seconds, f"{worker_id} on {pool} is still {state}"
        time.sleep(0.05)


@then(parsers.parse("the worker that ran it is still ready after {seconds:d} seconds"))
def worker_kept(world: World, ctx: dict[str, Any], seconds: int) -> None:
    pool, worker_id = _ran_on(world, ctx)
    time.sleep(seconds)
    assert _state(world, pool, worker_id) in ("ready", "busy")
