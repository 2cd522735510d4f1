"""rbees-orcd's OpenAI-compatible API, driven by the official ``openai`` client."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from .test_orcd import Cluster, up


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("openai"))
    yield c
    c.rbees("down")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models_lists_the_embedded_default(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert "smollm2" in ids


def test_chat_completion_non_streaming_with_usage(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12, temperature=0, seed=5)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens <= 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + \
        answer.usage.completion_tokens
    again = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12, temperature=0, seed=5)
    assert again.choices[0].message.content == choice.message.content


def test_chat_streaming_with_include_usage_and_stop(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Count from 1 to 20."}],
        max_tokens=60, temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert len(pieces) > 3 and finish in ("stop", "length")
    assert usage is not None and len(pieces) <= usage.completion_tokens <= 60
    text = "".join(pieces)
    word = text.split()[2]
    stopped = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Count from 1 to 20."}],
        max_tokens=60, temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert word not in (stopped.choices[0].message.content or "")


def test_completions_and_n(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="smollm2", prompt="Bees are", max_tokens=8,
                                       temperature=0.9, seed=11, n=2)
    assert [c.index for c in answer.choices] == [0, 1]
    assert all(c.text for c in answer.choices)
    stream = client.completions.create(model="smollm2", prompt="Bees are", max_tokens=8,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)


def test_errors_come_in_openai_shape(client: openai.OpenAI, cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2", temperature=7,
                                       messages=[{"role": "user", "content": "x"}])
    assert bad.value.body is not None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", top_logprobs=3,  # without logprobs
                                       messages=[{"role": "user", "content": "x"}])
    raw = httpx.post(f"{cluster.url}/v1/chat/completions", content=b"{oops")
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_a_disconnected_stream_cancels_its_job(cluster: Cluster) -> None:
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=30, json={
            "model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
            "max_tokens": 3000, "temperature": 0, "stream": True}) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                break
    jobs = httpx.get(f"{cluster.url}/v2/tasks", params={"limit": 1}).json()["jobs"]
    job_id = jobs[0]["job_id"]
    for _ in range(100):
        if httpx.get(f"{cluster.url}/v2/tasks/{job_id}").json()["status"] == "cancelled":
            break
        time.sleep(0.05)
    assert httpx.get(f"{cluster.url}/v2/tasks/{job_id}").json()["status"] == "cancelled"
