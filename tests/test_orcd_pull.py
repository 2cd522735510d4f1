"""Pull on first use (issue 22 item 1), on a real cluster (``rbees up``) whose pool
downloads from a loopback hub serving the real SmolLM2 file: the first requests for a
model no pool holds stream ``downloading`` progress (events on ``/v2``, SSE comments on
``/v1``), then tokens; two of them cause one download; a later one none; a failed download
ends the waiting job with ``MODEL_DOWNLOAD_FAILED``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pluggy
import pytest

from rbees_core.testing import follow_events
from rbees_core.testing.hub import FakeHub
from tests.test_orcd import Cluster, up

REPO = "rbees-test/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REF = f"hf:{REPO}/{FILE}"
#: a catalog id (a test catalog, ``[pool] catalog_file``) whose source is ``REF``
MODEL = "smol-hub"
#: the hub sends the 98 MB file at this rate: a download of about 4 s, long enough to
#: watch its progress on a loaded 2-core machine, short enough for a test
RATE_BPS = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    from rbees_core import plugins
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    pm: pluggy.PluginManager = plugins.make_manager(plugins.builtin_plugins())
    data = Path(resolve_model(pm, DEFAULT_MODEL_REF)).read_bytes()
    server = FakeHub(throttle_bps=RATE_BPS).start()
    server.add(REPO, FILE, data)
    server.add(REPO, "copy-" + FILE, data)  # another model, for the CLI's download
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("pull")
    catalog = root / "catalog.toml"
    size = len(hub.repos[REPO][FILE].content)
    catalog.write_text(f'[[models]]\nid = "{MODEL}"\nname = "SmolLM2 from the hub"\n'
                       f'hf_repo = "{REPO}"\nhf_file = "{FILE}"\nsize_bytes = {size}\n'
                       f'context_length = 8192\nlicense = "apache-2.0"\n'
                       f'sources = ["{REF}"]\n', encoding="utf-8")
    c = up(root / "home", environ={"HF_ENDPOINT": hub.endpoint,
                                   "RBEES_POOL_CATALOG_FILE": str(catalog)})
    yield c
    c.rbees("down")


def cdn_gets(hub: FakeHub) -> int:
    """Requests for the file's bytes: one download makes one (or a few ranged ones)."""
    return sum(1 for r in hub.requests if r.server == "cdn" and r.method == "GET")


def test_first_requests_download_once_with_progress_then_tokens(cluster: Cluster,
                                                                hub: FakeHub) -> None:
    before = cdn_gets(hub)
    v1: dict[str, str] = {}

    def openai_stream() -> None:  # the OpenAI stream: comments while downloading
        with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", timeout=120, json={
                "model": MODEL, "stream": True, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hi"}]}) as answer:
            v1["status"] = str(answer.status_code)
            v1["body"] = answer.read().decode()

    reader = threading.Thread(target=openai_stream, daemon=True)
    reader.start()
    job = cluster.submit(model=MODEL)  # the second first request, at once
    live = follow_events(f"{cluster.url}/v2/tasks/{job['job_id']}/events", timeout=120)
    why = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not live.first_token.is_set():
        if any(e == "downloading" for _, e, _ in live.seen) and not why:
            answer = httpx.get(f"{cluster.url}/v2/tasks/{job['job_id']}/decision", timeout=30)
            why = answer.json()["explanation"]
        time.sleep(0.05)
    assert live.first_token.wait(90), live.seen
    live.thread.join(60)
    reader.join(90)
    events = [e for _, e, _ in live.seen]
    progress = [d for _, e, d in live.seen if e == "downloading"]
    assert progress, events
    assert {tuple(sorted(p)) for p in progress} == {("bytes", "model", "pool_id", "total")}
    assert all(p["model"] == MODEL for p in progress)
    assert progress[-1]["bytes"] == progress[-1]["total"] == len(
        hub.repos[REPO][FILE].content)
    assert events.index("downloading") < events.index("token") and events[-1] == "end"
    # throttled: at most 4 a second (and the final one)
    span = live.seen[-1][0] - live.seen[0][0]
    assert len(progress) <= 4 * span + 3, (len(progress), span)
    assert f"downloading {MODEL} to pool" in why and "bytes)" in why, why
    assert v1.get("status") == "200", v1
    body = v1["body"]
    assert f": downloading {MODEL} to pool" in body, body[:2000]
    frames = body.split("\n\n")
    first_comment = next(i for i, f in enumerate(frames) if f.startswith(": downloading"))
    first_text = next(i for i, f in enumerate(frames) if f.startswith("data: {")
                      and json.loads(f[6:])["choices"]
                      and json.loads(f[6:])["choices"][0]["delta"].get("content"))
    assert first_comment < first_text and frames[-2] == "data: [DONE]", frames
    assert cdn_gets(hub) - before == 1  # two first requests, one download

    # later requests, by catalog id or by its hf: reference, find the model on the pool: no
    # download, no progress
    for name in (MODEL, REF):
        again = cluster.submit(model=name)
        seen = cluster.events(again["job_id"])
        assert "downloading" not in [e for _, e, _ in seen] and seen[-1][1] == "end", seen
    assert cdn_gets(hub) - before == 1


def test_a_failed_download_ends_the_waiting_job_retriable(cluster: Cluster,
                                                          hub: FakeHub) -> None:
    missing = f"hf:{REPO}/not-there.Q4_1.gguf"
    t0 = time.monotonic()
    job = cluster.submit(model=missing)
    events = cluster.events(job["job_id"])
    assert events[-1][1] == "error", events
    error = events[-1][2]
    assert error["code"] == "MODEL_DOWNLOAD_FAILED" and error["retriable"] is True, error
    assert missing in error["message"]
    assert time.monotonic() - t0 < 30
    # asked again at once: it ends with the same error, without a new download
    asked = len(hub.requests)
    again = cluster.submit(model=missing)
    ended = cluster.events(again["job_id"])
    assert ended[-1][2]["code"] == "MODEL_DOWNLOAD_FAILED", ended
    assert len(hub.requests) == asked
    # an OpenAI client gets a 503 it may retry after the hold
    answer = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=60, json={
        "model": f"hf:{REPO}/also-missing.gguf", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "model_download_failed"
    assert int(answer.headers["retry-after"]) >= 1


def test_the_cli_tells_how_far_the_download_is(cluster: Cluster) -> None:
    done = cluster.rbees("jobs", "submit", "--model", f"hf:{REPO}/copy-{FILE}", "--prompt",
                         "Bees are", "--max-tokens", "4", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    told = [line for line in done.stderr.splitlines() if line.startswith("downloading ")]
    assert told and f"copy-{FILE} to pool" in told[-1], done.stderr
    assert len(told) <= 11  # at each tenth, not at every event
    assert done.stdout.strip()
