"""Slots and cores of the workers a policy starts: the accounting, over fake snapshots.

Pure functions and the built-in policies only; the processes are in tests/test_cores.py.
"""

from __future__ import annotations

from rbees_scheduler_builtin.policies import POLICIES, LeastLoaded

from rbees_core.placement import cores_to_start
from rbees_core.replay import apply_verdict, replay
from rbees_core.testing.scheduler import device, job, pool, snapshot, targets, worker

DEFAULTS = {"cpu": {"slots": 4, "ctx": 2048, "threads": None},
            "gpu": {"slots": 8, "ctx": 2048, "threads": 1}}


def two_core_pool(*workers: dict, free: int = 2, models: tuple[str, ...] = ("smollm2", "llama")
                  ) -> dict:
    return pool("p", devices=[device("cpu", free_gib=8, cores=2, cores_free=free)],
                workers=list(workers), models=list(models))


def test_cores_to_start_counts_the_free_cores_of_the_cpu() -> None:
    p = pool("p", devices=[device("cpu", cores=8, cores_free=3), device("cuda:0")])
    assert cores_to_start(p, "cpu", None) == 3          # every free core
    assert cores_to_start(p, "cpu", 2) == 2             # what [placement] cpu_threads asks
    assert cores_to_start(p, "cpu", 16) == 3            # never more than are free
    assert cores_to_start(p, "cuda:0", None) == 1       # a GPU worker's host thread
    full = pool("p", devices=[device("cpu", cores=8, cores_free=0), device("cuda:0")])
    assert cores_to_start(full, "cpu", None) == 0       # must not start there
    assert cores_to_start(full, "cuda:0", None) == 1    # a GPU worker is never refused
    assert cores_to_start(pool("p"), "cpu", None) is None  # the pool counts no cores


def test_the_first_cpu_worker_gets_every_core_and_the_configured_slots() -> None:
    verdict = LeastLoaded().decide(snapshot(two_core_pool(), job=job(memory_gib=1),
                                            worker_defaults=DEFAULTS))
    start = verdict.decisions[0]
    assert (start.action, start.device, start.slots, start.ctx, start.threads) == (
        "start_worker", "cpu", 4, 2048, 2)
    assert "with 2 cores" in verdict.summary


def test_concurrent_jobs_fill_the_slots_of_one_worker_before_a_copy() -> None:
    """Four jobs for one model on a 2-core pool: one worker with 4 slots takes them all,
    and a fifth waits rather than start a second copy on cores that are taken."""
    snap = snapshot(two_core_pool(), worker_defaults=DEFAULTS).data
    jobs = [{"model": "smollm2", "memory_bytes": 2 ** 30} for _ in range(5)]
    steps = replay(LeastLoaded().decide, snap, jobs)
    actions = [[d.action for d in v.decisions] for _, v in steps]
    assert actions == [["start_worker"], ["wait"], ["wait"], ["wait"], ["wait"]]
    assert [d.worker_id for _, v in steps[1:4] for d in v.decisions] == ["sim-1"] * 3
    assert "no free core" in (steps[4][1].decisions[0].reason or "")


def test_a_full_worker_gets_a_copy_on_another_device_first() -> None:
    p = pool("p", devices=[device("cpu", cores=8, cores_free=6), device("cuda:0", free_gib=8),
                           device("cuda:1", free_gib=4)],
             workers=[worker("w0", device="cuda:0", slots=8, free=0, cpus=[0])])
    verdict = LeastLoaded().decide(snapshot(p, job=job(memory_gib=1), worker_defaults=DEFAULTS))
    assert targets(verdict) == [("start_worker", "p", "cuda:1")]
    assert verdict.decisions[0].slots == 8 and verdict.decisions[0].threads == 1


