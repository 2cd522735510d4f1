"""Interactive requests go first while a batch runs (issue 28: their time to first token
stays near an idle cluster's).

Three rules make it so. rbees-orcd keeps ``[placement] interactive_slots`` of every worker
(of more slots than that) free of batch-priority jobs, so an interactive job never waits
for a batch line to end; a worker stops a pass that holds only batch jobs' tokens when an
interactive job arrives (llama.cpp's abort callback: rbees_backend_llamacpp.interrupt), so
it never waits for that pass either; and it pauses its batch jobs while the interactive
job reads its prompt, so that pass runs the prompt alone, as on an idle worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx

from rbees_core.backend import DecodeInterrupted, Feed, SamplingParams
from rbees_core.engine import Engine
from rbees_core.placement import held_back, hold_back
from rbees_core.testing.backend import ByteModel


class Recording(ByteModel):
    """Bytes as tokens, never ends a job by itself; records which slots each pass fed and
    whether each feed was a prompt chunk (more than one token) or a decode step."""

    n_ctx_slot = 4096
    n_batch = 16

    def __init__(self) -> None:
        self.passes: list[list[tuple[int, int]]] = []  # per pass: (slot, tokens fed)

    def decode(self, feeds: Sequence[Feed]) -> None:
        self.passes.append([(f.slot, len(f.tokens)) for f in feeds])
        time.sleep(0.002)


def _job(engine: Engine, job_id: str, text: str, tokens: int, *, batch: bool,
         ends: dict[str, threading.Event]) -> Any:
    ends[job_id] = threading.Event()

    def sink(event: str, data: dict[str, Any]) -> None:
        if event in ("end", "error"):
            ends[job_id].set()

    job = engine.prepare(job_id, text, max_tokens=tokens, stop=[], sink=sink, batch=batch,
                         params=SamplingParams(temperature=0))
    engine.submit(job)
    return job


def test_batch_jobs_sit_out_the_passes_that_read_an_interactive_prompt() -> None:
    """Three batch jobs decode; an interactive one arrives with a prompt of three passes'
    worth (n_batch 16, 40 tokens): no batch slot is fed in those passes, the interactive
    job's first token comes right after them, and then all four decode together (the
    batch is paused, not starved)."""
    model = Recording()
    engine = Engine(model, slots=4, model_name="m", worker_id="w")
    engine.start()
    ends: dict[str, threading.Event] = {}
    try:
        batch = [_job(engine, f"b{i}", f"batch line {i}", 400, batch=True, ends=ends)
                 for i in range(3)]
        deadline = time.monotonic() + 10
        while not all(j.tokens_out >= 5 for j in batch) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert all(j.tokens_out >= 5 for j in batch)
        start = len(model.passes)
        urgent = _job(engine, "i", "y" * 40, 3, batch=False, ends=ends)
        assert ends["i"].wait(10)
        batch_slots = {j.slot for j in batch}
        passes = model.passes[start:]
        reading = [p for p in passes if any(s == urgent.slot and n > 1 for s, n in p)]
        assert sum(n for p in reading for s, n in p if s == urgent.slot) == 40
        assert len(reading) == 3, reading
        for p in reading:
            assert not batch_slots & {s for s, _ in p}, p
        after = passes[passes.index(reading[-1]) + 1:]
        assert any(batch_slots <= {s for s, _ in p} and urgent.slot in {s for s, _ in p}
                   for p in after), after[:5]
        for job in batch:  # the batch goes on once the prompt is read
            before = job.tokens_out
            deadline = time.monotonic() + 5
            while job.tokens_out == before and time.monotonic() < deadline:
                time.sleep(0.005)
            assert job.tokens_out > before
    finally:
        engine.stop()


def test_batch_prompts_are_read_beside_each_other_as_before() -> None:
    """Without an interactive prompt to read nothing pauses: batch jobs share passes."""
    model = Recording()
    engine = Engine(model, slots=2, model_name="m", worker_id="w")
    engine.start()
    ends: dict[str, threading.Event] = {}
    try:
        _job(engine, "a", "first", 20, batch=True, ends=ends)
        _job(engine, "b", "second", 20, batch=True, ends=ends)
        assert ends["a"].wait(10) and ends["b"].wait(10)
        assert any(len(p) == 2 for p in model.passes)
    finally:
        engine.stop()


def test_a_batch_job_sees_the_slots_kept_for_interactive_ones_as_taken() -> None:
    """hold_back: each worker of more slots than ``interactive_slots`` shows that many
    fewer free slots to a batch job; one-slot workers still take batch jobs; 0 keeps
    nothing; the pools given are not changed."""
    pools: list[dict[str, Any]] = [{"pool_id": "p", "workers": [
        {"worker_id": "four", "slots_total": 4, "slots_free": 4},
        {"worker_id": "busy", "slots_total": 4, "slots_free": 1},
        {"worker_id": "one", "slots_total": 1, "slots_free": 1}]}]
    seen = hold_back(pools, 1)
    assert [w["slots_free"] for w in seen[0]["workers"]] == [3, 0, 1]
    assert [w["slots_free"] for w in pools[0]["workers"]] == [4, 1, 1]
    assert hold_back(pools, 0) is pools
    assert [held_back(total, 2) for total in (1, 2, 3, 8)] == [0, 0, 2, 2]


def test_batch_jobs_leave_a_slot_free_and_an_interactive_job_takes_it_at_once(
        rbees_cluster: Any) -> None:
    """On a real cluster (SmolLM2, a worker of 4 slots): of 8 long batch jobs no more than
    3 run at once, and an interactive job sent while they run starts at once, beside
    them, instead of waiting for one of them to end."""
    cluster = rbees_cluster
    warm = cluster.submit(max_tokens=2)  # the worker is up before the batch comes
    cluster.events(warm["job_id"])
    batch = [cluster.submit(prompt=f"List every bee species you know, number {i}:",
                            max_tokens=400, priority="batch")["job_id"] for i in range(8)]
    (pool,) = httpx.get(f"{cluster.url}/v2/pools", timeout=10).json()["pools"]
    (worker,) = [w for w in pool["workers"] if w["state"] in ("ready", "busy")]
    assert worker["slots_total"] == 4, worker

    def busy() -> int:  # the worker's own count (its /metrics), not the job records'
        text = httpx.get(f"{worker['uri']}/metrics", timeout=10).text
        return int(float(next(line.split()[-1] for line in text.splitlines()
                              if line.startswith("rbees_worker_slots_busy "))))

    try:
        seen: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(seen) < 40 or max(seen) < 3):
            seen.append(busy())
            time.sleep(0.05)
        assert max(seen) == 3, seen  # never the fourth slot, though 5 more wait
        running = [j for j in batch if cluster.job(j)["status"] == "running"]
        t0 = time.monotonic()
        urgent = cluster.submit(max_tokens=4)
        events = cluster.events(urgent["job_id"])
        took = time.monotonic() - t0
        names = [name for _, name, _ in events]
        assert names[-1] == "end", events[-3:]
        still = [cluster.job(j)["status"] for j in running]
        assert "running" in still, still  # it ran beside them, not after them
        assert took < 10, took
        end = events[-1][2]
        print(f"MEASURED: an interactive job of 4 tokens beside 3 batch jobs: {took:.2f} s, "
              f"{[(n, d) for _, n, d in events if n in ('dispatched', 'started')]}, "
              f"ttft_ms {end.get('ttft_ms')}")
    finally:
        for job_id in batch:
            httpx.post(f"{cluster.url}/v2/tasks/{job_id}/cancel", timeout=10)


class Interruptible(ByteModel):
    """A model whose passes take ``pass_s`` and that :meth:`interrupt` stops part-way, as
    llama.cpp's abort callback does; ``held`` is what each slot's cache really holds, to
    check the engine's own record against."""

    n_ctx_slot = 4096
    n_batch = 64
    supports_interrupt = True
    pass_s = 0.2

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.held: dict[int, list[int]] = {}
        self.stopped = 0

    def begin(self, slot: int, params: SamplingParams) -> None:
        self.held[slot] = []

    def interrupt(self) -> None:
        self.stop.set()

    def decode(self, feeds: Sequence[Feed], interruptible: bool = False) -> None:
        if interruptible:
            if self.stop.wait(self.pass_s):
                self.stop.clear()
                self.stopped += 1
                raise DecodeInterrupted
        else:
            self.stop.clear()
            time.sleep(0.001)
        for feed in feeds:
            self.held[feed.slot].extend(feed.tokens)


