"""Structural fuzz of every route of every daemon (issue 20: fuzzing as a habit).

The routes come from each program's own route table (``routes(pm, started)``, plugins'
routes included) and the body schemas from its ``/openapi.json``, so a new route is attacked
without a new test. :mod:`rbees_core.testing.fuzz` sends the attacks: deep nesting, unpaired
surrogates (escaped and raw), numbers no double holds, wrong types, duplicate keys, empty,
truncated and non-JSON bodies, long strings, hostile path segments and queries, wrong methods.
Every answer must be below 500 and every error in its envelope (OpenAI's on /v1), with
``GET /health`` ok after each request. At least :data:`MIN_REQUESTS` go to each daemon.

Valid examples are cheap on purpose: ``max_tokens`` 2 for the worker, and models that are not
there for rbees-orcd and pool-managerd, so an attack that happens to be valid costs a 404
instead of a generation, a download or a worker start.

Excluded (only wrong methods and paths that name nothing are sent there):
- rbees-workerd ``POST /v2/shutdown``: it takes no body, so any POST drains and stops the
  worker the rest of the test needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from starlette.routing import Route

from rbees_core import plugins
from rbees_core.api.pool import PoolHeartbeat
from rbees_core.programs import orcd, pool_managerd, workerd
from rbees_core.schema import from_mapping
from rbees_core.testing import WorkerHandle, find_free_port, wait_http
from rbees_core.testing.fuzz import Target, fire, route_table

BIN = Path(sys.executable).parent
MIN_REQUESTS = 500
#: Spread over the routes (those taking a body get more); well over the minimum, since
#: hypothesis stops early on a route whose attacks it has all drawn (an excluded one).
BUDGET = 1000
MISSING_MODEL = "no-such-model-fz"
#: rbees-orcd and pool-managerd run with a token, so that the attacks with a wrong one
#: (rbees_core.testing.fuzz.BAD_AUTH) meet the token check; the worker runs without.
TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POOL = "fz"  # the id the fuzz puts in most paths that take one (rbees_core.testing.fuzz)

def _daemon(name: str, home: Path, *args: str) -> Iterator[str]:
    port = find_free_port()
    proc = subprocess.Popen([str(BIN / name), "--bind", f"127.0.0.1:{port}", *args],
                            env={**os.environ, "RBEES_HOME": str(home),
                                 "RBEES_API_TOKEN": TOKEN},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=30, proc=proc)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def orcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _daemon("rbees-orcd", tmp_path_factory.mktemp("orcd-sfuzz"),
                       "--queue-capacity", "5000")


@pytest.fixture(scope="module")
def pool_url(tmp_path_factory: pytest.TempPathFactory, orcd_url: str) -> Iterator[str]:
    """pool-managerd ``fz``, registered with the fuzzed rbees-orcd so that its forwarding
    routes (``/v2/pools/fz/...``) reach a real pool and their bodies are checked."""
    yield from _daemon("pool-managerd", tmp_path_factory.mktemp("pool-sfuzz"),
                       "--pool-id", POOL, "--orchestrator", orcd_url,
                       "--heartbeat-interval", "0.5")


def _targets(program: Any, url: str, examples: dict[tuple[str, str], list[Any]],
             excluded: dict[tuple[str, str], str] | None = None) -> list[Target]:
    pm = plugins.make_manager(plugins.builtin_plugins())
    doc = httpx.get(f"{url}/openapi.json", headers=AUTH).json()
    return route_table(program.routes(pm, time.monotonic()), doc, examples=examples,
                       excluded=excluded)


def _fire(program: str, url: str, targets: list[Target],
          headers: dict[str, str] | None = None) -> None:
    began = time.monotonic()
    sent = fire(url, targets, total=BUDGET, headers=headers)
    total = sum(sent.values())
    print(f"{program}: {total} requests on {len(targets)} routes in "
          f"{time.monotonic() - began:.1f}s: {dict(sorted(sent.items()))}")
    assert total >= MIN_REQUESTS, (program, sent)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def _protocol_examples() -> dict[tuple[str, str], list[Any]]:
    """Valid bodies of the protocol plugins' routes (those installed), for an unknown model:
    Anthropic's Messages, OpenAI's Responses."""
    tools = [{"name": "add", "description": "a + b", "input_schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}]
    chat = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "add",
                                               "input": {"a": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1",
                                          "content": "2"}]}]
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "2"}]
    examples: dict[tuple[str, str], list[Any]] = {
        ("POST", "/v1/messages"): [
            {"model": MISSING_MODEL, "max_tokens": 2, "system": "Be brief.", "messages": chat,
             "tools": tools, "tool_choice": {"type": "auto"}, "stop_sequences": ["."]},
            {"model": MISSING_MODEL, "max_tokens": 2, "stream": True, "temperature": 0,
             "messages": [{"role": "user", "content": "Hi"}],
             "thinking": {"type": "enabled", "budget_tokens": 16}}],
        ("POST", "/v1/messages/count_tokens"): [
            {"model": MISSING_MODEL, "messages": [{"role": "user", "content": "Hi"}]}],
        ("POST", "/v1/responses/input_tokens"): [
            {"model": MISSING_MODEL, "input": "Hi", "instructions": "Be brief."}],
        ("POST", "/v1/responses"): [
            {"model": MISSING_MODEL, "input": "Hi", "instructions": "Be brief.",
             "max_output_tokens": 2, "temperature": 0},
            {"model": MISSING_MODEL, "input": items, "stream": True, "tool_choice": "auto",
             "tools": [{"type": "function", "name": "add", "parameters": {"type": "object"}}],
             "text": {"format": {"type": "json_object"}}}],
    }
    served = {(m, r.path) for r in orcd.routes(plugins.make_manager(plugins.builtin_plugins()),
                                                time.monotonic())
              if isinstance(r, Route) for m in (r.methods or ())}
    return {key: bodies for key, bodies in examples.items() if key in served}


def test_orcd_survives_structural_attacks_on_every_route(orcd_url: str, pool_url: str) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{orcd_url}/v2/pools/{POOL}", headers=AUTH).status_code != 200:
        assert time.monotonic() < deadline, "pool-managerd never registered"
        time.sleep(0.2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    state = httpx.get(f"{pool_url}/v2/state", headers=AUTH).json()
    beat = {**state, "seq": 10**9, "sent_at": time.time()}
    task = {"model": MISSING_MODEL, "max_tokens": 2, "temperature": 0.5, "seed": 1,
            "stop": ["."]}
    targets = _targets(orcd, orcd_url, {
        ("POST", "/v2/tasks"): [{**task, "prompt": "Hi"}, {**task, "messages": messages}],
        ("POST", "/v1/chat/completions"): [
            {"model": MISSING_MODEL, "messages": messages, "max_tokens": 2, "stream": False},
            {"model": MISSING_MODEL, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Hi"}]}], "max_tokens": 2, "stream": True,
             "stream_options": {"include_usage": True}, "n": 2, "stop": ".", "seed": 3}],
        ("POST", "/v1/completions"): [{"model": MISSING_MODEL, "prompt": "Hi",
                                       "max_tokens": 2, "temperature": 0}],
        **_protocol_examples(),
        ("POST", "/v2/pools/{pool_id}/heartbeat"): [beat],
        ("POST", "/v2/pools/{pool_id}/workers"): [{"model_ref": MISSING_MODEL, "slots": 1,
                                                   "device": "cpu", "ctx": 512}],
        ("POST", "/v2/pools/{pool_id}/models/download"): [{"model": MISSING_MODEL,
                                                           "force": False}],
    })
    _fire("rbees-orcd", orcd_url, targets, AUTH)


@pytest.mark.parametrize("query", [
    "/v2/tasks?limit=%C2%B2", "/v2/tasks?limit=" + "9" * 5000, "/v2/tasks?cursor=%C2%B2",
    "/v2/tasks?cursor=" + "9" * 19, "/v2/tasks/job-x/events?after=%C2%B2",
])
def test_orcd_numeric_queries_that_once_were_500s(orcd_url: str, query: str) -> None:
    """Found by this fuzz: "\u00b2" passes str.isdigit() and int() refuses it, int() refuses
    5,000 digits, and 19 nines overflow SQLite's INTEGER; each was a 500."""
    answer = httpx.get(f"{orcd_url}{query}", headers=AUTH)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "INVALID_PARAMS"


