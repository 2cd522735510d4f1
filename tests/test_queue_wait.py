"""rbees-orcd's ``[orchestrator]`` section and what OpenAI clients get from a queue that
does not move (issue 22, items 2 and 8): a maximum queue wait, then 503 with Retry-After;
a client that goes away takes its queued job with it.

One rbees-orcd without a pool: a job for a catalog model waits in the queue (for a download
nobody starts) for as long as a test likes. Its settings come from a config file and an
environment variable, which these tests see take effect.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from rbees_core.testing import find_free_port, wait_http

from .test_orcd import BIN

MAX_WAIT_S = 1.0
CHAT = {"model": "tinyllama", "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4}


@pytest.fixture(scope="module")
def orcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("queue-wait")
    config = home / "config.toml"
    config.write_text(f"[orchestrator]\nmax_queue_wait_s = {MAX_WAIT_S}\n"
                      "queue_capacity = 50\nsse_ping_interval_s = 0.2\n")
    port = find_free_port()
    env = {**os.environ, "RBEES_HOME": str(home), "RBEES_CONFIG": str(config),
           "RBEES_ORCHESTRATOR_QUEUE_CAPACITY": "2"}  # the variable beats the file
    env.pop("RBEES_API_TOKEN", None)
    env.pop("RBEES_SSE_PING_INTERVAL", None)
    proc = subprocess.Popen([str(BIN / "rbees-orcd"), "--bind", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=30, proc=proc)
    yield url
    proc.terminate()
    proc.wait(30)


def queued(url: str) -> list[str]:
    jobs = httpx.get(f"{url}/v2/tasks", params={"status": "queued", "limit": 50},
                     timeout=10).json()["jobs"]
    return [j["job_id"] for j in jobs]


def cancelled(url: str) -> int:
    return len(httpx.get(f"{url}/v2/tasks", params={"status": "cancelled", "limit": 50},
                         timeout=10).json()["jobs"])


def no_queued_job_within(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not queued(url):
            return True
        time.sleep(0.05)
    return False


def test_an_openai_request_waits_at_most_max_queue_wait_then_503(orcd: str) -> None:
    with openai.OpenAI(base_url=f"{orcd}/v1", api_key="unused", max_retries=0) as client:
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as late:
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        took = time.monotonic() - t0
    assert late.value.status_code == 503 and late.value.code == "deadline_unmet"
    assert int(late.value.response.headers["retry-after"]) >= 1
    assert "waited 1." in late.value.message and "max_queue_wait_s" in late.value.message
    assert MAX_WAIT_S <= took < MAX_WAIT_S + 1.5, f"503 after {took:.2f} s"
    assert not queued(orcd)


def test_the_environment_beats_the_config_file(orcd: str) -> None:
    """RBEES_ORCHESTRATOR_QUEUE_CAPACITY=2 over the file's 50: the third job is a 429."""
    body = {"model": "tinyllama", "prompt": "x"}
    ids = [httpx.post(f"{orcd}/v2/tasks", json=body, timeout=10).json()["job_id"]
           for _ in range(2)]
    full = httpx.post(f"{orcd}/v2/tasks", json=body, timeout=10)
    assert full.status_code == 429 and full.json()["error"]["code"] == "QUEUE_FULL"
    for job_id in ids:  # /v2 jobs are durable: they wait on (no max queue wait) until cancelled
        assert httpx.post(f"{orcd}/v2/tasks/{job_id}/cancel", timeout=10).status_code == 202
    assert not queued(orcd)


def test_a_client_that_goes_away_leaves_no_queued_job(orcd: str) -> None:
    """Not streamed: the client's read times out and it closes the connection; its job is
    cancelled (not ended by the maximum queue wait)."""
    before = cancelled(orcd)
    with httpx.Client(timeout=httpx.Timeout(10.0, read=0.5)) as client, \
            pytest.raises(httpx.ReadTimeout):
        client.post(f"{orcd}/v1/chat/completions", json=CHAT)
    assert no_queued_job_within(orcd, 2.0), queued(orcd)
    assert cancelled(orcd) == before + 1


def test_a_streaming_client_that_goes_away_leaves_no_queued_job(orcd: str) -> None:
    """Streamed: the client reads the role chunk and a ping or two, then hangs up."""
    before = cancelled(orcd)
    with httpx.Client(timeout=10.0) as client, client.stream(
            "POST", f"{orcd}/v1/chat/completions", json={**CHAT, "stream": True}) as answer:
        assert answer.status_code == 200
        seen = b""
        for chunk in answer.iter_raw():
            seen += chunk
            if b": ping" in seen and queued(orcd):
                break
    assert no_queued_job_within(orcd, 2.0), queued(orcd)
    assert cancelled(orcd) == before + 1