def test_a_worker_of_another_model_holding_every_core_gives_half() -> None:
    """No core free, one worker of another model holds both: it is halved for the new
    model (its pool moves it to one core; idle or busy, it is neither stopped nor shared),
    and the replayed snapshot shows each on a core of its own."""
    for state, free in (("ready", 4), ("busy", 3)):
        other = worker("w-llama", model="llama", state=state, slots=4, free=free, cpus=[0, 1])
        for cls in POLICIES:
            snap = snapshot(two_core_pool(other, free=0), job=job(memory_gib=1))
            verdict = cls().decide(snap)
            assert targets(verdict) == [("start_worker", "p", "cpu")], (cls, state)
            assert verdict.decisions[0].threads == 1
            assert "with 1 core" in verdict.summary
        data = snapshot(two_core_pool(other, free=0)).data
        apply_verdict(data, job(memory_gib=1), verdict)
        cpus = {w["worker_id"]: w["cpus"] for w in data["pools"][0]["workers"]}
        assert cpus == {"w-llama": [0], "sim-2": [1]}


def test_no_core_is_given_to_a_second_copy_of_a_model() -> None:
    """Its own model's worker holds both cores: the job waits for one of its slots."""
    mine = worker("w1", slots=4, free=0, state="busy", cpus=[0, 1])
    verdict = LeastLoaded().decide(snapshot(two_core_pool(mine, free=0), job=job(memory_gib=1)))
    assert [d.action for d in verdict.decisions] == ["wait"]
    assert cores_to_start(two_core_pool(mine, free=0), "cpu", None, "smollm2") == 0
    assert cores_to_start(two_core_pool(mine, free=0), "cpu", None, "llama") == 1


def one_core_each(state: str) -> list[dict]:
    free = 4 if state == "ready" else 3
    return [worker("w-llama", model="llama", state=state, slots=4, free=free, cpus=[0]),
            worker("w-qwen", model="qwen", state=state, slots=4, free=free, cpus=[1])]


def test_an_idle_worker_of_another_model_is_stopped_for_its_cores() -> None:
    """No core free and none to give (one each): an idle worker of another model goes."""
    for cls in POLICIES:
        verdict = cls().decide(snapshot(two_core_pool(*one_core_each("ready"), free=0,
                                                      models=("smollm2", "llama", "qwen")),
                                        job=job(memory_gib=1)))
        assert targets(verdict)[-1] == ("wait", None, None)
        assert targets(verdict)[0][0] == "stop_worker"
        assert "idle" in (verdict.decisions[1].reason or "")


def test_a_busy_worker_of_another_model_keeps_its_cores() -> None:
    verdict = LeastLoaded().decide(snapshot(two_core_pool(*one_core_each("busy"), free=0,
                                                          models=("smollm2", "llama", "qwen")),
                                            job=job(memory_gib=1)))
    assert [d.action for d in verdict.decisions] == ["wait"]
    assert "held by" in (verdict.decisions[0].reason or "")


def test_two_models_split_the_cores_when_each_asks_for_one() -> None:
    """``[placement] cpu_threads = 1``: two CPU workers of different models, a core each."""
    defaults = {"cpu": {"slots": 4, "ctx": None, "threads": 1}}
    data = snapshot(two_core_pool(), worker_defaults=defaults).data
    first = LeastLoaded().decide(snapshot(*data["pools"], job=job("smollm2", memory_gib=1),
                                          worker_defaults=defaults))
    assert first.decisions[0].threads == 1
    apply_verdict(data, job("smollm2", memory_gib=1), first)
    assert data["pools"][0]["devices"][0]["cores_free"] == 1
    second = LeastLoaded().decide(snapshot(*data["pools"], job=job("llama", memory_gib=1),
                                           worker_defaults=defaults))
    assert targets(second) == [("start_worker", "p", "cpu")] and second.decisions[0].threads == 1


def test_a_busy_worker_of_another_model_is_stopped_once_the_job_waited() -> None:
    """A model in steady use does not starve another of the cores: after 10 s of waiting,
    a busy worker is stopped (gracefully: its running jobs finish)."""
    verdict = LeastLoaded().decide(snapshot(two_core_pool(*one_core_each("busy"), free=0,
                                                          models=("smollm2", "llama", "qwen")),
                                            job=job(memory_gib=1, waited_s=12.0)))
    assert targets(verdict)[0][0] == "stop_worker"
    assert targets(verdict)[-1] == ("wait", None, None)
    assert "waited 12 s" in (verdict.decisions[-1].reason or "")