@pytest.mark.parametrize("seed", ["", "3", 1.5, [], None, True, 2**63 - 1, -1])
def test_orcd_v1_n_choices_with_any_seed_is_no_500(orcd_url: str, seed: Any) -> None:
    """Found by this fuzz: with n > 1 each choice got int(seed) + i, a 500 for a seed that
    is no integer. Now a bad seed is a 400 naming it, and a good one is accepted (the
    model is missing here: 404 once the checks pass)."""
    answer = httpx.post(f"{orcd_url}/v1/chat/completions", headers=AUTH, json={
        "model": MISSING_MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2, "n": 2, "seed": seed})
    assert answer.status_code in (400, 404), answer.text
    if answer.status_code == 400:
        assert answer.json()["error"]["param"] == "seed"


def test_orcd_refuses_a_heartbeat_it_could_not_list_again(orcd_url: str, pool_url: str
                                                         ) -> None:
    """Found by this fuzz's read-back: a heartbeat whose free-form ``models`` held 1e400 was
    accepted, and GET /v2/pools was a 500 until the pool's next heartbeat replaced it."""
    state = httpx.get(f"{pool_url}/v2/state", headers=AUTH).json()
    body = json.dumps({**state, "pool_id": "poisoned", "seq": 1, "sent_at": time.time(),
                       "models": [{"id": "x", "size_bytes": "HUGE"}]}).replace('"HUGE"', "1e400")
    answer = httpx.post(f"{orcd_url}/v2/pools/poisoned/heartbeat", headers=AUTH,
                        content=body.encode())
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["details"]["field"] == "size_bytes"
    assert httpx.get(f"{orcd_url}/v2/pools", headers=AUTH).status_code == 200