def test_an_interactive_job_stops_a_pass_of_batch_jobs_and_they_lose_nothing() -> None:
    """Passes of batch jobs alone take 200 ms here; an interactive job arriving during one
    stops it (its first token comes in well under one pass), the batch jobs' tokens of the
    stopped pass are fed again (every slot's record is what the model holds), and every
    batch job still ends with all its tokens."""
    model = Interruptible()
    engine = Engine(model, slots=4, model_name="m", worker_id="w")
    engine.start()
    ends: dict[str, threading.Event] = {}
    try:
        batch = [_job(engine, f"b{i}", f"line {i}", 6, batch=True, ends=ends)
                 for i in range(3)]
        time.sleep(0.3)  # a pass of theirs is in flight
        firsts: list[float] = []
        for k in range(3):
            urgent = _job(engine, f"i{k}", "ask", 2, batch=False, ends=ends)
            assert ends[f"i{k}"].wait(10)
            firsts.append(urgent.first_token_at - urgent.received_at)
            time.sleep(0.05)  # into the next pass of the batch jobs
        assert all(ends[f"b{i}"].wait(30) for i in range(3))
        assert model.stopped >= 3 and engine.interrupted >= 3
        assert max(firsts) < 0.1, firsts  # not after a 200 ms pass
        for job in batch:
            assert job.tokens_out == 6
            assert engine._cached[job.slot] == model.held[job.slot], job.job_id
    finally:
        engine.stop()
