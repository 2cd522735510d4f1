"""Within one worker, a job goes to the slot whose cache holds the longest common prefix of
its tokens, and only the rest is fed; a job sharing nothing takes the least recently used
slot, so that it does not overwrite the cache of a chat whose next turn is coming."""

from __future__ import annotations

import threading
from typing import Any

from rbees_core.backend import SamplingParams
from rbees_core.engine import Engine
from rbees_core.testing.backend import ByteModel


class Cached(ByteModel):
    """Bytes as tokens, answers ``x``; remembers each job's slot and what it kept."""

    prefix_cache = True

    def __init__(self) -> None:
        self.begun: list[tuple[int, int]] = []  # (slot, tokens kept)

    def begin(self, slot: int, params: SamplingParams, keep: int = 0) -> int:  # type: ignore[override]
        self.begun.append((slot, keep))
        return keep


def run(engine: Engine, text: str, *, batch: bool = False) -> None:
    done = threading.Event()

    def sink(event: str, data: dict[str, Any]) -> None:
        if event in ("end", "error"):
            done.set()

    engine.submit(engine.prepare(text, text, max_tokens=3, stop=[], sink=sink,
                                 params=SamplingParams(temperature=0), batch=batch))
    assert done.wait(10)


def test_a_chat_turn_returns_to_its_slot_past_other_jobs() -> None:
    model = Cached()
    engine = Engine(model, slots=3, model_name="m", worker_id="w")
    engine.start()
    try:
        turn1 = "system: keep bees. user: why hexagons?"
        run(engine, turn1)
        run(engine, "Bumblebees")  # takes an empty slot, not turn 1's
        run(engine, "Carpenter bees")
        run(engine, turn1 + "xx user: and wax?")  # its answer, then the next question
        run(engine, "Drones")  # no slot holds any of it: the least recently used
    finally:
        engine.stop()
    assert [slot for slot, _ in model.begun] == [0, 1, 2, 0, 1]
    assert model.begun[3] == (0, len(turn1) + 2)  # prompt and answer kept, only the rest fed


def test_a_batch_job_leaves_a_chat_its_slot_while_another_is_free() -> None:
    """Batch lines share a chat's system prompt: the longest common prefix alone sent the
    first one to the idle chat's slot, and the chat's next turn read its whole prompt
    again. A batch job takes a slot an interactive job filled only when no other is free."""
    model = Cached()
    engine = Engine(model, slots=3, model_name="m", worker_id="w")
    engine.start()
    try:
        chat = "system: keep bees. user: why hexagons?"
        run(engine, chat)  # interactive: slot 0
        run(engine, "system: keep bees. user: line 1", batch=True)  # not slot 0
        run(engine, "system: keep bees. user: line 2", batch=True)  # its own prefix: slot 1
        run(engine, chat + "xx user: and wax?")  # the chat's prefix is still there
        run(engine, "system: keep bees. user: line 3", batch=True)
        run(engine, "system: keep bees. user: line 4", batch=True)
    finally:
        engine.stop()
    slots = [slot for slot, _ in model.begun]
    assert slots[:4] == [0, 1, 1, 0], slots
    assert model.begun[3] == (0, len(chat) + 2)
    assert 0 not in slots[4:], slots  # slots 1 and 2 are free: never the chat's
