"""OpenAI's Files API beside the Batch API (issue 28): ``GET /v1/files``,
``GET /v1/files/{id}``, ``DELETE /v1/files/{id}`` in OpenAI's shapes, driven by the official
``openai`` client; files and batches belong to the key that made them: a key with
``inference`` alone lists, reads, cancels and deletes its own only (another's is 404, as
an unknown one), ``admin`` and the operator see all (the routes need ``inference``, which
``read`` lacks). rbees-orcd runs in-process, no pool."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from rbees_core.orchestrator.service import OrchestratorService
from tests.test_auth_matrix import TOKEN, orcd_client  # noqa: F401 (a fixture)

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "smollm2", "max_tokens": 2,
                 "messages": [{"role": "user", "content": "hi"}]}}


def _client(http: httpx.AsyncClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://orcd.test/v1", api_key=key, max_retries=0,
                              http_client=httpx.AsyncClient(transport=http._transport,
                                                            base_url="http://orcd.test"))


async def test_files_list_retrieve_delete_and_each_key_sees_its_own(
        orcd_client: tuple[httpx.AsyncClient, OrchestratorService]) -> None:  # noqa: F811
    http, svc = orcd_client
    keys = svc.keys
    made = {}
    for name, scope in (("alice", "inference"), ("bob", "inference"), ("boss", "admin")):
        made[name] = (await asyncio.to_thread(keys.create, name, [scope]))[1]
    alice, bob = _client(http, made["alice"]), _client(http, made["bob"])
    boss, operator = _client(http, made["boss"]), _client(http, TOKEN)
    content = (json.dumps(LINE) + "\n").encode()
    a1 = await alice.files.create(file=("a1.jsonl", content), purpose="batch")
    a2 = await alice.files.create(file=("a2.jsonl", content), purpose="batch")
    b1 = await bob.files.create(file=("b1.jsonl", content), purpose="batch")
    assert (a1.object, a1.purpose, a1.filename, a1.bytes) == ("file", "batch", "a1.jsonl",
                                                              len(content))

    async def ids(client: openai.AsyncOpenAI, **kwargs: Any) -> list[str]:
        return [f.id async for f in client.files.list(**kwargs)]

    assert await ids(alice) == [a2.id, a1.id]  # newest first
    assert await ids(bob) == [b1.id]
    assert await ids(boss) == await ids(operator) == [b1.id, a2.id, a1.id]
    assert await ids(operator, order="asc") == [a1.id, a2.id, b1.id]
    assert await ids(operator, purpose="batch_output") == []
    page = await operator.files.list(limit=1)
    assert [f.id for f in page.data] == [b1.id] and page.has_more
    assert (await alice.files.retrieve(a1.id)).id == a1.id
    assert (await boss.files.retrieve(a1.id)).filename == "a1.jsonl"
    with pytest.raises(openai.NotFoundError):
        await bob.files.retrieve(a1.id)
    with pytest.raises(openai.NotFoundError):
        await bob.files.content(a1.id)
    with pytest.raises(openai.NotFoundError):
        await bob.files.delete(a1.id)
    with pytest.raises(openai.BadRequestError):  # another's file makes no batch of bob's
        await bob.batches.create(input_file_id=a1.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")

    batch = await alice.batches.create(input_file_id=a1.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
    assert [b.id async for b in alice.batches.list()] == [batch.id]
    assert [b.id async for b in bob.batches.list()] == []
    assert [b.id async for b in boss.batches.list()] == [batch.id]
    with pytest.raises(openai.NotFoundError):
        await bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await bob.batches.cancel(batch.id)
    assert (await boss.batches.retrieve(batch.id)).request_counts.total == 1

    deleted = await alice.files.delete(a2.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (a2.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        await alice.files.retrieve(a2.id)
    with pytest.raises(openai.NotFoundError):
        await alice.files.delete(a2.id)
    assert await ids(alice) == [a1.id]
    cancelled = await alice.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    for _ in range(200):  # its error file, once cancelled, is alice's too
        done = await alice.batches.retrieve(batch.id)
        if done.status == "cancelled":
            break
        await asyncio.sleep(0.05)
    assert done.status == "cancelled" and done.error_file_id
    assert (await alice.files.retrieve(done.error_file_id)).purpose == "batch_output"
    with pytest.raises(openai.NotFoundError):
        await bob.files.retrieve(done.error_file_id)
    bad = await http.get("/v1/files", params={"order": "sideways"},
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "order"


async def test_an_upload_over_the_limit_is_413_in_openais_shape(
        orcd_client: tuple[httpx.AsyncClient, OrchestratorService],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An upload whose Content-Length passes the limit: 413, OpenAI's error naming
    ``file``, and nothing stored (the limit lowered to 256 bytes here)."""
    from rbees_core.programs import orcd_batches

    monkeypatch.setattr(orcd_batches, "MAX_FILE_BYTES", 256)
    http, _ = orcd_client
    operator = _client(http, TOKEN)
    big = (json.dumps(LINE) + "\n").encode() * 4
    with pytest.raises(openai.APIStatusError) as refused:
        await operator.files.create(file=("big.jsonl", big), purpose="batch")
    assert refused.value.status_code == 413
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "file", error
    assert "the upload is" in error["message"] and "the limit is 256" in error["message"]
    assert [f.id async for f in operator.files.list()] == []
