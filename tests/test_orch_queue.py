"""The orchestrator's two-lane queue: order, promotion, capacity, and a reference model."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from rbees_core.api.orchestrator import Placement
from rbees_core.orchestrator import (
    JobExistsError,
    JobQueue,
    QueueDepths,
    QueueFullError,
    _sortedkeys,
)


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ids(queue: JobQueue) -> list[str]:
    return [job.job_id for job in queue]


@pytest.fixture
def clock() -> Clock:
    return Clock()


# -- order ----------------------------------------------------------------------------------


def test_interactive_jobs_go_before_batch_jobs(clock: Clock) -> None:
    queue = JobQueue(clock=clock)
    for job_id, priority in [("b1", "batch"), ("i1", "interactive"), ("b2", "batch"),
                             ("i2", "interactive")]:
        queue.push(job_id, priority)  # type: ignore[arg-type]
    assert ids(queue) == ["i1", "i2", "b1", "b2"]
    assert queue.depths() == QueueDepths(interactive=2, promoted=0, batch=2)
    assert [queue.pop_next().job_id for _ in range(4)] == ["i1", "i2", "b1", "b2"]  # type: ignore[union-attr]
    assert queue.pop_next() is None


def test_each_lane_is_fifo(clock: Clock) -> None:
    queue = JobQueue(clock=clock)
    for n in range(50):
        queue.push(f"j{n}", "batch" if n % 2 else "interactive")
        clock.now += 1
    order = ids(queue)
    assert order == [f"j{n}" for n in range(0, 50, 2)] + [f"j{n}" for n in range(1, 50, 2)]
    assert [queue.position(j) for j in order] == list(range(50))


def test_the_default_priority_is_interactive(clock: Clock) -> None:
    queue = JobQueue(clock=clock)
    queue.push("b", "batch")
    pushed = queue.push("i")
    assert pushed.job.priority == "interactive" and pushed.position == 0


# -- promotion ------------------------------------------------------------------------------


def test_batch_jobs_waiting_over_five_minutes_are_promoted(clock: Clock) -> None:
    queue = JobQueue(clock=clock)
    t0 = clock.now
    queue.push("i0", "interactive")
    queue.push("b1", "batch")
    clock.now = t0 + 10
    queue.push("i1", "interactive")
    clock.now = t0 + 100
    queue.push("b2", "batch")
    clock.now = t0 + 300  # waited exactly 300 s: not yet
    assert ids(queue) == ["i0", "i1", "b1", "b2"]
    assert not queue.is_promoted("b1")
    clock.now = t0 + 300.001
    # b1 jumps ahead of i1 (which arrived after it), not ahead of i0 (which arrived before).
    assert ids(queue) == ["i0", "b1", "i1", "b2"]
    assert queue.is_promoted("b1") and not queue.is_promoted("i1")
    assert queue.depths() == QueueDepths(interactive=2, promoted=1, batch=1)
    assert queue.position("i1") == 2
    clock.now = t0 + 350
    queue.push("i3", "interactive")
    assert ids(queue) == ["i0", "b1", "i1", "i3", "b2"]
    clock.now = t0 + 400.5
    # b2 arrived after i1 but before i3.
    assert ids(queue) == ["i0", "b1", "i1", "b2", "i3"]
    assert queue.depths() == QueueDepths(interactive=3, promoted=2, batch=0)
    assert [queue.pop_next().job_id for _ in range(5)] == ["i0", "b1", "i1", "b2", "i3"]  # type: ignore[union-attr]


def test_promotion_uses_the_given_since_and_can_be_disabled(clock: Clock) -> None:
    queue = JobQueue(clock=clock, promote_after_s=60)
    queue.push("i", "interactive")
    pushed = queue.push("old", "batch", since=clock.now - 61, seq=0)
    assert pushed.position == 0 and ids(queue) == ["old", "i"]
    never = JobQueue(clock=clock, promote_after_s=None)
    never.push("b", "batch")
    never.push("i", "interactive")
    clock.now += 10**6
    assert ids(never) == ["i", "b"]


def test_a_retried_job_keeps_its_place(clock: Clock) -> None:
    queue = JobQueue(clock=clock, capacity=3)
    for n in range(3):
        queue.push(f"j{n}")
    first = queue.pop_next()
    assert first is not None
    queue.push("j3")
    again = queue.push(first.job_id, first.priority, seq=first.seq, since=first.since, force=True)
    assert again.position == 0 and len(queue) == 4
    assert ids(queue) == ["j0", "j1", "j2", "j3"]


# -- capacity -------------------------------------------------------------------------------


def test_reject_policy_capacity_10_with_20_submissions(clock: Clock) -> None:
    queue = JobQueue(capacity=10, policy="reject", clock=clock, retry_after_s=3)
    for n in range(10):
        pushed = queue.push(f"j{n}", "batch" if n % 3 == 0 else "interactive")
        assert pushed.dropped is None
    before = ids(queue)
    for n in range(10, 20):
        with pytest.raises(QueueFullError) as caught:
            queue.push(f"j{n}", "batch" if n % 3 == 0 else "interactive")
        error = caught.value
        assert (error.code, error.status, error.retriable) == ("QUEUE_FULL", 429, True)
        assert error.retry_after_s == 3
        assert error.details == {"retry_after_ms": 3000, "capacity": 10, "policy": "reject"}
        assert f"j{n}" not in queue
    assert ids(queue) == before and len(queue) == 10


def test_drop_oldest_batch_policy_capacity_10_with_20_submissions(clock: Clock) -> None:
    queue = JobQueue(capacity=10, policy="drop-oldest-batch", clock=clock)
    answers: list[str] = []
    for n in range(20):
        priority = "batch" if n % 3 == 0 else "interactive"
        try:
            pushed = queue.push(f"j{n}", priority)  # type: ignore[arg-type]
        except QueueFullError:
            answers.append("rejected")
        else:
            answers.append(f"dropped {pushed.dropped.job_id}" if pushed.dropped else "queued")
        clock.now += 1
    # j0..j9 fit; each later job evicts the oldest batch job (j12, itself batch, evicts j6)
    # until only interactive jobs are left, then the policy rejects like "reject".
    assert answers == ["queued"] * 10 + [
        "dropped j0", "dropped j3", "dropped j6", "dropped j9", "dropped j12",
        "rejected", "rejected", "rejected", "rejected", "rejected",
    ]
    assert ids(queue) == ["j1", "j2", "j4", "j5", "j7", "j8", "j10", "j11", "j13", "j14"]


def test_drop_oldest_batch_takes_promoted_batch_jobs_first(clock: Clock) -> None:
    queue = JobQueue(capacity=2, policy="drop-oldest-batch", clock=clock)
    queue.push("b-old", "batch")
    clock.now += 301
    queue.push("b-new", "batch")
    assert queue.is_promoted("b-old")
    pushed = queue.push("i", "interactive")
    assert pushed.dropped is not None and pushed.dropped.job_id == "b-old"
    assert ids(queue) == ["i", "b-new"]


def test_force_admits_past_capacity(clock: Clock) -> None:
    queue = JobQueue(capacity=1, clock=clock)
    queue.push("a")
    queue.push("b", force=True)
    assert len(queue) == 2
    with pytest.raises(QueueFullError):
        queue.push("c")


def test_bad_arguments(clock: Clock) -> None:
    with pytest.raises(ValueError, match="capacity"):
        JobQueue(capacity=0)
    with pytest.raises(ValueError, match="policy"):
        JobQueue(policy="drop-newest")  # type: ignore[arg-type]
    queue = JobQueue(clock=clock)
    queue.push("a", seq=5)
    with pytest.raises(JobExistsError):
        queue.push("a")
    with pytest.raises(ValueError, match="seq 5"):
        queue.push("b", seq=5)
    with pytest.raises(ValueError, match="priority"):
        queue.push("c", "urgent")  # type: ignore[arg-type]
    assert queue.push("d").job.seq == 6


# -- remove, position, pop_next -------------------------------------------------------------


def test_remove_and_position_agree(clock: Clock) -> None:
    queue = JobQueue(clock=clock)
    for n in range(6):
        queue.push(f"j{n}", "batch" if n in (1, 4) else "interactive")
    assert ids(queue) == ["j0", "j2", "j3", "j5", "j1", "j4"]
    removed = queue.remove("j3")
    assert removed is not None and removed.job_id == "j3"
    assert queue.remove("j3") is None and queue.position("j3") is None
    assert queue.remove("nope") is None
    assert {j: queue.position(j) for j in ids(queue)} == {
        "j0": 0, "j2": 1, "j5": 2, "j1": 3, "j4": 4,
    }
    queue.remove("j1")
    assert queue.position("j4") == 3
    assert queue.depths() == QueueDepths(interactive=3, promoted=0, batch=1)
    assert queue.head(2) == [queue.get("j0"), queue.get("j2")]


def test_pop_next_skips_jobs_the_predicate_refuses(clock: Clock) -> None:
    queue = JobQueue(clock=clock)
    queue.push("a", model="big")
    queue.push("b", model="small", placement=Placement(pool="p1"))
    queue.push("c", "batch", model="small")
    taken = queue.pop_next(lambda job: job.model == "small")
    assert taken is not None and taken.job_id == "b" and taken.placement == Placement(pool="p1")
    assert ids(queue) == ["a", "c"]
    assert queue.pop_next(lambda job: job.model == "none") is None
    assert ids(queue) == ["a", "c"]


def test_one_hundred_thousand_jobs(clock: Clock) -> None:
    queue = JobQueue(capacity=200_000, clock=clock)
    n = 100_000
    started = time.perf_counter()
    for k in range(n):
        queue.push(f"j{k}", "batch" if k % 4 == 0 else "interactive")
        if k % 1000 == 0:
            clock.now += 1  # a quarter of the batch jobs end up promoted
    assert len(queue) == n
    for k in range(0, n, 7):
        queue.position(f"j{k}")
    for k in range(1, n, 3):
        queue.remove(f"j{k}")
    clock.now += 250
    depths = queue.depths()
    assert depths.promoted > 0 and depths.batch > 0
    last = -1
    while (job := queue.pop_next()) is not None:
        last = job.seq
    assert last > 0 and len(queue) == 0
    # Quadratic behaviour would take minutes; this takes about a second.
    assert time.perf_counter() - started < 30


# -- reference model ------------------------------------------------------------------------

PROMOTE = 300.0


class Reference:
    """The queue as the docstring states it, computed naively."""

    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity, self.policy = capacity, policy
        self.jobs: dict[str, tuple[str, int, float, str]] = {}  # id -> priority, seq, since, model
        self.next_seq = 1

    def order(self, now: float) -> list[str]:
        def key(item: tuple[str, tuple[str, int, float, str]]) -> tuple[int, int]:
            priority, seq, since, _ = item[1]
            fast = priority == "interactive" or now - since > PROMOTE
            return (0 if fast else 1, seq)

        return [job_id for job_id, _ in sorted(self.jobs.items(), key=key)]

    def push(self, job_id: str, priority: str, model: str, now: float, *,
             seq: int | None = None, since: float | None = None,
             force: bool = False) -> str | None:
        dropped = None
        if not force and len(self.jobs) >= self.capacity:
            batch = [(v[1], k) for k, v in self.jobs.items() if v[0] == "batch"]
            if self.policy == "reject" or not batch:
                return "full"
            dropped = min(batch)[1]
            del self.jobs[dropped]
        seq = self.next_seq if seq is None else seq
        self.next_seq = max(self.next_seq, seq + 1)
        self.jobs[job_id] = (priority, seq, now if since is None else since, model)
        return dropped


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(0.0)
        self.counter = 0
        self.popped: list[Any] = []

    @initialize(capacity=st.integers(1, 12), policy=st.sampled_from(["reject",
                                                                     "drop-oldest-batch"]))
    def setup(self, capacity: int, policy: str) -> None:
        self.queue = JobQueue(capacity=capacity, policy=policy,  # type: ignore[arg-type]
                              promote_after_s=PROMOTE, clock=self.clock)
        self.ref = Reference(capacity, policy)

    @rule(priority=st.sampled_from(["interactive", "batch"]), model=st.sampled_from("ab"))
    def push(self, priority: str, model: str) -> None:
        self.counter += 1
        job_id = f"j{self.counter}"
        expected = self.ref.push(job_id, priority, model, self.clock.now)
        try:
            pushed = self.queue.push(job_id, priority, model=model)  # type: ignore[arg-type]
        except QueueFullError:
            assert expected == "full"
            return
        assert expected != "full"
        assert (pushed.dropped.job_id if pushed.dropped else None) == expected
        assert pushed.position == self.ref.order(self.clock.now).index(job_id)

    @rule(seconds=st.sampled_from([0.0, 1.0, 60.0, 150.0, 299.0, 300.0, 301.0, 1000.0]))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(model=st.sampled_from(["a", "b", None]))
    def pop(self, model: str | None) -> None:
        order = self.ref.order(self.clock.now)
        wanted = [j for j in order if model is None or self.ref.jobs[j][3] == model]
        job = self.queue.pop_next(None if model is None else (lambda q: q.model == model))
        assert (job.job_id if job else None) == (wanted[0] if wanted else None)
        if job is not None:
            del self.ref.jobs[job.job_id]
            self.popped.append(job)

    @precondition(lambda self: self.popped)
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        job = self.popped.pop(data.draw(st.integers(0, len(self.popped) - 1)))
        self.ref.push(job.job_id, job.priority, job.model, self.clock.now, seq=job.seq,
                      since=job.since, force=True)
        self.queue.push(job.job_id, job.priority, model=job.model, seq=job.seq,
                        since=job.since, force=True)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        candidates = [*sorted(self.ref.jobs), "missing"]
        job_id = data.draw(st.sampled_from(candidates))
        removed = self.queue.remove(job_id)
        assert (removed is not None) == (job_id in self.ref.jobs)
        self.ref.jobs.pop(job_id, None)

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "queue"):
            return
        order = self.ref.order(self.clock.now)
        assert ids(self.queue) == order
        assert [self.queue.position(j) for j in order] == list(range(len(order)))
        depths = self.queue.depths()
        batch = [j for j in order if self.ref.jobs[j][0] == "batch"]
        slow = [j for j in batch if self.clock.now - self.ref.jobs[j][2] <= PROMOTE]
        assert depths == QueueDepths(interactive=len(order) - len(batch),
                                     promoted=len(batch) - len(slow), batch=len(slow))
        assert len(self.queue) == len(order)


@pytest.mark.parametrize("load", [4, _sortedkeys.LOAD], ids=["small-buckets", "real-buckets"])
def test_queue_agrees_with_the_reference_model(load: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny buckets make every split, merge and bucket removal happen in short runs.
    monkeypatch.setattr(_sortedkeys, "LOAD", load)
    run_state_machine_as_test(
        QueueMachine,
        settings=settings(max_examples=150, stateful_step_count=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )


def test_sorted_keys_against_a_sorted_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sortedkeys, "LOAD", 4)
    keys = _sortedkeys.SortedKeys()
    model: list[int] = []
    rng = random.Random(7)
    for _ in range(5000):
        k = rng.randrange(300)
        if k in model:
            keys.remove(k)
            model.remove(k)
            with pytest.raises(KeyError):
                keys.remove(k)
        else:
            keys.add(k)
            model.append(k)
            model.sort()
            with pytest.raises(KeyError):
                keys.add(k)
        probe = rng.randrange(-5, 305)
        assert keys.rank(probe) == sum(1 for m in model if m < probe)
        assert (probe in keys) == (probe in model)
        assert keys.first() == (model[0] if model else None)
    assert list(keys) == model and len(keys) == len(model)
