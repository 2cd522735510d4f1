"""Slots before copies, through rbees-orcd after a plain ``rbees up``: concurrent requests
for one model are batched in the slots of one worker; no second copy of the model starts."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .test_orcd import Cluster, up


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("slots") / "home")
    yield c
    c.rbees("down")


def chat(url: str, n: int) -> str:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="smollm2", stream=True, max_tokens=32, temperature=0, seed=n,
            messages=[{"role": "user", "content": f"Name {n + 2} kinds of bees."}])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_four_concurrent_streams_fill_one_worker_and_start_no_copy(cluster: Cluster) -> None:
    assert httpx.get(f"{cluster.pool_url}/v2/workers").json()["workers"] == []
    with concurrent.futures.ThreadPoolExecutor(4) as run:
        texts = list(run.map(lambda n: chat(cluster.url, n), range(4)))
    assert all(t.strip() for t in texts)
    workers = httpx.get(f"{cluster.pool_url}/v2/workers").json()["workers"]
    assert len(workers) == 1, workers  # no second copy of the model
    (worker,) = workers
    assert worker["slots_total"] == 4 and worker["state"] in ("ready", "busy")
    assert worker["cpus"] and not worker["cpu_shared"]  # the pool's cores, its own
    jobs = httpx.get(f"{cluster.url}/v2/tasks", params={"limit": 10}).json()["jobs"]
    assert len(jobs) == 4
    assert {(j["status"], j["worker_id"]) for j in jobs} == {("completed", worker["worker_id"])}


def test_the_slot_count_is_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[placement]\ncpu_slots = 2\nctx = 512\n")
    monkeypatch.setenv("RBEES_CONFIG", str(config))
    c = up(tmp_path / "home")
    try:
        assert chat(c.url, 0).strip()
        (worker,) = httpx.get(f"{c.pool_url}/v2/workers").json()["workers"]
        assert worker["slots_total"] == 2
    finally:
        c.rbees("down")
