"""(q) Interactive requests while an OpenAI batch runs (issue 28: their time to first token
within 1.2x of an idle cluster's).

One ``rbees up`` with SmolLM2; the same streamed chat (OpenAI's /v1/chat/completions, greedy)
is timed ``runs`` times on the idle, warm cluster, then ``runs`` times while a batch of
``lines`` chat lines (``batch_tokens`` tokens each) runs on the same worker; the ratio of
the medians is judged. Used by bench/orchestrator.py (section q).
"""

from __future__ import annotations

import json
import statistics
import time

import httpx
from protocols import REFERENCE, first_text_ms  # bench/protocols.py, beside this file


def _batch(client: httpx.Client, url: str, lines: int, tokens: int) -> str:
    rows = [{"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "smollm2", "max_tokens": tokens, "temperature": 0, "seed": i,
                      "messages": [{"role": "user", "content": f"Write about bee {i}."}]}}
            for i in range(lines)]
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    uploaded = client.post(f"{url}/v1/files", data={"purpose": "batch"},
                           files={"file": ("q.jsonl", content)}).json()
    batch = client.post(f"{url}/v1/batches", json={
        "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}).json()
    return str(batch["id"])


def bench_batches(url: str, runs: int, tokens: int, lines: int = 200,
                  batch_tokens: int = 64) -> list[str]:
    """Section (q)'s table, on the cluster at ``url``."""
    with httpx.Client(timeout=300) as client:
        first_text_ms(client, url, REFERENCE, 4)  # starts and warms the worker
        idle = [first_text_ms(client, url, REFERENCE, tokens) for _ in range(runs)]
        batch_id = _batch(client, url, lines, batch_tokens)
        deadline = time.monotonic() + 60
        while client.get(f"{url}/v1/batches/{batch_id}").json()["request_counts"][
                "completed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # the batch's lines hold the worker's slots
        busy = [first_text_ms(client, url, REFERENCE, tokens) for _ in range(runs)]
        state = client.get(f"{url}/v1/batches/{batch_id}").json()
        client.post(f"{url}/v1/batches/{batch_id}/cancel")
    ratio = statistics.median(busy) / statistics.median(idle)
    counts = state["request_counts"]
    return [
        f"{runs} streamed chats of {tokens} tokens each way; the batch: {lines} lines of "
        f"{batch_tokens} tokens ({counts['completed']} done when the last chat ended, "
        f"status {state['status']}).",
        "",
        "| cluster | TTFT ms (median) | TTFT ms (max) |", "|---|---:|---:|",
        f"| idle | {statistics.median(idle):.1f} | {max(idle):.1f} |",
        f"| a batch running | {statistics.median(busy):.1f} | {max(busy):.1f} |",
        "",
        "| target | measured | holds |", "|---|---|---|",
        f"| TTFT while a batch runs <= 1.2x idle | {ratio:.2f}x "
        f"| {'yes' if ratio <= 1.2 else 'NO'} |",
    ]


__all__ = ["bench_batches"]
