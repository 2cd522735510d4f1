"""OpenAI's Batch API on a real ``rbees up`` cluster (issue 28 item 1): the official
``openai`` client uploads a JSONL file, makes a batch, polls it and downloads its output;
every ``custom_id`` is answered once, with what the same request made alone answers (same
seed); bad input is an OpenAI-shaped 4xx or a line of the error file, never a 5xx; a
batch survives a SIGKILL of rbees-orcd halfway with no line answered twice or lost."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from rbees_core.testing import wait_http
from rbees_core.testing.cluster import BIN, Cluster, up

pytestmark = pytest.mark.model
CHAT = "/v1/chat/completions"


def _line(i: int, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": CHAT,
            "body": {"model": "smollm2", "max_tokens": 8, "temperature": 0, "seed": i,
                     "messages": [{"role": "user", "content": f"Count from {i}:"}], **body}}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def _client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)


def _run(client: openai.OpenAI, lines: list[dict[str, Any]], timeout: float = 300,
         **create: Any) -> Any:
    uploaded = client.files.create(file=("batch.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                  completion_window="24h", **create)
    return _wait(client, batch.id, timeout)


def _wait(client: openai.OpenAI, batch_id: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} not done after {timeout} s: {batch.status}")


def _results(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x]


def test_a_batch_end_to_end_matches_the_requests_made_alone(rbees_cluster: Cluster) -> None:
    client = _client(rbees_cluster)
    lines = [_line(i) for i in range(12)]
    batch = _run(client, lines)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 12 and batch.request_counts.completed == 12
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at
    out = _results(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(x["custom_id"] for x in lines)
    for line, result in zip(lines, out, strict=True):  # in the input's order
        assert result["custom_id"] == line["custom_id"] and result["error"] is None
        assert result["response"]["status_code"] == 200
        alone = client.chat.completions.create(**line["body"])
        body = result["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == alone.choices[0].message.content
        assert body["usage"]["completion_tokens"] == alone.usage.completion_tokens
    # the objects as the SDK reads them
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert client.batches.list(limit=5).data[0].id == batch.id


def test_bad_input_is_a_4xx_or_a_line_of_the_error_file(rbees_cluster: Cluster) -> None:
    client = _client(rbees_cluster)
    with pytest.raises(openai.BadRequestError) as wrong_purpose:
        client.files.create(file=("a.jsonl", _jsonl([_line(0)])), purpose="assistants")
    assert wrong_purpose.value.body["param"] == "purpose"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", b'{"custom_id": "x"}\n{not json\n'),
                            purpose="batch")
    good = client.files.create(file=("a.jsonl", _jsonl([_line(0)])), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=good.id, endpoint="/v1/responses",
                              completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=good.id, endpoint=CHAT,
                              completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file_nope", endpoint=CHAT,
                              completion_window="24h")
    twice = client.files.create(file=("a.jsonl", _jsonl([_line(0), _line(0)])),
                                purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=twice.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file_nope")
    # lines its route would refuse, or for another url: the error file, status_code 4xx
    bad = [
        _line(0),
        {**_line(1), "url": "/v1/embeddings"},
        {**_line(2), "url": "/v1/nothing"},
        {**_line(3), "method": "GET"},
        _line(4, messages=[]),
        _line(5, model="no-such-model"),
        _line(6, n=99),
    ]
    batch = _run(client, bad)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 6)
    assert [r["custom_id"] for r in _results(client, batch.output_file_id)] == ["req-0"]
    errors = _results(client, batch.error_file_id)
    assert [r["custom_id"] for r in errors] == [f"req-{i}" for i in range(1, 7)]
    for r in errors:
        assert 400 <= r["response"]["status_code"] < 500, r
        assert set(r["response"]["body"]["error"]) == {"message", "type", "param", "code"}


def test_cancel_and_list(rbees_cluster: Cluster) -> None:
    client = _client(rbees_cluster)
    uploaded = client.files.create(file=("c.jsonl", _jsonl(
        [_line(i, max_tokens=64) for i in range(40)])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                  completion_window="24h", metadata={"note": "cancel me"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {
        "note": "cancel me"}
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = _wait(client, batch.id, 300)
    assert done.status == "cancelled" and done.cancelled_at
    answered = _results(client, done.output_file_id) + _results(client, done.error_file_id)
    assert sorted(r["custom_id"] for r in answered) == sorted(f"req-{i}" for i in range(40))
    assert done.request_counts.completed + done.request_counts.failed == 40
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(_run(client, [_line(0)]).id)
    # pagination: newest first, after the last id of a page
    first = client.batches.list(limit=1)
    assert first.has_more and first.data[0].id != batch.id
    second = httpx.get(f"{rbees_cluster.url}/v1/batches",
                       params={"limit": 1, "after": first.data[0].id}).json()
    assert second["data"][0]["id"] == batch.id and second["object"] == "list"


def test_a_sigkill_of_rbees_orcd_halfway_loses_no_line_and_answers_none_twice(
        tmp_path: Path) -> None:
    cluster = up(tmp_path)
    restarted: subprocess.Popen[bytes] | None = None
    try:
        client = _client(cluster)
        # 200 lines (the acceptance); RBEES_BATCH_LINES=40 for a quicker look
        n = int(os.environ.get("RBEES_BATCH_LINES", "200"))
        lines = [_line(i, max_tokens=4) for i in range(n)]
        uploaded = client.files.create(file=("k.jsonl", _jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint=CHAT,
                                      completion_window="24h")
        started = time.monotonic()
        while client.batches.retrieve(batch.id).request_counts.completed < n // 2:
            assert time.monotonic() - started < 900  # 2 loaded cores: ~3 s a line
            time.sleep(0.2)
        pid = int((tmp_path / "run" / "rbees-orcd.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        port = cluster.url.rsplit(":", 1)[1]
        restarted = subprocess.Popen([str(BIN / "rbees-orcd"), "--bind", f"127.0.0.1:{port}",
                                      "--heartbeat-interval", "0.5"], env=cluster.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{cluster.url}/health", timeout=30, proc=restarted)
        done = _wait(client, batch.id, 1200)
        took = time.monotonic() - started
        assert done.status == "completed", done
        out = _results(client, done.output_file_id)
        assert [r["custom_id"] for r in out] == [x["custom_id"] for x in lines], \
            _results(client, done.error_file_id)
        assert done.request_counts.completed == n and done.request_counts.failed == 0
        db = sqlite3.connect(tmp_path / "orcd.sqlite3")
        answered = db.execute("SELECT count(*), count(DISTINCT custom_id) FROM batch_lines "
                              "WHERE batch_id = ? AND result IS NOT NULL", (batch.id,)).fetchone()
        assert answered == (n, n)
        print(f"{n}-line batch with a SIGKILL of rbees-orcd halfway: {took:.1f} s")
    finally:
        if restarted is not None:
            restarted.terminate()
            restarted.wait(30)
        cluster.rbees("down")


def test_the_rbees_batches_commands(rbees_cluster: Cluster, tmp_path: Path) -> None:
    source = tmp_path / "lines.jsonl"
    source.write_bytes(_jsonl([_line(i) for i in range(3)]))
    done = rbees_cluster.rbees("batches", "submit", str(source), "--wait", "--format", "json")
    assert done.returncode == 0, done.stderr
    batch = json.loads(done.stdout)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    listed = rbees_cluster.rbees("batches", "list", "--format", "json")
    assert batch["id"] in [b["id"] for b in json.loads(listed.stdout)]
    status = rbees_cluster.rbees("batches", "status", batch["id"])
    assert "completed" in status.stdout, status.stderr
    results = rbees_cluster.rbees("batches", "results", batch["id"])
    assert [json.loads(x)["custom_id"] for x in results.stdout.splitlines()] == [
        "req-0", "req-1", "req-2"]
    assert rbees_cluster.rbees("batches", "results", batch["id"], "--errors").stdout == ""
    refused = rbees_cluster.rbees("batches", "cancel", batch["id"])
    assert refused.returncode != 0 and "batch_not_cancellable" in refused.stderr
    unknown = rbees_cluster.rbees("batches", "status", "batch_nope")
    assert unknown.returncode != 0 and "not_found" in unknown.stderr


def test_a_keys_batch_runs_as_that_key_within_its_models(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("batch-operator-token-0123456789\n")
    token_file.chmod(0o600)
    cluster = up(tmp_path / "home", environ={"RBEES_API_TOKEN_FILE": str(token_file)})
    try:
        made = cluster.rbees("keys", "create", "carol", "--scope", "inference",
                             "--models", "smollm2")
        assert made.returncode == 0, made.stderr
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=made.stdout.strip(),
                               max_retries=0)
        batch = _run(client, [_line(0), _line(1, model="qwen2.5-0.5b")])
        assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
        (ok,) = _results(client, batch.output_file_id)
        job = httpx.get(f"{cluster.url}/v2/tasks/{ok['response']['request_id']}",
                        headers={"Authorization": f"Bearer {made.stdout.strip()}"}).json()
        assert job["owner"] == "carol"
        (refused,) = _results(client, batch.error_file_id)
        assert refused["custom_id"] == "req-1" and refused["response"]["status_code"] == 403
    finally:
        cluster.rbees("down")
