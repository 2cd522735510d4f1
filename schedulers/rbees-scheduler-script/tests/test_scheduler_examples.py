"""The example policies of ``schedulers/examples/``, each on snapshots that show its rule."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rbees_scheduler_builtin import LeastLoaded
from rbees_scheduler_script import ScriptScheduler

from rbees_core.scheduling import Snapshot, Verdict
from rbees_core.testing.scheduler import device, job, pool, snapshot, targets, worker

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, ScriptScheduler]]:
    made = {p.stem: ScriptScheduler.from_path(p, processes=1)
            for p in sorted(EXAMPLES.glob("*.star"))}
    yield made
    for s in made.values():
        s.close()


def decide(s: ScriptScheduler, snap: Snapshot) -> Verdict:
    verdict = s.decide(snap)
    assert verdict.fallback is None, verdict.fallback
    return verdict


def test_every_example_is_tested(examples: dict[str, ScriptScheduler]) -> None:
    assert sorted(examples) == ["interactive_gpu", "low_power", "time_of_day"]
    source = Path(__file__).read_text()
    for name in examples:
        assert f'examples["{name}"]' in source


def mixed() -> list[dict[str, object]]:
    return [pool("cpus", devices=[device("cpu", free_gib=32)],
                 workers=[worker("c1", free=4, slots=4)]),
            pool("gpus", devices=[device("cuda:0", free_gib=10), device("cpu", free_gib=8)],
                 workers=[worker("g1", device="cuda:0", free=1)])]


def test_interactive_jobs_stay_on_gpus(examples: dict[str, ScriptScheduler]) -> None:
    s = examples["interactive_gpu"]
    verdict = decide(s, snapshot(*mixed()))
    assert targets(verdict) == [("dispatch", "gpus", "g1")]  # least-loaded would take c1
    assert verdict.policy == "script"
    assert "interactive jobs run on GPUs" in verdict.summary
    # no GPU worker with a free slot: start one on the GPU rather than use the CPU worker
    pools = mixed()
    pools[1]["workers"] = [worker("g1", device="cuda:0", free=0)]
    verdict = decide(s, snapshot(*pools, job=job(memory_gib=2)))
    assert targets(verdict) == [("start_worker", "gpus", "cuda:0")]
    # no GPU can take it at all: wait
    pools[1]["devices"] = [device("cuda:0", free_gib=1), device("cpu", free_gib=8)]
    verdict = decide(s, snapshot(*pools, job=job(memory_gib=2)))
    assert verdict.decisions[0].action == "wait"
    assert "wait for a GPU" in (verdict.decisions[0].reason or "")


def test_batch_or_cpu_pinned_jobs_are_left_to_the_default(
        examples: dict[str, ScriptScheduler]) -> None:
    s = examples["interactive_gpu"]
    for head in (job(priority="batch"), job(placement={"device": "cpu"})):
        snap = snapshot(*mixed(), job=head)
        verdict = decide(s, snap)
        assert verdict.policy == "least-loaded"
        assert verdict.decisions == LeastLoaded().decide(snap).decisions


def test_the_pool_drawing_least_power_wins(examples: dict[str, ScriptScheduler]) -> None:
    s = examples["low_power"]
    pools = [pool("hungry", devices=[device("cuda:0", free_gib=20, power_w=300)],
                  workers=[worker("w1", device="cuda:0", free=4)]),
             pool("frugal", devices=[device("metal:0", free_gib=10, power_w=20),
                                     device("cpu", free_gib=16)],
                  workers=[worker("w1", device="metal:0", free=1)])]
    verdict = decide(s, snapshot(*pools))
    assert targets(verdict) == [("dispatch", "frugal", "w1")]
    assert verdict.summary.endswith("pool frugal draws the least power (20 W)")
    pools[1]["workers"] = [worker("w1", device="metal:0", free=0)]
    pools[0]["workers"] = [worker("w1", device="cuda:0", free=0)]
    verdict = decide(s, snapshot(*pools, job=job(memory_gib=4)))
    assert targets(verdict) == [("start_worker", "frugal", "metal:0")]


def local_time(year: int, month: int, day: int, hour: int) -> float:
    return time.mktime((year, month, day, hour, 30, 0, 0, 0, -1))


@pytest.mark.parametrize(("when", "rule"), [
    (local_time(2026, 3, 4, 10), True),    # Wednesday, 10:30
    (local_time(2026, 3, 4, 17), True),    # Wednesday, 17:30
    (local_time(2026, 3, 4, 18), False),   # Wednesday, 18:30
    (local_time(2026, 3, 4, 7), False),    # Wednesday, 07:30
    (local_time(2026, 3, 7, 10), False),   # Saturday, 10:30
])
def test_batch_jobs_use_cpus_in_working_hours(examples: dict[str, ScriptScheduler],
                                              when: float, rule: bool) -> None:
    s = examples["time_of_day"]
    pools = [pool("box", devices=[device("cuda:0", free_gib=20), device("cpu", free_gib=16)],
                  workers=[worker("g1", device="cuda:0", free=4), worker("c1", free=1)])]
    snap = snapshot(*pools, job=job(priority="batch"), now=when)
    verdict = decide(s, snap)
    if rule:
        assert targets(verdict) == [("dispatch", "box", "c1")]
        assert "batch jobs use CPUs during working hours" in verdict.summary
    else:
        assert verdict.policy == "least-loaded"
        assert targets(verdict) == [("dispatch", "box", "g1")]
    interactive = decide(s, snapshot(*pools, now=when))
    assert targets(interactive) == [("dispatch", "box", "g1")]


def test_batch_jobs_wait_for_a_cpu_in_working_hours(examples: dict[str, ScriptScheduler]) -> None:
    s = examples["time_of_day"]
    pools = [pool("box", devices=[device("cuda:0", free_gib=20), device("cpu", free_gib=0.5)],
                  workers=[worker("g1", device="cuda:0", free=4)])]
    verdict = decide(s, snapshot(*pools, job=job(priority="batch", memory_gib=2),
                                 now=local_time(2026, 3, 4, 11)))
    assert verdict.decisions[0].action == "wait"
    assert verdict.decisions[0].reason == ("batch jobs wait for a CPU during working hours "
                                           "(8:00 to 18:00 on weekdays)")
