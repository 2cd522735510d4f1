"""rbees-orcd's service in this process, against a real SmolLM2 worker: what no HTTP test
can reach, such as an admission whose write fails after its job was sent to the worker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbees_core import plugins
from rbees_core.api.orchestrator import TaskRequest
from rbees_core.api.pool import CpuEntry, PoolHeartbeat, WorkerEntry
from rbees_core.log import Logger
from rbees_core.orchestrator.channel import Channel, Event
from rbees_core.orchestrator.errors import JobNotFoundError, StoreError
from rbees_core.orchestrator.service import OrcdSettings, OrchestratorService
from rbees_core.testing import WorkerHandle


def beat(worker: WorkerHandle | None, pool_id: str = "here", seq: int = 1) -> PoolHeartbeat:
    """A heartbeat of pool ``pool_id`` with ``worker`` ready on it (or no worker)."""
    entries = [] if worker is None else [WorkerEntry(
        worker_id=worker.worker_id, model_ref="smollm2", backend="llamacpp", device="cpu",
        uri=worker.url, pid=worker.process.proc.pid, state="ready", slots_total=1,
        slots_free=1, memory_bytes=0, started_at=time.time())]
    return PoolHeartbeat(pool_id=pool_id, host=pool_id, gpus=[], models=[], workers=entries,
                         cpu=CpuEntry(cores=2, ram_total_bytes=2**34, ram_free_bytes=2**33),
                         url="http://127.0.0.1:1", seq=seq, sent_at=time.time())


def new_service(tmp_path: Path, **settings: Any) -> OrchestratorService:
    """A service (not started) with its database under ``tmp_path`` and the builtin
    plugins."""
    return OrchestratorService(OrcdSettings(db_path=str(tmp_path / "orcd.sqlite3"), **settings),
                               plugins.make_manager(plugins.builtin_plugins()),
                               Logger("rbees-orcd"))


@pytest.fixture
async def service(tmp_path: Path, worker: WorkerHandle) -> AsyncIterator[OrchestratorService]:
    svc = new_service(tmp_path)
    await svc.start()
    svc.heartbeat(beat(worker))
    yield svc
    await svc.close()


async def busy_slots(worker: WorkerHandle, count: int) -> bool:
    """Whether the worker reports ``count`` busy slots within 2 s (its /metrics, polled)."""
    for _ in range(200):
        metrics = (await asyncio.to_thread(httpx.get, f"{worker.url}/metrics")).text
        if f"rbees_worker_slots_busy {float(count)}" in metrics:
            return True
        await asyncio.sleep(0.01)
    return False


async def finished(svc: OrchestratorService, job_id: str) -> list[tuple[int, str, Any]]:
    for _ in range(600):
        channel = svc.book.channels.get(job_id)
        if channel is not None and channel.done:
            return channel.history
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} did not finish")


async def test_a_failed_admission_takes_back_the_job_it_already_sent(
        service: OrchestratorService, worker: WorkerHandle) -> None:
    """At the head of the queue a job goes to its worker while its admission is written.
    When that write fails, the client gets the error, the worker is told to stop (its
    connection is closed), the slot is free again, and nothing of the job remains."""
    svc = service
    # a first job leaves a kept-alive connection: the next one is written to it in submit
    first = await svc.submit(TaskRequest(model="smollm2", prompt="Hello", max_tokens=2))
    assert (await finished(svc, first.job_id))[-1][1] == "end"
    for _ in range(100):
        if svc._upstream._idle:
            break
        await asyncio.sleep(0.02)
    assert svc._upstream._idle
    admit = svc.store.admit_soon
    sent = asyncio.Event()

    async def failing() -> Any:
        if await busy_slots(worker, 1):  # the worker has the job: it was sent first
            sent.set()
        raise StoreError("disk full")

    svc.store.admit_soon = (  # type: ignore[method-assign]
        lambda *args, **kwargs: asyncio.ensure_future(failing()))
    with pytest.raises(StoreError, match="disk full"):
        await svc.submit(TaskRequest(model="smollm2", prompt="Once upon a time",
                                     max_tokens=200, seed=1))
    assert sent.is_set()
    svc.store.admit_soon = admit  # type: ignore[method-assign]
    for _ in range(200):
        if not svc.book.runs and svc.registry.free_slots("here", svc.registry.pools["here"]
                                                    .workers[worker.worker_id]) == 1:
            break
        await asyncio.sleep(0.05)
    assert not svc.book.runs and not svc.queue and list(svc.book.channels) == [first.job_id]
    jobs = (await asyncio.to_thread(svc.store.list_jobs, None, limit=10)).jobs
    assert [job.job_id for job in jobs] == [first.job_id]
    # the worker lets go of the job (it notices the hang-up at its next token), and the
    # next one runs there and completes
    assert await busy_slots(worker, 0)
    accepted = await svc.submit(TaskRequest(model="smollm2", prompt="Once upon a time",
                                            max_tokens=8, seed=1))
    history = await finished(svc, accepted.job_id)
    assert [event for _, event, _ in history][:3] == ["queued", "dispatched", "started"]
    assert history[-1][1] == "end"


async def test_an_admission_whose_caller_is_cancelled_is_still_served(
        service: OrchestratorService, worker: WorkerHandle) -> None:
    """A submit cancelled once its write has committed (a server that shuts down cancels
    its handlers): the job is durable, so this process serves it to its end instead of
    forgetting it until the next restart."""
    svc = service
    admit = svc.store.admit_soon
    committed = asyncio.Event()

    async def slow(write: asyncio.Future[Any]) -> Any:
        record = await write
        committed.set()
        await asyncio.sleep(0.2)  # the caller is cancelled here, after the commit
        return record

    svc.store.admit_soon = (  # type: ignore[method-assign]
        lambda *args, **kwargs: asyncio.ensure_future(slow(admit(*args, **kwargs))))
    submit = asyncio.create_task(svc.submit(TaskRequest(
        model="smollm2", prompt="Once upon a time", max_tokens=8, seed=1)))
    await asyncio.wait_for(committed.wait(), 30)
    submit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await submit
    svc.store.admit_soon = admit  # type: ignore[method-assign]
    jobs = (await asyncio.to_thread(svc.store.list_jobs, None, limit=10)).jobs
    assert len(jobs) == 1
    history = await finished(svc, jobs[0].job_id)
    assert [event for _, event, _ in history][:3] == ["queued", "dispatched", "started"]
    assert history[-1][1] == "end"
    record = await asyncio.to_thread(svc.store.get, jobs[0].job_id)
    assert record.status == "completed"


@pytest.fixture
async def full_at_two(tmp_path: Path) -> AsyncIterator[OrchestratorService]:
    """A service whose queue holds two jobs and drops its oldest batch job for a third; no
    pool, so every job stays queued."""
    svc = new_service(tmp_path, capacity=2, policy="drop-oldest-batch")
    await svc.start()
    yield svc
    await svc.close()


@contextlib.contextmanager
def failing_admissions(svc: OrchestratorService) -> Iterator[asyncio.Event]:
    """Every admission's write fails ("disk full") once the yielded event is set."""
    admit = svc.store.admit_soon
    release = asyncio.Event()

    async def failing() -> Any:
        await release.wait()
        raise StoreError("disk full")

    svc.store.admit_soon = (  # type: ignore[method-assign]
        lambda *args, **kwargs: asyncio.ensure_future(failing()))
    try:
        yield release
    finally:
        svc.store.admit_soon = admit  # type: ignore[method-assign]


