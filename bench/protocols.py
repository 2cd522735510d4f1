"""(p) What a client protocol's adapter adds to the time to first token, against the OpenAI
path, on one warm worker (issue 24: at most 1 ms).

One ``rbees up`` with SmolLM2; each protocol streams the same chat (same messages, greedy,
the same number of tokens) in rounds, the protocols' order rotating from round to round;
TTFT is from the request to the first line or frame that carries answer text, read by the
same client. A protocol is one row of :data:`PROTOCOLS` (path, body, which line holds text):
add a row to measure another. Used by bench/orchestrator.py (section p).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

MESSAGES = [{"role": "user", "content": "Tell me a short story about bees."}]
#: the protocol all others are measured against
BASE = "OpenAI /v1/chat/completions"


def _openai_text(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def _ollama_text(line: str) -> bool:
    return bool(line.strip()) and bool((json.loads(line).get("message") or {}).get("content"))


#: protocol -> (path, body for n tokens, whether a line of the answer carries text)
PROTOCOLS: dict[str, tuple[str, Callable[[int], dict[str, Any]], Callable[[str], bool]]] = {
    BASE: ("/v1/chat/completions", lambda n: {
        "model": "smollm2", "messages": MESSAGES, "max_tokens": n, "temperature": 0,
        "stream": True}, _openai_text),
    "Ollama /api/chat": ("/api/chat", lambda n: {
        "model": "smollm2", "messages": MESSAGES, "stream": True,
        "options": {"num_predict": n, "temperature": 0}}, _ollama_text),
}


def ttft_ms(client: httpx.Client, url: str, protocol: str, tokens: int) -> float:
    """One streamed request's time to its first text, read to the end."""
    path, body, has_text = PROTOCOLS[protocol]
    first = None
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}{path}", json=body(tokens)) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if first is None and has_text(line):
                first = time.perf_counter()
    assert first is not None, f"{protocol}: no text"
    return (first - t0) * 1000


def bench_protocols(url: str, runs: int, tokens: int) -> list[str]:
    """The table of section (p) for the rbees-orcd at ``url`` (its worker warm)."""
    names = list(PROTOCOLS)
    times: dict[str, list[float]] = {name: [] for name in names}
    with httpx.Client(timeout=120) as client:
        for name in names:  # warm every path once
            ttft_ms(client, url, name, 2)
        for i in range(runs):
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                times[name].append(ttft_ms(client, url, name, tokens))
    base = times[BASE]
    rows = [f"{runs} rounds of {tokens} tokens, the protocols' order rotating.", "",
            "| protocol | TTFT ms (median) | added vs OpenAI (median of pairs) | <= 1 ms |",
            "|---|---:|---:|---|"]
    for name in names:
        median = statistics.median(times[name])
        if name == BASE:
            rows.append(f"| {name} | {median:.2f} | | |")
            continue
        added = statistics.median(a - b for a, b in zip(times[name], base, strict=True))
        rows.append(f"| {name} | {median:.2f} | {added:+.2f} ms | "
                    f"{'yes' if added <= 1 else 'NO'} |")
    return rows
