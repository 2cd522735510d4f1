"""An interrupted ``llama_decode`` leaves no trace: a pass stopped by
:meth:`LoadedModel.interrupt` and fed again gives the very tokens of a run never stopped
(rbees_backend_llamacpp.interrupt, llama.cpp's abort callback with libc's strlen)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from rbees_backend_llamacpp import LlamaCppBackend

from rbees_core import plugins
from rbees_core.backend import DecodeInterrupted, Feed, LoadedModel, SamplingParams


def _load(slots: int, ctx: int) -> Iterator[LoadedModel]:
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    loaded = LlamaCppBackend().load(resolve_model(plugins.make_manager(), DEFAULT_MODEL_REF),
                                    device="cpu", slots=slots, ctx=ctx, threads=2,
                                    progress=lambda s, f: None)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    yield from _load(2, 512)


@pytest.fixture(scope="module")
def four() -> Iterator[LoadedModel]:
    yield from _load(4, 1024)


@contextlib.contextmanager
def stopping(model: LoadedModel, late: float) -> Iterator[None]:
    """Another thread asks the model to stop its pass, again and again, from ``late``
    seconds on (so that stops land anywhere in a pass), until the block ends."""
    done = threading.Event()

    def keep_stopping() -> None:
        time.sleep(late)
        while not done.is_set():
            model.interrupt()

    stopper = threading.Thread(target=keep_stopping)
    stopper.start()
    try:
        yield
    finally:
        done.set()
        stopper.join()


def steps(model: LoadedModel, slots: tuple[int, ...], n: int, *, stop: bool,
          late: Callable[[int], float] = lambda step: 0.0) -> tuple[list[list[int]], int]:
    """``slots`` take a prompt each, then ``n`` greedy decode steps together; with ``stop``
    each step is first tried as an interruptible pass while :func:`stopping` runs (from
    ``late(step)`` seconds), and fed again plainly when it was stopped. The tokens per
    slot, and the stops."""
    out: dict[int, list[int]] = {}
    for slot in slots:
        model.begin(slot, SamplingParams(temperature=0, seed=1))
        model.decode([Feed(slot, model.tokenize(f"Bees of hive {slot} make"), True)])
        out[slot] = [model.sample(slot)]
    stops = 0
    for step in range(n):
        feeds = [Feed(slot, (out[slot][-1],), True) for slot in slots]
        if stop:
            with stopping(model, late(step)):
                try:
                    model.decode(feeds, interruptible=True)  # type: ignore[call-arg]
                except DecodeInterrupted:
                    stops += 1
                    model.decode(feeds)
        else:
            model.decode(feeds)
        for slot in slots:
            out[slot].append(model.sample(slot))
    for slot in slots:
        model.end(slot)
    return [out[slot] for slot in slots], stops


def test_a_stopped_pass_fed_again_gives_the_tokens_of_an_unstopped_run(
        model: LoadedModel) -> None:
    assert model.supports_interrupt
    plain, _ = steps(model, (0, 1), 12, stop=False)
    stopped, stops = steps(model, (0, 1), 12, stop=True)
    assert stops >= 3, stops  # the passes were really stopped
    assert stopped == plain


def test_a_pass_not_interruptible_is_never_stopped(model: LoadedModel) -> None:
    """An interrupt asked for outside an interruptible pass is forgotten: the next plain
    pass (an interactive job's) runs."""
    model.begin(0, SamplingParams(temperature=0, seed=1))
    model.interrupt()
    model.decode([Feed(0, model.tokenize("Bees"), True)])
    model.sample(0)
    model.end(0)


def test_a_stop_asked_for_before_an_interruptible_pass_stops_it(model: LoadedModel) -> None:
    """The engine marks a pass interruptible before the backend arms it: an interactive
    job arriving in between asks for a stop with no pass in flight. That stop is kept for
    the pass (which then stops at once and is fed again, the tokens unchanged); before, it
    was dropped and the whole pass ran while the interactive job waited."""
    plain, _ = steps(model, (0,), 3, stop=False)
    model.begin(0, SamplingParams(temperature=0, seed=1))
    model.decode([Feed(0, model.tokenize("Bees of hive 0 make"), True)])
    out = [model.sample(0)]
    for _ in range(3):
        feeds = [Feed(0, (out[-1],), True)]
        model.interrupt()
        with pytest.raises(DecodeInterrupted):
            model.decode(feeds, interruptible=True)  # type: ignore[call-arg]
        model.decode(feeds, interruptible=True)  # type: ignore[call-arg]  # no stop now
        out.append(model.sample(0))
    model.end(0)
    assert [out] == plain


def test_stopped_steps_of_slots_apart_fed_again_give_the_unstopped_tokens(
        four: LoadedModel) -> None:
    """Slots 0, 2 and 3 (a worker's batch jobs beside a free slot), stops from 0 to 3.5 ms
    into each pass: every sequence of a stopped pass is cut back to where the pass found
    it, so the pass fed again gives the tokens of a run never stopped. (That llama.cpp may
    keep some of a stopped pass's positions showed on a real cluster, tests/test_lanes.py:
    before the cut its worker failed 2 of 3 runs with 'inconsistent sequence positions'.)"""
    plain, _ = steps(four, (0, 2, 3), 12, stop=False)
    stopped, stops = steps(four, (0, 2, 3), 12, stop=True, late=lambda step: step % 6 * 0.0007)
    assert stops >= 4, stops
    assert stopped == plain