def batch(prompt: str) -> TaskRequest:
    return TaskRequest(model="smollm2", prompt=prompt, priority="batch")


async def test_a_failed_admission_puts_back_the_job_it_dropped(
        full_at_two: OrchestratorService) -> None:
    """drop-oldest-batch makes room in a full queue by dropping its oldest batch job. When
    the admission it made room for fails to commit, the dropped job goes back to its place,
    still queued: a failed admission loses nothing. One cancelled meanwhile stays
    cancelled; an admission that commits drops for good."""
    svc = full_at_two

    async def status(job_id: str) -> str:
        return (await asyncio.to_thread(svc.store.get, job_id)).status

    a = await svc.submit(batch("a"))
    b = await svc.submit(batch("b"))
    with failing_admissions(svc) as release:
        c = asyncio.create_task(svc.submit(batch("c")))
        await asyncio.sleep(0.05)
        assert list(svc.book.dropping) == [a.job_id] and a.job_id not in svc.queue
        release.set()
        with pytest.raises(StoreError, match="disk full"):
            await c
        assert [job.job_id for job in svc.queue] == [a.job_id, b.job_id]
        assert not svc.book.dropping and await status(a.job_id) == "queued"
        assert not svc.book.channels[a.job_id].done

        release.clear()  # this time the dropped job is cancelled while the write is pending
        d = asyncio.create_task(svc.submit(batch("d")))
        await asyncio.sleep(0.05)
        assert list(svc.book.dropping) == [a.job_id]
        assert await svc.cancel(a.job_id)
        release.set()
        with pytest.raises(StoreError, match="disk full"):
            await d
        assert [job.job_id for job in svc.queue] == [b.job_id]
        assert await status(a.job_id) == "cancelled"

    e = await svc.submit(batch("e"))
    f = await svc.submit(batch("f"))  # full again: b is dropped, for good this time
    assert [job.job_id for job in svc.queue] == [e.job_id, f.job_id]
    record = await asyncio.to_thread(svc.store.get, b.job_id)
    assert record.status == "failed" and record.error is not None
    assert record.error.code == "QUEUE_FULL_DROPPED"
    assert not svc.book.dropping