def test_orcd_refuses_a_heartbeat_whose_worker_error_fills_the_body(orcd_url: str,
                                                                     pool_url: str) -> None:
    """A pool's state is bounded field by field (rbees_core.api.pool): a worker error of
    900,000 characters, under the 1 MiB body cap, was kept and served on every GET
    /v2/pools. The real pool's own state meets every limit."""
    state = httpx.get(f"{pool_url}/v2/state", headers=AUTH).json()
    from_mapping(PoolHeartbeat, {**state, "seq": 1, "sent_at": time.time()})
    worker = {"worker_id": "w1", "model_ref": MISSING_MODEL, "backend": "llamacpp",
              "device": "cpu", "uri": "http://127.0.0.1:9", "pid": 1, "state": "failed",
              "slots_total": 1, "slots_free": None, "memory_bytes": 0, "started_at": 1.0,
              "error": "e" * 900_000}
    answer = httpx.post(f"{orcd_url}/v2/pools/bloated/heartbeat", headers=AUTH, json={
        **state, "pool_id": "bloated", "seq": 1, "sent_at": time.time(), "workers": [worker]})
    assert answer.status_code == 400, answer.text[:500]
    assert answer.json()["error"]["details"]["field"] == "workers[0].error"
    assert httpx.get(f"{orcd_url}/v2/pools/bloated", headers=AUTH).status_code == 404


def test_pool_managerd_survives_structural_attacks_on_every_route(pool_url: str) -> None:
    targets = _targets(pool_managerd, pool_url, {
        ("POST", "/v2/workers/start"): [{"model_ref": MISSING_MODEL, "slots": 1,
                                         "backend": "llamacpp", "device": "cpu", "ctx": 512}],
        ("POST", "/v2/models/download"): [{"model": MISSING_MODEL, "force": True}],
        ("POST", "/v2/internal/workers/ready"): [{
            "worker_id": "fz", "model_ref": MISSING_MODEL, "backend": "llamacpp",
            "device": "cpu", "uri": "http://127.0.0.1:9", "slots_total": 1, "memory_bytes": 0,
            "memory_kind": "ram", "pid": 1}],
    })
    _fire("pool-managerd", pool_url, targets, AUTH)


