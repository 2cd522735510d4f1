"""rbees-orcd's downloads (pull on first use) without a cluster: one download per model,
progress events throttled to the jobs waiting for it, a finished download in the snapshot
until a heartbeat shows it, a failure ending the waiting jobs and holding new ones off."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rbees_core.api.pool import DownloadedModel, DownloadProgress
from rbees_core.errors import DownloadError
from rbees_core.log import Logger
from rbees_core.orchestrator.book import Book
from rbees_core.orchestrator.downloads import MODEL_DOWNLOAD_FAILED, Downloads
from rbees_core.orchestrator.queue import JobQueue

MODEL = "tinyllama"


class FakeClient:
    def __init__(self, gate: asyncio.Event, *, fail: bool = False, steps: int = 200) -> None:
        self.gate = gate
        self.fail = fail
        self.steps = steps
        self.calls: list[str] = []

    async def models_download(self, model: str, *, progress: Any = None) -> DownloadedModel:
        self.calls.append(model)
        for i in range(1, self.steps + 1):  # far more often than 4 a second
            progress(DownloadProgress(bytes_done=i * 10, bytes_total=self.steps * 10,
                                      rate_bps=0.0))
            await asyncio.sleep(0.002)
        await self.gate.wait()
        if self.fail:
            raise DownloadError("the hub answered 404")
        return DownloadedModel(id=MODEL, ref=f"hf:x/{MODEL}.gguf", path="/m", size_bytes=2000,
                               sha256=None, source="hf", fetched=True)


class FakePools:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    def client_of(self, pool_id: str) -> FakeClient:
        return self.client


def make(client: FakeClient) -> tuple[Downloads, Book, JobQueue, list[tuple[str, str]]]:
    book, queue = Book(), JobQueue(capacity=16)
    ended: list[tuple[str, str]] = []

    async def end_queued(job_id: str, status: str, code: str, message: str, **_: Any) -> None:
        ended.append((job_id, code))

    downloads = Downloads(book, queue, FakePools(client), Logger("rbees-orcd"),  # type: ignore[arg-type]
                          provides=lambda m: m == MODEL, size_of=lambda m: 2000)
    downloads.end_queued = end_queued
    for job_id in ("j1", "j2"):
        queue.push(job_id, model=MODEL)
    queue.push("other", model="smollm2")
    return downloads, book, queue, ended


async def test_one_download_throttled_progress_and_the_model_in_the_snapshot() -> None:
    gate = asyncio.Event()
    client = FakeClient(gate)
    downloads, book, _, _ = make(client)
    assert downloads.job_fields(MODEL) == {"downloadable": True, "download_bytes": 2000}
    assert downloads.job_fields("pkg:local") == {}
    began = time.monotonic()
    downloads.start("p1", MODEL)
    downloads.start("p2", MODEL)  # a second job's decision: the same download
    while downloads.active[MODEL].bytes < 2000 and time.monotonic() - began < 30:
        await asyncio.sleep(0.01)  # 200 progress reports (the machine may be loaded)
    took = time.monotonic() - began
    assert client.calls == [MODEL] and downloads.count == 1
    pools = downloads.decorate([{"pool_id": "p1", "models": []}])
    assert pools[0]["downloading"] == [{"model": MODEL, "bytes": 2000, "total": 2000}]
    assert downloads.describe(MODEL) == f"downloading {MODEL} to pool p1 (2000 of 2000 bytes)"
    gate.set()
    await asyncio.sleep(0.05)
    for job_id in ("j1", "j2"):
        seen = [data for _, event, data in book.channel(job_id).history
                if event == "downloading"]
        # at most 4 a second, and the last one at the end
        assert 2 <= len(seen) <= 4 * took + 3, (len(seen), took)
        assert seen[-1] == {"model": MODEL, "pool_id": "p1", "bytes": 2000, "total": 2000}
    assert not [e for e in book.channel("other").history if e[1] == "downloading"]
    pools = downloads.decorate([{"pool_id": "p1", "models": []}])
    assert pools[0]["models"] == [{"id": MODEL, "ref": f"hf:x/{MODEL}.gguf",
                                   "size_bytes": 2000}]
    assert "downloading" not in pools[0] and downloads.describe(MODEL) is None


async def test_a_failed_download_ends_its_jobs_and_is_not_retried_at_once() -> None:
    gate = asyncio.Event()
    gate.set()
    client = FakeClient(gate, fail=True, steps=1)
    downloads, _, queue, ended = make(client)
    downloads.start("p1", MODEL)
    await asyncio.sleep(0.1)
    assert sorted(ended) == [("j1", MODEL_DOWNLOAD_FAILED), ("j2", MODEL_DOWNLOAD_FAILED)]
    assert "other" in queue and "j1" not in queue
    failure = downloads.failure(MODEL)
    assert failure is not None and "the hub answered 404" in failure and "pool p1" in failure
    downloads.start("p1", MODEL)  # within the hold: no new download
    await asyncio.sleep(0.05)
    assert client.calls == [MODEL]