async def test_a_job_whose_own_admission_failed_is_not_put_back(
        full_at_two: OrchestratorService) -> None:
    """Two batch admissions in flight behind an interactive job in a full queue: the second
    drops the first, which is the oldest batch job though not yet durable. When both writes
    fail, neither job may come back to the queue (a job with no row in the store there
    would take a worker's slot, or fail the admission that later drops it)."""
    svc = full_at_two
    first = await svc.submit(TaskRequest(model="smollm2", prompt="i"))
    with failing_admissions(svc) as release:
        both = [asyncio.create_task(svc.submit(batch(prompt))) for prompt in ("b", "y")]
        await asyncio.sleep(0.05)
        assert len(svc.book.dropping) == 1 and len(svc.queue) == 2
        release.set()
        for task in both:
            with pytest.raises(StoreError, match="disk full"):
                await task
    assert [job.job_id for job in svc.queue] == [first.job_id]
    assert not svc.book.dropping and list(svc.book.channels) == [first.job_id]
    later = [await svc.submit(batch(prompt)) for prompt in ("c", "d")]  # d drops c
    assert [job.job_id for job in svc.queue] == [first.job_id, later[1].job_id]
    assert (await asyncio.to_thread(svc.store.get, later[0].job_id)).status == "failed"


async def test_what_a_heartbeat_changed_is_not_counted_again_by_the_aging_pass(
        tmp_path: Path) -> None:
    """A registration changes what policies read once: the aging pass that follows must not
    bump the version for it a second time (each bump is a decision over every pool, 10-20 ms
    of the loop with 1,000 of them). What only aging sees still bumps it."""
    svc = new_service(tmp_path)
    try:  # not started: this test runs the aging pass itself
        svc.pools.age()
        registered = svc.book.version
        svc.heartbeat(beat(None, "p1", seq=5))
        assert svc.book.version > registered
        registered = svc.book.version
        svc.pools.aged_at = 0.0  # due now
        svc.pools.age()
        assert svc.book.version == registered
        svc.registry.pools["p1"].last_seen -= 1000.0  # silent: offline
        # late, out of order: ignored, and it must not hide that
        svc.heartbeat(beat(None, "p1", seq=4))
        assert svc.book.version == registered
        svc.pools.aged_at = 0.0
        svc.pools.age()
        assert svc.book.version == registered + 1
        assert svc.deregister("p1")
        deregistered = svc.book.version
        svc.pools.aged_at = 0.0
        svc.pools.age()
        assert svc.book.version == deregistered
    finally:
        await svc._client.aclose()
        svc._upstream.close()
        svc.store.close()


