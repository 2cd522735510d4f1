"""rbees-orcd's pool control against a fake pool-managerd: the workers a verdict asks for
are started and stopped through the typed pool client, with the orchestrator's token."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from rbees_core.api.pool import CpuEntry, PoolHeartbeat
from rbees_core.log import Logger
from rbees_core.orchestrator.book import Book
from rbees_core.orchestrator.pool_control import PoolControl
from rbees_core.orchestrator.registry import PoolRegistry

WORKER = {"worker_id": "w1", "model_ref": "smollm2", "backend": "llamacpp", "device": "cpu",
          "uri": "http://127.0.0.1:8001", "pid": 42, "state": "starting", "slots_total": 1,
          "slots_free": None, "memory_bytes": 0, "started_at": 1.0}


class FakePool:
    """pool-managerd's worker calls; ``states`` are what successive polls answer."""

    def __init__(self, states: list[str], stop_status: int = 202) -> None:
        self.states = states
        self.stop_status = stop_status
        self.requests: list[tuple[str, str, Any, str | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body,
                              request.headers.get("authorization")))
        if request.url.path == "/v2/workers/start":
            return httpx.Response(202, json={"worker_id": "w1", "state": "starting",
                                             "uri": WORKER["uri"]})
        if request.url.path == "/v2/workers/w1/stop":
            if self.stop_status >= 400:
                return httpx.Response(self.stop_status, json={"error": {
                    "code": "CONFLICT", "message": "no", "retriable": False}})
            return httpx.Response(self.stop_status, json={})
        if request.url.path == "/v2/workers/w1":
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return httpx.Response(200, json={**WORKER, "state": state})
        return httpx.Response(404, json={"error": {"code": "NOT_FOUND", "message": "?"}})


def control(fake: FakePool) -> PoolControl:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    pools = PoolControl(Book(), PoolRegistry(), Logger("rbees-orcd"), client, token="s3cret",
                        idle_timeout_s=300.0)
    pools.heartbeat(PoolHeartbeat(
        pool_id="p1", host="p1", gpus=[], models=[], workers=[], url="http://pool.test:9200",
        cpu=CpuEntry(cores=2, ram_total_bytes=2**34, ram_free_bytes=2**33), seq=1,
        sent_at=time.time()))
    return pools


async def test_a_started_worker_is_polled_until_ready_and_registered() -> None:
    fake = FakePool(["starting", "starting", "ready"])
    pools = control(fake)
    version = pools.book.version
    pools.start_worker("p1", "cpu", "smollm2")
    pools.start_worker("p1", "cpu", "smollm2")  # one is starting already: not twice
    await asyncio.wait_for(asyncio.gather(*pools.book.tasks), 10)
    method, path, body, auth = fake.requests[0]
    assert (method, path) == ("POST", "/v2/workers/start")
    assert body["model_ref"] == "smollm2" and body["device"] == "cpu"
    assert auth == "Bearer s3cret"
    assert sum(1 for r in fake.requests if r[1] == "/v2/workers/start") == 1
    assert pools.registry.pools["p1"].workers["w1"]["state"] == "ready"
    assert ("p1", "w1") in pools.started_by_us and not pools.starting
    assert pools.book.version > version  # waiting jobs are decided again


async def test_a_worker_that_fails_to_load_is_logged_and_forgotten() -> None:
    fake = FakePool(["starting", "failed"])
    pools = control(fake)
    pools.start_worker("p1", "cpu", "smollm2")
    await asyncio.wait_for(asyncio.gather(*pools.book.tasks), 10)
    assert "w1" not in pools.registry.pools["p1"].workers and not pools.starting


async def test_stop_asks_the_pool_and_marks_the_worker_even_when_refused() -> None:
    for status in (202, 409):
        fake = FakePool(["ready"], stop_status=status)
        pools = control(fake)
        pools.registry.set_worker("p1", {**WORKER, "state": "ready"})
        await pools.stop_worker("p1", "w1")
        assert fake.requests[-1][:2] == ("POST", "/v2/workers/w1/stop")
        assert pools.registry.pools["p1"].workers["w1"]["state"] == "stopping"
    await control(FakePool(["ready"])).stop_worker("unknown", "w1")  # nothing to ask
