"""``POST /v1/embeddings`` on a real ``rbees up`` cluster: the official ``openai`` client,
LangChain and LiteLLM, SmolLM2's vectors against llama-cpp-python's own, 32 inputs in one
forward pass, OpenAI-shaped refusals, and embedding workers kept apart from the others.

The pool gets one core per worker (``[placement] cpu_threads = 1``), so that a chat worker
and an embedding worker of SmolLM2 run side by side on the 2 cores of a small host instead
of stopping each other for their cores."""

from __future__ import annotations

import base64
import json
import math
import os
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .test_orcd import Cluster, up

TEXTS = ["Bees make honey.", "The stock market fell sharply today.",
         "Les abeilles font du miel. Café, naïve, 日本語 😀"]
REFERENCE = """
import json, sys
import llama_cpp
from rbees_core import plugins
from rbees_core.models import DEFAULT_MODEL_REF, resolve_model
path = resolve_model(plugins.make_manager(plugins.builtin_plugins()), DEFAULT_MODEL_REF)
ref = llama_cpp.Llama(path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                      n_ctx=2048, n_batch=2048, n_ubatch=2048, verbose=False)
print(json.dumps(ref.embed(json.loads(sys.argv[1]), normalize=True)))
"""
LITELLM = """
import json, sys
import litellm
answer = litellm.embedding(model="openai/smollm2", api_base=sys.argv[1], api_key="unused",
                           input=json.loads(sys.argv[2]))
print(json.dumps({"vectors": [d["embedding"] for d in answer.data],
                  "prompt_tokens": answer.usage.prompt_tokens}))
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("embeddings")
    config = home / "config.toml"
    config.write_text("[placement]\ncpu_threads = 1\n")
    before = os.environ.get("RBEES_CONFIG")
    os.environ["RBEES_CONFIG"] = str(config)
    try:
        c = up(home / "home")
    finally:
        if before is None:
            os.environ.pop("RBEES_CONFIG", None)
        else:
            os.environ["RBEES_CONFIG"] = before
    yield c
    c.rbees("down")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0,
                       timeout=300) as c:
        yield c


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return 1 - dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def reference(texts: list[str]) -> list[list[float]]:
    """llama-cpp-python's ``Llama(embedding=True).embed`` in a process of its own, with mean
    pooling (SmolLM2's GGUF names none: llama.cpp would give one vector per token) and
    normalised, as ``/v1/embeddings`` returns vectors."""
    done = subprocess.run([sys.executable, "-c", REFERENCE, json.dumps(texts)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    vectors: list[list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return vectors


def test_the_openai_client_float_and_base64_match_llama_cpp_python(
        client: openai.OpenAI) -> None:
    floats = client.embeddings.create(model="smollm2", input=TEXTS)
    assert floats.object == "list" and floats.model == "smollm2"
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert {d.object for d in floats.data} == {"embedding"}
    assert {len(d.embedding) for d in floats.data} == {576}
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(TEXTS)
    expected = reference(TEXTS)
    distances = [cosine_distance(d.embedding, e) for d, e in zip(floats.data, expected,
                                                                  strict=True)]
    assert max(distances) < 1e-4, distances
    # base64: little-endian float32; the SDK decodes it itself when it asked for it
    raw = client.embeddings.with_raw_response.create(model="smollm2", input=TEXTS,
                                                     encoding_format="base64")
    body = json.loads(raw.text)
    for item, float_item in zip(body["data"], floats.data, strict=True):
        packed = base64.b64decode(item["embedding"])
        values = struct.unpack(f"<{len(packed) // 4}f", packed)
        assert list(values) == float_item.embedding
    single = client.embeddings.create(model="smollm2", input=TEXTS[0])
    assert cosine_distance(single.data[0].embedding, floats.data[0].embedding) < 1e-6


def _embed_counters(cluster: Cluster) -> dict[str, float]:
    """The embedding counters of every embedding worker of the pool, summed."""
    out: dict[str, float] = {}
    for w in httpx.get(f"{cluster.pool_url}/v2/workers", timeout=10).json()["workers"]:
        if not w["embedding"] or w["state"] not in ("ready", "busy"):
            continue
        for line in httpx.get(f"{w['uri']}/metrics", timeout=10).text.splitlines():
            if line.startswith("rbees_worker_embed_") and "_total " in line:
                name, value = line.split()
                out[name] = out.get(name, 0.0) + float(value)
    return out


def test_thirty_two_inputs_run_as_one_forward_pass(cluster: Cluster) -> None:
    texts = [f"Bee number {i} visits a {'blue' if i % 2 else 'yellow'} flower." for i in
             range(32)]
    before = _embed_counters(cluster)
    answer = httpx.post(f"{cluster.url}/v1/embeddings", timeout=300,
                        json={"model": "smollm2", "input": texts})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-rbees-forward-passes"] == "1"
    after = _embed_counters(cluster)  # the worker's own count agrees
    assert after["rbees_worker_embed_forward_passes_total"] \
        - before.get("rbees_worker_embed_forward_passes_total", 0) == 1
    assert after["rbees_worker_embed_inputs_total"] \
        - before.get("rbees_worker_embed_inputs_total", 0) == 32
    body = answer.json()
    assert [d["index"] for d in body["data"]] == list(range(32))
    job_id = answer.headers["x-rbees-job-id"]
    record = cluster.job(job_id)  # a job of the queue like any other, usage kept
    assert record["status"] == "completed"
    assert record["tokens_in"] == body["usage"]["prompt_tokens"] and record["tokens_out"] == 0
    end = next(d for _, e, d in cluster.events(job_id) if e == "end")
    assert end["forward_passes"] == 1 and len(end["tokens"]) == 32
    # the vectors went to the client through the job's channel, not into the store
    db = Path(cluster.env["RBEES_HOME"]) / "orcd.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        stored = conn.execute("SELECT data FROM events WHERE job_id = ? AND event = 'end'",
                              (job_id,)).fetchone()[0]
    assert json.loads(stored)["forward_passes"] == 1 and "embeddings" not in stored


def test_langchain_openai_embeddings(cluster: Cluster) -> None:
    import langchain_openai  # a test dependency (dev extra): missing is a failure

    embedder = langchain_openai.OpenAIEmbeddings(
        model="smollm2", base_url=f"{cluster.url}/v1", api_key="unused",  # type: ignore[arg-type]
        check_embedding_ctx_length=False, max_retries=0)
    documents = embedder.embed_documents(TEXTS)
    query = embedder.embed_query(TEXTS[0])
    assert len(documents) == 3 and {len(v) for v in documents} == {576}
    assert cosine_distance(query, documents[0]) < 1e-6


def test_litellm_openai_provider(cluster: Cluster) -> None:
    """In a process of its own, as the tools test runs it (importing litellm breaks later
    tests of the same process)."""
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", LITELLM, f"{cluster.url}/v1", json.dumps(TEXTS)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out["vectors"]) == 3 and out["prompt_tokens"] > 3
    assert {len(v) for v in out["vectors"]} == {576}


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": ["fine", ""]}, 400, "input"),
    ({"input": [1, 2, 3]}, 400, "input"),
    ({"input": [[1, 2], [3]]}, 400, "input"),
    ({"input": ["a", 3]}, 400, "input"),
    ({"input": {"text": "a"}}, 400, "input"),
    ({"input": None}, 400, "input"),
    ({"input": ["bee"] * 257}, 400, "input"),
    ({"input": "bee", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "bee", "dimensions": 64}, 400, "dimensions"),
    ({"input": "bee", "model": 7}, 400, "model"),
    ({"input": "bee", "model": "no-such-model"}, 404, "model"),
    ({"input": ["a\x00b"]}, 400, "input"),
    ({"input": "x" * 100_001}, 400, "input"),
    ({"input": True}, 400, "input"),
    ({"input": [["bee"]]}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": "bee " * 3000}, 400, "input"),  # more tokens than the worker's batch
])
def test_bad_requests_are_openai_shaped_4xx(cluster: Cluster, body: dict[str, Any],
                                            status: int, param: str | None) -> None:
    answer = httpx.post(f"{cluster.url}/v1/embeddings", json={"model": "smollm2", **body},
                        timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_harmless_fields_are_accepted(client: openai.OpenAI) -> None:
    answer = client.embeddings.create(model="smollm2", input=["bee"], user="someone",
                                      encoding_format="float")
    assert len(answer.data) == 1


def test_not_json_is_a_400(cluster: Cluster) -> None:
    answer = httpx.post(f"{cluster.url}/v1/embeddings", content=b"{nope", timeout=30,
                        headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "error" in answer.json()


def test_chat_and_embedding_jobs_never_share_a_worker(cluster: Cluster,
                                                      client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="smollm2", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Hi"}])
    embedded = httpx.post(f"{cluster.url}/v1/embeddings", timeout=300,
                          json={"model": "smollm2", "input": "Hi"})
    assert chat.choices[0].message.content is not None and embedded.status_code == 200
    workers = {w["worker_id"]: w for w in
               httpx.get(f"{cluster.pool_url}/v2/workers", timeout=10).json()["workers"]}
    chat_worker = cluster.job("job-" + chat.id.removeprefix("chatcmpl-"))["worker_id"]
    embed_worker = cluster.job(embedded.headers["x-rbees-job-id"])["worker_id"]
    assert workers[chat_worker]["embedding"] is False
    assert workers[embed_worker]["embedding"] is True
    ready = httpx.get(f"{workers[embed_worker]['uri']}/v2/ready", timeout=10).json()
    assert ready["embedding"] is True
    # the embedding worker refuses generation, whoever sends it
    refused = httpx.post(f"{workers[embed_worker]['uri']}/v2/execute", timeout=10,
                         json={"job_id": "job-direct", "prompt": "Hi"})
    assert refused.status_code == 400 and "embeddings only" in refused.text
    refused = httpx.post(f"{workers[chat_worker]['uri']}/v2/embed", timeout=10,
                         json={"job_id": "job-direct", "input": ["Hi"]})
    assert refused.status_code == 400 and "--embedding" in refused.text
    listed = cluster.rbees("jobs", "list", "--format", "json")
    assert listed.returncode == 0 and embedded.headers["x-rbees-job-id"] in listed.stdout
    why = cluster.rbees("jobs", "why", embedded.headers["x-rbees-job-id"])
    assert why.returncode == 0, why.stderr


def test_with_every_core_held_the_other_kind_of_worker_makes_room(
        tmp_path: Path) -> None:
    """Default placement: a worker takes every free core. An embedding request after a chat
    on a pool of one model stops the idle chat worker for an embedding one, and a chat
    after it the reverse, rather than waiting for the idle timeout."""
    c = up(tmp_path / "home")
    try:
        with openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0,
                           timeout=120) as client:
            for _ in range(2):
                chat = client.chat.completions.create(
                    model="smollm2", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
                assert chat.choices[0].finish_reason in ("stop", "length")
                vectors = client.embeddings.create(model="smollm2", input="Hi")
                assert len(vectors.data[0].embedding) == 576
    finally:
        c.rbees("down")
