"""Section (s) of bench/orchestrator.py: what a user gets through rbees-orcd, side by side
with llama.cpp's llama-server and with the worker direct (issue 21's acceptance).

One run, in this order (SmolLM2-135M Q4_1, the same chat, greedy):
  1. llama-server ``-np 4``: four concurrent streams (total tokens/s), and TTFT of a
     1,000-token prompt that no cache holds;
  2. a standalone rbees-workerd ``--slots 4``: four concurrent streams;
  3. a plain ``rbees up`` (a fresh RBEES_HOME whose models directory holds a copy of the GGUF
     under another name, the "other model"), then through its OpenAI chat endpoint:
     - one stream, in pairs with the same request sent direct to the worker rbees-orcd started
       (alternating which goes first): the ratio of the medians;
     - four concurrent streams, and how many workers of the model the pool runs after them
       (the issue: no second copy);
     - each model alone, then both at once (one stream each): each one's share of its solo
       speed (two busy CPU workers of different models on the same cores);
     - a second replica of the model started on the pool (its other model's worker stopped),
       then a chat in two turns: a 1,000-token first turn new to every cache, a second one
       that repeats it with the answer and 20 new words: TTFT of each.

Judged: orcd 1 stream >= 0.97 x direct; orcd 4 concurrent >= 0.9 x rbees-workerd --slots 4
and >= 1.0 x llama-server -np 4; one copy of the model; each of two models >= 0.4 x solo;
1,000-token TTFT through rbees-orcd <= 1.1 x llama-server's; second turn TTFT <= 0.3 x the
first's.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
from sidebyside import (  # bench/sidebyside.py, beside this file
    CTX,
    MESSAGES,
    Check,
    LlamaServer,
    Many,
    Stream,
    chat_stream,
    concurrent,
    long_messages,
    median_many,
    median_of,
    ratio_check,
    worker_stream,
)

from rbees_core.testing import find_free_port, wait_http, workerd_argv

BIN = Path(sys.executable).parent
MODEL = "smollm2"
OTHER = "bench-other/SmolLM2-copy.gguf"
TURN2 = ("Now tell me more about the boats the fishermen keep in rows in the harbour and "
         "about the storms from the north")
_ids = itertools.count()


@attrs.frozen
class Settings:
    tokens: int = 128
    threads: int = 2
    runs: int = 3  # samples per case (pairs: twice as many)
    long_words: int = 1000
    second_replica: bool = True
    # cuda:N on a GPU host: llama-server gets every layer on that GPU, the standalone worker
    # --device cuda:N; rbees-orcd's scheduler places its own workers (a GPU first)
    device: str = "cpu"


@attrs.define
class Run:
    """What one run measured (``rows``: case and value, for the table) and judged."""

    rows: list[tuple[str, str]] = attrs.field(factory=list)
    checks: list[Check] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)


def salt() -> str:
    return f"{os.getpid()}-{time.time_ns()}-{next(_ids)}"


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@contextmanager
def cluster(home: str) -> Iterator[dict[str, Any]]:
    """A plain ``rbees up`` in ``home`` (free ports), ``rbees down`` after."""
    env = {**os.environ, "RBEES_HOME": home}
    orcd, pool = f"127.0.0.1:{find_free_port()}", f"127.0.0.1:{find_free_port()}"
    out = subprocess.run([str(BIN / "rbees"), "up", "--bind", orcd, "--pool-bind", pool,
                          "--heartbeat-interval", "1", "--format", "json"], env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"rbees up failed: {out.stderr.strip()[-500:]}")
    try:
        yield json.loads(out.stdout)
    finally:
        subprocess.run([str(BIN / "rbees"), "down"], env=env, capture_output=True, timeout=300)


def live_workers(pool: str) -> list[dict[str, Any]]:
    workers = httpx.get(f"{pool}/v2/workers", timeout=30).json()["workers"]
    return [w for w in workers if w.get("state") not in ("stopped", "failed")]


def workers_of(pool: str, model_ref: str) -> list[dict[str, Any]]:
    return [w for w in live_workers(pool) if w.get("model_ref") == model_ref]


def describe(w: dict[str, Any]) -> str:
    """A worker as the pool lists it: model, device, slots, threads and CPU set (where the
    pool gives them)."""
    model = str(w.get("model_ref", "?")).rsplit("/", 1)[-1]
    text = f"{model} on {w.get('device')}, {w.get('slots_total')} slot(s)"
    if w.get("threads") is not None:
        text += f", {w['threads']} thread(s)"
    if w.get("cpus") is not None:
        text += f", CPUs {w['cpus']}" + (" shared" if w.get("cpu_shared") else "")
    return text


def wait_ready(pool: str, worker_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for w in live_workers(pool):
            if w["worker_id"] == worker_id and w["state"] in ("ready", "busy"):
                return w
        time.sleep(0.2)
    raise TimeoutError(f"worker {worker_id} not ready after {timeout:.0f} s")


def baselines(exe: Path | None, model_path: str, s: Settings, run: Run
              ) -> dict[str, float | None]:
    """Steps 1 and 2: llama-server -np 4 and a standalone rbees-workerd --slots 4."""
    got: dict[str, float | None] = {}
    if exe is not None:
        with LlamaServer(exe, model_path, s.threads, 4, s.device) as server, \
                httpx.Client(timeout=300) as client:
            many = median_many(s.runs, lambda: concurrent(4, lambda _: chat_stream(
                client, server.url, MODEL, MESSAGES, s.tokens)))
            long = median_of(s.runs, lambda: chat_stream(
                client, server.url, MODEL, long_messages(s.long_words, salt()), 4))
        got["L4"], got["L4k"] = many.total_per_s, long.ttft_ms
        size = "1,000-token" if s.long_words == 1000 else f"{s.long_words}-word"
        run.rows += [(f"llama-server `{server.flags()}`, 4 concurrent, total tokens/s",
                      f"{many.total_per_s:.1f}"),
                     (f"llama-server `{server.flags()}`, {size} prompt, TTFT ms",
                      f"{long.ttft_ms:.1f}")]
    port = find_free_port()
    home = tempfile.mkdtemp(prefix="rbees-bench-w4-")
    argv = workerd_argv("bench-w4", port, slots=4, device=s.device,
                        extra=("--threads", str(s.threads), "--ctx", str(CTX)))
    proc = subprocess.Popen(argv, env={**os.environ, "RBEES_HOME": home},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/v2/ready", timeout=300, proc=proc)
        with httpx.Client(timeout=300) as client:
            w4 = median_many(s.runs, lambda: concurrent(4, lambda _: worker_stream(
                client, url, MESSAGES, s.tokens, f"w4-{next(_ids)}")))
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(home, ignore_errors=True)
    got["W4"] = w4.total_per_s
    run.rows.append((f"rbees-workerd `--device {s.device} --slots 4 --threads {s.threads} "
                     f"--ctx {CTX}` (standalone), 4 concurrent, total tokens/s",
                     f"{w4.total_per_s:.1f}"))
    return got


def through_orcd(model_path: str, s: Settings, base: dict[str, float | None], run: Run) -> None:
    """Step 3: a plain ``rbees up``, measured through its OpenAI chat endpoint."""
    home = tempfile.mkdtemp(prefix="rbees-bench-speed-")
    other_path = Path(home) / "models" / OTHER
    other_path.parent.mkdir(parents=True)
    shutil.copyfile(model_path, other_path)
    other = f"file:{other_path}"
    try:
        with cluster(home) as info, httpx.Client(timeout=600) as client:
            _measure(info["orchestrator"], info["pool"], other, client, s, base, run)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _measure(url: str, pool: str, other: str, client: httpx.Client, s: Settings,
             base: dict[str, float | None], run: Run) -> None:
    def chat(model: str, messages: list[dict[str, str]], tokens: int) -> Stream:
        return chat_stream(client, url, model, messages, tokens)

    chat(MODEL, MESSAGES, 4)  # the scheduler starts the worker; it loads the model
    mine = live_workers(pool)
    if len(mine) != 1:
        run.notes.append(f"after the first job the pool runs {len(mine)} workers")
    worker = mine[0]
    ref, uri = worker["model_ref"], worker["uri"]
    run.notes.append(f"the worker rbees-orcd started: {describe(worker)}")
    if worker.get("device") != s.device:  # its baselines ran elsewhere: said, not hidden
        run.notes.append(f"the baselines ran on {s.device}, this worker on "
                         f"{worker.get('device')}")
    worker_stream(client, uri, MESSAGES, 4, f"warm-{next(_ids)}")

    # one stream: pairs, alternating which goes first
    direct: list[Stream] = []
    orcd: list[Stream] = []
    for i in range(2 * s.runs):
        if i % 2 == 0:
            direct.append(worker_stream(client, uri, MESSAGES, s.tokens, f"d-{next(_ids)}"))
        orcd.append(chat(MODEL, MESSAGES, s.tokens))
        if i % 2 == 1:
            direct.append(worker_stream(client, uri, MESSAGES, s.tokens, f"d-{next(_ids)}"))
    d_tps = statistics.median(x.tokens_per_s for x in direct)
    o_tps = statistics.median(x.tokens_per_s for x in orcd)
    d_ttft = statistics.median(x.ttft_ms for x in direct)
    o_ttft = statistics.median(x.ttft_ms for x in orcd)
    run.rows += [("worker direct (the one rbees-orcd started), 1 stream, tokens/s; TTFT ms",
                  f"{d_tps:.1f}; {d_ttft:.1f}"),
                 ("rbees-orcd OpenAI chat, 1 stream, tokens/s; TTFT ms",
                  f"{o_tps:.1f}; {o_ttft:.1f}")]
    run.checks.append(ratio_check("rbees-orcd 1 stream / worker direct", ">= 0.97",
                                  _div(o_tps, d_tps), 0.97))

    # four concurrent streams of one model
    four: Many = median_many(s.runs, lambda: concurrent(
        4, lambda _: chat(MODEL, MESSAGES, s.tokens)))
    copies = workers_of(pool, ref)
    run.rows += [("rbees-orcd OpenAI chat, 4 concurrent, total tokens/s",
                  f"{four.total_per_s:.1f}"),
                 ("workers of the model after the 4 concurrent streams (slots each)",
                  f"{len(copies)} ({', '.join(str(w.get('slots_total')) for w in copies)})")]
    run.checks += [
        ratio_check("rbees-orcd 4 concurrent / rbees-workerd --slots 4 direct", ">= 0.9",
                    _div(four.total_per_s, base.get("W4")), 0.9),
        ratio_check("rbees-orcd 4 concurrent / llama-server -np 4", ">= 1.0",
                    _div(four.total_per_s, base.get("L4")), 1.0),
        Check("workers of the model started for 4 concurrent streams", "1 (no second copy)",
              str(len(copies)), len(copies) == 1),
    ]

    # two busy workers of different models on the same cores
    chat(other, MESSAGES, 4)
    # tokens over the whole request: the two streams' first tokens come at different times
    solo = {m: statistics.median(chat(m, MESSAGES, s.tokens).overall_per_s
                                 for _ in range(s.runs + 1))
            for m in (MODEL, other)}
    pairs = [concurrent(2, lambda i: chat((MODEL, other)[i], MESSAGES, s.tokens))
             for _ in range(s.runs + 1)][1:]  # the first is a warm-up
    both = {m: statistics.median(p.each[i].overall_per_s for p in pairs)
            for i, m in enumerate((MODEL, other))}
    for name, m in (("model A", MODEL), ("model B (other file)", other)):
        run.rows.append((f"{name}, alone; with the other busy, tokens/s (whole request)",
                         f"{solo[m]:.1f}; {both[m]:.1f}"))
        run.checks.append(ratio_check(f"two CPU workers of different models: {name}, "
                                      "share of solo speed", ">= 0.4",
                                      _div(both[m], solo[m]), 0.4))
    run.notes.append("workers while both models ran: " + "; ".join(
        describe(w) for w in live_workers(pool)))

    # a second replica, then a chat in two turns
    if s.second_replica:  # exactly two replicas of the model, nothing else running
        keep = {worker["worker_id"]}
        for w in live_workers(pool):
            if w["model_ref"] == ref and len(keep) < 2:
                keep.add(w["worker_id"])
            elif w["worker_id"] not in keep:
                client.post(f"{pool}/v2/workers/{w['worker_id']}/stop", json={})
        deadline = time.monotonic() + 120
        while len(live_workers(pool)) > len(keep) and time.monotonic() < deadline:
            time.sleep(0.2)
        # one worker of the model, on every core again (its pool gives back what it lent
        # the other model's): the 1,000-token prompt as a user meets it, as llama-server's
        regrown = time.monotonic() + 30
        while time.monotonic() < regrown and any(
                w.get("device") == "cpu" and w.get("threads") != s.threads
                for w in workers_of(pool, ref)):
            time.sleep(0.2)
        run.notes.append("worker for the 1,000-token prompt: " + "; ".join(
            describe(w) for w in workers_of(pool, ref)))
        alone = statistics.median(chat(MODEL, long_messages(s.long_words, salt()), 20).ttft_ms
                                  for _ in range(s.runs))
        size = "1,000-token" if s.long_words == 1000 else f"{s.long_words}-word"
        run.rows.append((f"rbees-orcd OpenAI chat, {size} prompt, one worker, TTFT ms",
                         f"{alone:.1f}"))
        run.checks.append(ratio_check("1,000-token prompt TTFT, rbees-orcd / llama-server",
                                      "<= 1.1", _div(alone, base.get("L4k")), 1.1,
                                      at_least=False))
        if len(workers_of(pool, ref)) < 2:
            started = client.post(f"{pool}/v2/workers/start", json={
                "model_ref": ref, "slots": int(worker.get("slots_total") or 1)})
            started.raise_for_status()
            wait_ready(pool, started.json()["worker_id"])
        time.sleep(2.5)  # two heartbeats: rbees-orcd knows the second replica
    replicas = len(workers_of(pool, ref))
    run.notes.append("replicas for the two-turn chat: " + "; ".join(
        describe(w) for w in workers_of(pool, ref)))
    first: list[float] = []
    second: list[float] = []
    for _ in range(s.runs):
        turn1 = long_messages(s.long_words, salt())
        a = chat(MODEL, turn1, 20)
        b = chat(MODEL, [*turn1, {"role": "assistant", "content": a.text},
                         {"role": "user", "content": TURN2}], 20)
        first.append(a.ttft_ms)
        second.append(b.ttft_ms)
    t1, t2 = statistics.median(first), statistics.median(second)
    size = "1,000-token" if s.long_words == 1000 else f"{s.long_words}-word"
    run.rows += [(f"chat turn 1 ({size} prompt, new), {replicas} replicas, TTFT ms",
                  f"{t1:.1f}"),
                 ("chat turn 2 (same prefix + 20 words), TTFT ms", f"{t2:.1f}")]
    run.checks += [
        ratio_check(f"second chat turn TTFT / first turn's, {replicas} replicas", "<= 0.3",
                    _div(t2, t1), 0.3, at_least=False),
    ]


def speed_run(exe: Path | None, model_path: str, s: Settings) -> Run:
    """One run of the whole section; a step that fails is noted and the run goes on."""
    run = Run()
    steps: list[tuple[str, Callable[[], Any]]] = []
    base: dict[str, float | None] = {}
    steps.append(("baselines", lambda: base.update(baselines(exe, model_path, s, run))))
    steps.append(("rbees-orcd", lambda: through_orcd(model_path, s, base, run)))
    for name, step in steps:
        print(f"  (s) {name} ...", file=sys.stderr, flush=True)
        try:
            step()
        except Exception as exc:  # report and go on: one failed step must not hide others
            run.notes.append(f"{name} failed: {type(exc).__name__}: {exc}")
            print(f"  (s) {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return run
