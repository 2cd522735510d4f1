"""(q) Interactive requests while an OpenAI batch runs (issue 28: their time to first token
within 1.2x of an idle cluster's).

One ``rbees up`` with SmolLM2; the same streamed chat (OpenAI's /v1/chat/completions, greedy)
is timed in ``cycles`` rounds of two phases: ``runs`` times on the idle, warm cluster, then
``runs`` times while a batch of ``lines`` chat lines (``batch_tokens`` tokens each) runs on
the same worker (the batch is cancelled before the next round: its running lines' jobs
are cancelled with it). The ratio of the medians over every round is judged.

Why rounds: on this 2-core machine the idle median of ten chats moved from 11.8 to 24.4 ms
between runs minutes apart, and idle ran before busy, so the old single pair of phases
judged the machine's drift as much as the batch (the same code read 0.67x to 1.45x).
Alternating the phases puts both under the same drift, and more chats each way steady the
medians. Used by bench/orchestrator.py (section q).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
from protocols import REFERENCE, first_text_ms  # bench/protocols.py, beside this file


def _batch(client: httpx.Client, url: str, lines: int, tokens: int, tag: int = 0) -> str:
    rows = [{"custom_id": f"q-{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
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


def _until(client: httpx.Client, url: str, batch_id: str, ready: Callable[[Any], bool],
           what: str, within: float = 120.0) -> Any:
    """The batch object once ``ready(batch)``; raises after ``within`` s."""
    deadline = time.monotonic() + within
    while not ready(batch := client.get(f"{url}/v1/batches/{batch_id}").json()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"(q): {what} within {within:g} s")
        time.sleep(0.1)
    return batch


def bench_batches(url: str, runs: int, tokens: int, lines: int = 200,
                  batch_tokens: int = 64, cycles: int = 3) -> list[str]:
    """Section (q)'s table, on the cluster at ``url``."""
    idle: list[list[float]] = []
    busy: list[list[float]] = []
    done: list[int] = []
    with httpx.Client(timeout=300) as client:
        first_text_ms(client, url, REFERENCE, 4)  # starts and warms the worker
        for cycle in range(cycles):
            idle.append([first_text_ms(client, url, REFERENCE, tokens) for _ in range(runs)])
            batch_id = _batch(client, url, lines, batch_tokens, cycle)
            # the batch's lines hold the worker's other slots once one has finished
            _until(client, url, batch_id, lambda b: b["request_counts"]["completed"] >= 1,
                   "no line of the batch finished")
            busy.append([first_text_ms(client, url, REFERENCE, tokens) for _ in range(runs)])
            client.post(f"{url}/v1/batches/{batch_id}/cancel")
            stopped = _until(client, url, batch_id,
                             lambda b: b["status"] in ("cancelled", "completed"),
                             "the batch did not stop")
            done.append(stopped["request_counts"]["completed"])
    all_idle = [x for xs in idle for x in xs]
    all_busy = [x for xs in busy for x in xs]
    ratio = statistics.median(all_busy) / statistics.median(all_idle)
    per_round = ", ".join(f"{statistics.median(b):.1f}/{statistics.median(i):.1f}"
                          for i, b in zip(idle, busy, strict=True))
    return [
        f"{cycles} rounds of {runs} streamed chats of {tokens} tokens each way; each round's "
        f"batch: {lines} lines of {batch_tokens} tokens, cancelled after its chats "
        f"({', '.join(map(str, done))} lines done). Medians per round, busy/idle ms: "
        f"{per_round}.",
        "",
        "| cluster | TTFT ms (median) | TTFT ms (p90) | TTFT ms (max) |",
        "|---|---:|---:|---:|",
        f"| idle | {statistics.median(all_idle):.1f} | {_p90(all_idle):.1f} "
        f"| {max(all_idle):.1f} |",
        f"| a batch running | {statistics.median(all_busy):.1f} | {_p90(all_busy):.1f} "
        f"| {max(all_busy):.1f} |",
        "",
        "| target | measured | holds |", "|---|---|---|",
        f"| TTFT while a batch runs <= 1.2x idle | {ratio:.2f}x "
        f"| {'yes' if ratio <= 1.2 else 'NO'} |",
    ]


def _p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) > 1 else xs[0]


__all__ = ["bench_batches"]