@pytest.mark.model
def test_workerd_survives_structural_attacks_on_every_route(worker: WorkerHandle) -> None:
    targets = _targets(workerd, worker.url, {
        ("POST", "/v2/execute"): [
            {"job_id": "fz", "prompt": "Hi", "max_tokens": 2, "temperature": 0},
            {"job_id": "fz", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
             "temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1,
             "stop": ["."], "seed": 7}],
        ("POST", "/v2/cancel"): [{"job_id": "fz"}],
    }, excluded={("POST", "/v2/shutdown"): "any POST stops the worker"})
    _fire("rbees-workerd", worker.url, targets)
    frames = worker.execute({"job_id": "after", "prompt": "Hi", "max_tokens": 2})
    assert frames[-1][1] == "end"


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[str]:
    """Its own rbees-orcd and pool ``fz``: the other tests drained and poked theirs."""
    for orcd_url in _daemon("rbees-orcd", tmp_path / "orcd", "--queue-capacity", "5000"):
        for _ in _daemon("pool-managerd", tmp_path / "pool", "--pool-id", POOL,
                         "--orchestrator", orcd_url, "--heartbeat-interval", "0.5"):
            deadline = time.monotonic() + 30
            while httpx.get(f"{orcd_url}/v2/pools/{POOL}", headers=AUTH).status_code != 200:
                assert time.monotonic() < deadline, "pool-managerd never registered"
                time.sleep(0.2)
            yield orcd_url


@pytest.mark.model
def test_orcd_jobs_through_a_real_worker_survive_the_attacks(fresh_cluster: str) -> None:
    """The same attacks with a model that is there: what passes rbees-orcd's checks is
    queued, a worker is started on pool ``fz`` and generates (max_tokens 2), so the whole
    path (orcd, pool, worker, chat template, relay) must answer each with a 4xx or serve
    it. Found this way: prompt \\"\\" was a 502 (the worker failed the empty batch)."""
    first = httpx.post(f"{fresh_cluster}/v1/completions", headers=AUTH, timeout=120,
                       json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
    assert first.status_code == 200, first.text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    routes = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
              ("POST", "/v2/tasks")}
    targets = [t for t in _targets(orcd, fresh_cluster, {
        ("POST", "/v2/tasks"): [{"model": "smollm2", "prompt": "Hi", "max_tokens": 2}],
        ("POST", "/v1/chat/completions"): [
            {"model": "smollm2", "messages": messages, "max_tokens": 2, "temperature": 0},
            {"model": "smollm2", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Hi"}]}], "max_tokens": 2, "stream": True,
             "stream_options": {"include_usage": True}, "n": 2, "stop": ".", "seed": 3,
             "top_p": 0.9}],
        ("POST", "/v1/completions"): [{"model": "smollm2", "prompt": "Hi", "max_tokens": 2,
                                       "temperature": 0.5}],
    }) if (t.method, t.path) in routes]
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"type": "array", "items": {"enum": [1]}}},
              "required": ["a"]}
    structured = {"model": "smollm2", "messages": messages, "max_tokens": 2,
                  "response_format": {"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": schema}}}
    targets = [attrs.evolve(t, examples=(*t.examples, structured))
               if t.path == "/v1/chat/completions" else t for t in targets]
    began = time.monotonic()
    sent = fire(fresh_cluster, targets, total=150, headers=AUTH, timeout=120)
    print(f"rbees-orcd through a worker: {sum(sent.values())} requests in "
          f"{time.monotonic() - began:.1f}s")
    assert sum(sent.values()) >= MIN_REQUESTS, sent
