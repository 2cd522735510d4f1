"""What a client-protocol adapter adds to time to first token (issue 24), for
bench/orchestrator.py section (p).

(p1), judged: each adapter's own cost. rbees-orcd's real app (its routes and every installed
protocol plugin's, its middleware) in process, over a stub orchestrator whose job answers at
once with one token: the time of a whole streamed answer (request parsed, task built and
checked, job submitted and followed, head, the token's frame, the end) through each protocol,
minus the OpenAI chat path's, the medians of ``--protocol-runs`` x 20 interleaved requests.
A model adds the same to every protocol; this is what the adapter adds on top.

(p2), for reference: one ``rbees up`` cluster, one warm SmolLM2 worker; the same chat (one
user message, greedy, ``--protocol-tokens`` tokens) streamed through each protocol, in rounds
that rotate the order. Time to first token: from the request to the first frame carrying
answer text, read from the raw stream (no SDK: the client's cost would differ by library, not
by adapter). Per protocol: the median TTFT, and the median of each round's difference to the
OpenAI path (this VM's speed drifts between rounds, not within).

On a busy machine (p2)'s TTFTs vary by tens of ms from one request to the next, far more
than the 1 ms being judged, so (p1) is the judged row and (p2) shows the same on a real
worker. Target: each adapter adds at most 1 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx

QUESTION = "Tell me about bees and honey."
#: Added TTFT an adapter may cost over the OpenAI path (issue 24), in milliseconds.
TARGET_MS = 1.0


def _openai(data: Any) -> bool:
    return any((c.get("delta") or {}).get("content") for c in data.get("choices") or ())


def _anthropic(data: Any) -> bool:
    return (data.get("type") == "content_block_delta"
            and bool((data.get("delta") or {}).get("text")))


def _responses(data: Any) -> bool:
    return data.get("type") == "response.output_text.delta" and bool(data.get("delta"))


def _ollama(data: Any) -> bool:
    return bool((data.get("message") or {}).get("content"))


#: name -> (path, body of a streamed chat of ``tokens`` tokens, whether a JSON frame is text)
PROTOCOLS: dict[str, tuple[str, Callable[[int], dict[str, Any]], Callable[[Any], bool]]] = {
    "OpenAI chat completions": ("/v1/chat/completions", lambda n: {
        "model": "smollm2", "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": n, "temperature": 0, "seed": 1, "stream": True}, _openai),
    "Anthropic Messages": ("/v1/messages", lambda n: {
        "model": "smollm2", "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": n, "temperature": 0, "stream": True}, _anthropic),
    "OpenAI Responses": ("/v1/responses", lambda n: {
        "model": "smollm2", "input": QUESTION, "max_output_tokens": n, "temperature": 0,
        "stream": True}, _responses),
    "Ollama /api/chat": ("/api/chat", lambda n: {
        "model": "smollm2", "messages": [{"role": "user", "content": QUESTION}],
        "stream": True, "options": {"num_predict": n, "temperature": 0, "seed": 1}},
        _ollama),
}
REFERENCE = "OpenAI chat completions"


def first_text_ms(client: httpx.Client, url: str, name: str, tokens: int) -> float:
    """One streamed chat through protocol ``name``: milliseconds from the request to the
    first frame with answer text (the stream is read to its end)."""
    path, body, is_text = PROTOCOLS[name]
    first = None
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}{path}", json=body(tokens)) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if first is not None:
                continue
            raw = line[6:] if line.startswith("data: ") else line
            if not raw.startswith("{"):
                continue
            if is_text(json.loads(raw)):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{name}: no answer text")
    return (first - t0) * 1000


def installed(client: httpx.Client, url: str) -> list[str]:
    """The protocols this rbees-orcd serves (a one-token chat through each answers 200)."""
    return [name for name, (path, body, _) in PROTOCOLS.items()
            if client.post(f"{url}{path}", json={**body(1), "stream": False}).status_code
            == 200]


def bench_protocols(url: str, runs: int, tokens: int) -> list[str]:
    """Section (p)'s lines for the cluster at ``url`` (its worker warmed here)."""
    with httpx.Client(timeout=120) as client:
        names = installed(client, url)
        for name in names:  # warm the worker and each route
            first_text_ms(client, url, name, 4)
        ttft: dict[str, list[float]] = {name: [] for name in names}
        for i in range(runs):
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                ttft[name].append(first_text_ms(client, url, name, tokens))
    reference = ttft[REFERENCE]
    lines = [f"(p2) SmolLM2, one warm worker of a real cluster, {tokens} tokens per chat, "
             f"{runs} rounds (order rotated); TTFT to the first answer text, read from the raw "
             "stream (for reference: see (p1)).", "",
             "| protocol | TTFT ms (median) | added vs OpenAI chat, ms (median of rounds) |",
             "|---|---:|---:|"]
    for name in names:
        added = statistics.median(t - r for t, r in zip(ttft[name], reference, strict=True))
        lines.append(f"| {name} | {statistics.median(ttft[name]):.1f} | "
                     f"{'(reference)' if name == REFERENCE else f'{added:+.2f}'} |")
    missing = [name for name in PROTOCOLS if name not in names]
    if missing:
        lines += ["", "Not installed here: " + ", ".join(missing) + "."]
    return lines


