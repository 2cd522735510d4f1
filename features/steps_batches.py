"""Steps of OpenAI batches on rbees-orcd (issue 28): a batch of chat lines through the
official ``openai`` client, across a SIGKILL of rbees-orcd."""

from __future__ import annotations

import json
import time
from typing import Any

from pytest_bdd import parsers, then, when
from steps_jobs import openai_client
from world import World


@when(parsers.parse("the openai client submits a batch of {count:d} chat lines"))
def submit_batch(world: World, ctx: dict[str, Any], count: int) -> None:
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "smollm2", "max_tokens": 4, "temperature": 0, "seed": i,
                       "messages": [{"role": "user", "content": f"Count from {i}:"}]}}
             for i in range(count)]
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with openai_client(world) as client:
        uploaded = client.files.create(file=("lines.jsonl", content), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
    ctx["batch_id"], ctx["custom_ids"] = batch.id, [x["custom_id"] for x in lines]


@when("half of its lines are answered")
def half_answered(world: World, ctx: dict[str, Any]) -> None:
    deadline = time.monotonic() + 300
    with openai_client(world) as client:
        while time.monotonic() < deadline:
            counts = client.batches.retrieve(ctx["batch_id"]).request_counts
            if counts is not None and counts.completed >= len(ctx["custom_ids"]) // 2:
                return
            time.sleep(0.2)
    raise AssertionError("half of the batch was not answered within 300 s")


@then("the batch completes with every custom_id answered once, in order")
def batch_completes(world: World, ctx: dict[str, Any]) -> None:
    deadline = time.monotonic() + 600
    with openai_client(world) as client:
        while time.monotonic() < deadline:
            batch = client.batches.retrieve(ctx["batch_id"])
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                break
            time.sleep(0.3)
        assert batch.status == "completed", batch
        errors = client.files.content(batch.error_file_id).text if batch.error_file_id else ""
        assert batch.output_file_id is not None and not errors, (batch, errors)
        out = [json.loads(x) for x in
               client.files.content(batch.output_file_id).text.splitlines() if x]
    assert [r["custom_id"] for r in out] == ctx["custom_ids"]
    assert all(r["response"]["status_code"] == 200 for r in out)
