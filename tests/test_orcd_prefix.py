"""Prefix-aware routing through rbees-orcd after a plain ``rbees up``: with two replicas of a
model running, the second turn of a chat goes to the worker that ran the first (its slots
hold the first turn's tokens), not where the policy's own order would put it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from .test_orcd import Cluster, up

MESSAGES = [{"role": "system", "content": "You are a beekeeper who answers briefly. " * 8},
            {"role": "user", "content": "Why do bees make honey in hexagons?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("prefix") / "home")
    yield c
    c.rbees("down")


def chat(url: str, messages: list[dict[str, str]], tokens: int,
         started: threading.Event | None = None) -> tuple[str, str]:
    """``(job id, text)`` of an OpenAI chat through rbees-orcd; ``started`` is set at the
    first chunk."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="smollm2", stream=True, max_tokens=tokens, temperature=0, seed=1,
            messages=messages)  # type: ignore[arg-type]
        text, ident = [], ""
        for chunk in stream:
            ident = chunk.id
            if started is not None:
                started.set()
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
    return "job-" + ident.split("-", 1)[1], "".join(text)


def ready_in_orcd(c: Cluster, n: int) -> list[dict[str, Any]]:
    """The orchestrator's view of the pool once it knows ``n`` ready workers."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pools = httpx.get(f"{c.url}/v2/pools", timeout=10).json()["pools"]
        workers = [w for p in pools for w in p.get("workers") or ()
                   if w.get("state") in ("ready", "busy")]
        if len(workers) >= n:
            return workers
        time.sleep(0.2)
    raise TimeoutError(f"rbees-orcd does not know {n} ready workers")


def test_the_second_turn_of_a_chat_goes_where_the_first_ran(cluster: Cluster) -> None:
    c = cluster
    chat(c.url, [{"role": "user", "content": "Hi"}], 2)  # rbees-orcd starts a worker
    (first,) = httpx.get(f"{c.pool_url}/v2/workers", timeout=10).json()["workers"]
    started = httpx.post(f"{c.pool_url}/v2/workers/start", timeout=60, json={
        "model_ref": first["model_ref"], "slots": first["slots_total"]})
    assert started.status_code in (200, 201, 202), started.text
    ready_in_orcd(c, 2)

    # a long job takes a slot of one replica, so that the first turn goes to the other
    # (more free slots); the second turn comes when both are idle again, when the policy's
    # own order (a tie: the first worker id) would send it to the long job's replica
    running = threading.Event()
    out: dict[str, str] = {}
    long = threading.Thread(target=lambda: out.update(
        long=chat(c.url, [{"role": "user", "content": "Count to 300."}], 160, running)[0]))
    long.start()
    assert running.wait(120)
    turn1, answer = chat(c.url, MESSAGES, 16)
    long.join(180)
    deadline = time.monotonic() + 30
    while c.job(out["long"])["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # its slot is given back
    turn2, _ = chat(c.url, [*MESSAGES, {"role": "assistant", "content": answer},
                            {"role": "user", "content": "And why wax?"}], 8)

    busy_one = c.job(out["long"])["worker_id"]
    where = c.job(turn1)["worker_id"]
    assert where != busy_one  # the setup: turn 1 went to the idle replica
    assert c.job(turn2)["worker_id"] == where
    decision = httpx.get(f"{c.url}/v2/tasks/{turn2}/decision", timeout=10).json()
    assert "of this prompt's prefix" in decision["explanation"], decision["explanation"]
