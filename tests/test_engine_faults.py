"""A backend that raises ends the job it was serving, never the worker's decode thread
(found by the structural fuzz: a TypeError in the llama.cpp backend's ``begin`` killed the
thread, and every later job on that worker waited forever while /health said ok)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from rbees_core.backend import SamplingParams
from rbees_core.engine import Engine
from rbees_core.testing.backend import ByteModel


class Flaky(ByteModel):
    """Bytes as tokens; ``begin`` or ``sample`` raise for a job whose top_k is 13 or 14."""

    answer = ord("a")

    def __init__(self) -> None:
        self.top_k: dict[int, int] = {}

    def begin(self, slot: int, params: SamplingParams) -> None:
        if params.top_k == 13:
            raise TypeError("this function takes at least 5 arguments (4 given)")
        self.top_k[slot] = params.top_k

    def sample(self, slot: int) -> int:
        if self.top_k[slot] == 14:
            raise ValueError("bad logits")
        return self.answer

    def end(self, slot: int) -> None:
        self.top_k.pop(slot, None)


def run(engine: Engine, job_id: str, top_k: int) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    done = threading.Event()

    def sink(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))
        if event in ("end", "error"):
            done.set()

    engine.submit(engine.prepare(job_id, "hi", max_tokens=3, stop=[], sink=sink,
                                 params=SamplingParams(temperature=0, top_k=top_k)))
    assert done.wait(10), f"{job_id} never ended: {events}"
    return events


@pytest.mark.parametrize("top_k", [13, 14])
def test_a_raising_backend_fails_the_job_and_the_next_one_runs(top_k: int) -> None:
    engine = Engine(Flaky(), slots=1, model_name="flaky", worker_id="w")
    engine.start()
    try:
        event, data = run(engine, "bad", top_k)[-1]
        assert (event, data["code"]) == ("error", "DECODE_FAILED"), data
        assert data["retriable"] is False and "Error" in data["message"]
        assert run(engine, "good", 0)[-1][0] == "end"
        assert engine.slots_free == 1
    finally:
        engine.stop()


@pytest.mark.parametrize("top_k", [0, 14])
def test_the_slot_is_free_when_the_terminal_event_leaves(top_k: int) -> None:
    """rbees-orcd sends a one-slot worker its next job as soon as it reads ``end`` (or
    ``error``); the engine emitted the event before freeing the slot, so that job was often
    refused with ALL_SLOTS_BUSY (25 refusals in one bench run). The sink runs on the decode
    thread, so submitting from it shows the order exactly."""
    engine = Engine(Flaky(), slots=1, model_name="flaky", worker_id="w")
    engine.start()
    refused: list[Exception] = []
    followed = threading.Event()

    def sink(event: str, data: dict[str, Any]) -> None:
        if event in ("end", "error") and data["job_id"] == "first":
            try:
                engine.submit(engine.prepare("next", "hi", max_tokens=2, stop=[],
                                             sink=next_sink, params=SamplingParams()))
            except Exception as exc:
                refused.append(exc)
                followed.set()

    def next_sink(event: str, data: dict[str, Any]) -> None:
        if event in ("end", "error"):
            followed.set()

    try:
        engine.submit(engine.prepare("first", "hi", max_tokens=3, stop=[], sink=sink,
                                     params=SamplingParams(temperature=0, top_k=top_k)))
        assert followed.wait(10)
        assert not refused, refused
    finally:
        engine.stop()