class StubOrchestrator:
    """The facade rbees-orcd's routes use, answering every job at once: queued, dispatched,
    started, ``tokens`` tokens, end (what a warm worker's job sends, without the model)."""

    def __init__(self, pm: Any, tokens: int) -> None:
        self.pm, self.tokens, self.count = pm, tokens, 0
        self.settings = SimpleNamespace(max_queue_wait_s=600.0, sse_ping_interval_s=15.0)

    async def submit(self, request: Any, *, refuse_unknown: bool = False) -> Any:
        from rbees_core.api.orchestrator import TaskAccepted

        self.count += 1
        job_id = f"job-{self.count:032x}"
        return TaskAccepted(job_id=job_id, status="queued", queue_position=0,
                            predicted_start_ms=0, events_url=f"/v2/tasks/{job_id}/events")

    async def follow(self, job_id: str, after: int, *, deliver: Any = None) -> Any:
        events: list[tuple[int, str, dict[str, Any]]] = [
            (1, "queued", {}), (2, "dispatched", {"pool_id": "p", "worker_id": "w"}),
            (3, "started", {"worker_id": "w"})]
        events += [(4 + i, "token", {"t": " bee", "i": i}) for i in range(self.tokens)]
        events.append((4 + self.tokens, "end", {"tokens_in": 12, "tokens_out": self.tokens,
                                                "stop_reason": "max_tokens", "seed": 1}))
        for item in events if deliver is not None else ():
            deliver(item)
        return SimpleNamespace(backlog=events if deliver is None else [], live=None,
                               close=lambda: None)

    async def cancel(self, job_id: str) -> bool:
        return False

    def pool_records(self) -> list[dict[str, Any]]:
        return []

    def models(self) -> list[dict[str, Any]]:
        return []

    def model_states(self) -> dict[str, str]:
        return {}


async def _adapter_costs(runs: int, tokens: int) -> dict[str, list[float]]:
    from rbees_core import plugins
    from rbees_core.http import build_app
    from rbees_core.programs import orcd

    pm = plugins.make_manager(plugins.builtin_plugins())
    app = build_app(orcd.routes(pm, time.monotonic()), token=None)
    app.app.state.orcd = StubOrchestrator(pm, tokens)  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://rbees.test") as client:
        names = []
        for name, (path, body, _) in PROTOCOLS.items():
            if (await client.post(path, json=body(tokens))).status_code == 200:
                names.append(name)
        times = {name: [] for name in names}
        for i in range(runs * 20):
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                path, body, _ = PROTOCOLS[name]
                payload = body(tokens)
                t0 = time.perf_counter()
                answer = await client.post(path, json=payload)
                times[name].append((time.perf_counter() - t0) * 1000)
                assert answer.status_code == 200, answer.text
    return times


def bench_adapter_costs(runs: int) -> list[str]:
    """Section (p1)'s lines: each adapter's own cost over the OpenAI path (see above)."""
    times = asyncio.run(_adapter_costs(runs, 1))
    reference = statistics.median(times[REFERENCE])
    lines = [f"(p1) rbees-orcd's app in process over a stub orchestrator (a job of one token, "
             f"answered at once), {len(times[REFERENCE])} streamed requests per protocol, "
             "interleaved: the whole answer's time.", "",
             f"| protocol | ms (median) | added vs OpenAI chat, ms | <= {TARGET_MS:.0f} ms |",
             "|---|---:|---:|---|"]
    for name, values in times.items():
        added = statistics.median(values) - reference
        lines.append(f"| {name} | {statistics.median(values):.3f} | "
                     + ("(reference) | |" if name == REFERENCE else
                        f"{added:+.3f} | {'yes' if added <= TARGET_MS else 'NO'} |"))
    missing = [name for name in PROTOCOLS if name not in times]
    if missing:
        lines += ["", "Not installed here: " + ", ".join(missing) + "."]
    return lines