async def test_follow_replays_from_the_channel_then_from_the_store(
        service: OrchestratorService) -> None:
    """``follow`` gives a job's events after the one asked for: from its channel while this
    process has it, from the store once the channel is retired; the same events both ways."""
    svc = service
    accepted = await svc.submit(TaskRequest(model="smollm2", prompt="Hello", max_tokens=3))
    history = await finished(svc, accepted.job_id)
    await svc.runner.flush()  # tokens are written in batches: all of them now
    live = await svc.follow(accepted.job_id, 1)
    live.close()
    assert live.live is not None and live.done and live.backlog == history[1:]
    del svc.book.channels[accepted.job_id]  # retired
    stored = await svc.follow(accepted.job_id, 1)
    assert stored.live is None and stored.done
    assert [(i, e) for i, e, _ in stored.backlog] == [(i, e) for i, e, _ in history[1:]]
    with pytest.raises(JobNotFoundError):
        await svc.follow("job-nope", 0)
    delivered: list[Event] = []  # with a deliver: the same events, handed to it
    given = await svc.follow(accepted.job_id, 1, deliver=delivered.append)
    assert (given.backlog, given.live, given.done) == ([], None, True)
    assert [(i, e) for i, e, _ in delivered] == [(i, e) for i, e, _ in history[1:]]


def test_a_deliver_gets_the_backlog_then_each_event_as_published_until_detached() -> None:
    """What a stream's own queue receives from a channel (Jobs' sink): in order, at once,
    and nothing after it is detached, even when it detaches itself mid-publish."""
    channel = Channel("job-1")
    channel.publish("queued", {}, persisted=True)
    channel.publish("started", {}, persisted=True)
    got: list[Event] = []
    others: list[Event] = []

    def leaving(item: Event) -> None:
        others.append(item)
        channel.detach(leaving)  # while publish iterates the subscribers

    channel.attach(1, got.append)
    channel.attach(2, leaving)
    backlog, queue = channel.subscribe(0)
    assert [e for _, e, _ in got] == ["started"] and not others
    channel.publish("token", {"t": "a"}, persisted=False)
    assert [e for _, e, _ in got] == ["started", "token"]
    assert [e for _, e, _ in others] == ["token"] and leaving not in channel.subscribers
    channel.detach(got.append)
    channel.publish("end", {}, persisted=True)
    assert len(got) == 2 and others == [(3, "token", {"t": "a"})]
    assert [e for _, e, _ in backlog] == ["queued", "started"]
    assert [queue.get_nowait()[1] for _ in range(2)] == ["token", "end"]
    channel.unsubscribe(queue)
    assert not channel.subscribers
    done: list[Event] = []
    channel.attach(0, done.append)  # an ended job: its backlog, and no subscription
    assert [e for _, e, _ in done] == ["queued", "started", "token", "end"]
    assert not channel.subscribers


async def test_the_batch_runner_of_an_idle_orchestrator_waits_to_be_woken(
        tmp_path: Path) -> None:
    """With no unfinished batch the runner asks SQLite once, then waits for a batch to be
    created (no tick, no thread hop twice a second forever); with one it looks again every
    tick (a batch waiting for its window, or its expiry, needs the clock)."""
    import datetime

    from rbees_core.programs.orcd_batch_runner import BatchRunner

    svc = new_service(tmp_path)
    await svc.start()
    runner = BatchRunner(svc, tick_s=0.02)
    looks = 0
    unfinished = runner.store.unfinished

    def counted() -> list[str]:
        nonlocal looks
        looks += 1
        return unfinished()

    async def until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline, looks
            await asyncio.sleep(0.01)

    runner.store.unfinished = counted  # type: ignore[method-assign]
    loop = asyncio.create_task(runner.loop())
    try:
        await until(lambda: looks == 1)
        await asyncio.sleep(0.4)
        assert looks == 1  # twenty ticks passed
        later = (datetime.datetime.now() + datetime.timedelta(hours=2)).strftime("%H:%M")
        end = (datetime.datetime.now() + datetime.timedelta(hours=3)).strftime("%H:%M")
        source = await runner.store.add_file("batch", "in.jsonl", b"{}\n")
        await runner.store.add_batch(
            endpoint="/v1/completions", input_file_id=source.file_id,
            completion_window="24h", window_s=86400, metadata={"rbees_window": f"{later}-{end}"},
            lines=[("a", {})], owner=None, owner_models=None)
        runner.wake()
        await until(lambda: looks >= 6)  # outside its window: looked at every tick
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await svc.close()
