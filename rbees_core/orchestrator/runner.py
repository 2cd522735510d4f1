"""One running job: its worker's stream relayed to its channel, retries, the end written.

A runner streams the worker's SSE, announcing each token at once and writing tokens in
batches (the first one before it is announced, so a restart knows the job produced output),
then writes ``end``/``error`` with the final transition and announces it. A failure before
the first token puts the job back in the queue (at most :data:`MAX_RETRIES` times, backoff
0.5/1/2 s when the worker refused it, 0.3 s when it could not be reached: its pool has
reported it gone by then, and the job waits for another); after it, the job fails with
``WORKER_FAILED``.

This is the path every token takes: one ``publish`` to the channel, no await, no copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx

from rbees_core.errors import RbeesError
from rbees_core.log import Logger, correlation_id
from rbees_core.orchestrator.book import Book, Run, credential_for, request_headers
from rbees_core.orchestrator.channel import Channel
from rbees_core.orchestrator.metrics import OrchestratorMetrics
from rbees_core.orchestrator.pool_control import PoolControl
from rbees_core.orchestrator.queue import JobQueue
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.orchestrator.store import Store
from rbees_core.orchestrator.upstream import Exchange, Upstream, UpstreamError
from rbees_core.scheduling import GONE_STATES

RETRY_BACKOFF_S = (0.5, 1.0, 2.0)
#: the longest wait before a job whose worker could not be reached goes back to the queue: a
#: pool sees a worker's exit within 0.1 s and reports it at once, so the job is not sent to
#: it again (a heartbeat sent just before would show it ready) and waits for its restart; it
#: goes back as soon as that report is in
UNREACHABLE_RETRY_S = 0.3
MAX_RETRIES = 3
#: tokens after the first are written in batches this often. What they buy is the replay of a
#: job that failed at a restart; a commit costs about a millisecond of the loop, and at 0.1 s
#: the flushes took a third of rbees-orcd's CPU per relayed token (docs/benchmarks.md)
FLUSH_INTERVAL_S = 0.5
#: Worker error codes that say "try elsewhere" rather than "this job is bad".
RETRIABLE_WORKER_CODES = frozenset({"ALL_SLOTS_BUSY", "DRAINING", "NOT_READY", "WORKER_STOPPED",
                                    "DECODE_FAILED"})


class WorkerFailedBeforeTokenError(Exception):
    """The worker failed before the first token: the job may run elsewhere."""


class Runner:
    """Runs dispatched jobs (:meth:`start`), ends them (:meth:`finish`), and writes the
    tokens not yet written (:meth:`flush`). Created by the service; the dispatcher starts
    runs, admission ends a cancelled one."""

    def __init__(self, book: Book, store: Store, queue: JobQueue, registry: PoolRegistry,
                 pools: PoolControl, metrics: OrchestratorMetrics, log: Logger,
                 upstream: Upstream, client: httpx.AsyncClient, *, token: str | None,
                 generations: dict[str, int] | None = None) -> None:
        self.book = book
        self.store = store
        self.queue = queue
        self.registry = registry
        self.pools = pools
        self.metrics = metrics
        self.log = log
        self.upstream = upstream
        self.client = client
        self.token = token
        self.generations = generations if generations is not None else {}  # join tokens'

    def start(self, run: Run) -> None:
        """Stream a claimed job whose dispatch is written (or being written with its
        admission: see :attr:`Run.written`)."""
        run.task = self.book.spawn(self._run(run))

    def execute(self, run: Run, body: dict[str, Any]) -> Exchange:
        """The job's request to its worker (not sent yet): ``/v2/embed`` for an embedding
        job, else ``/v2/execute``; both answer with the job's events."""
        path = "/v2/embed" if "input" in body else "/v2/execute"
        return self.upstream.post(f"{run.uri}{path}", body,
                                  request_headers(credential_for(
                                      self.token, run.pool_id,
                                      self.generations.get(run.pool_id, 0))))

    async def _run(self, run: Run) -> None:
        admitted = self.book.admitted.get(run.job_id)
        if admitted is not None:
            body, cid = admitted.body, admitted.correlation_id
        else:  # admitted before a restart
            spec = await asyncio.to_thread(self.store.spec, run.job_id)
            body, cid = spec.execute_body(), spec.correlation_id
        if cid:  # this task's own context: a job the dispatch loop placed has the loop's "-"
            correlation_id.set(cid)
        try:
            await self._stream(run, body)
        except WorkerFailedBeforeTokenError as exc:
            if await run.is_written():
                await self._retry(run, str(exc))
        except asyncio.CancelledError:
            raise
        except (UpstreamError, ValueError) as exc:
            if run.final or not await run.is_written():
                pass  # already ended, or never admitted: nothing to record
            elif run.tokens == 0:  # the worker is gone (or mute): it is suspect, no wait
                await self._retry(run, f"{type(exc).__name__}: {exc}",
                                  at_once=isinstance(exc, UpstreamError))
            else:
                run.final = True
                self.log.warning("worker_failed_mid_stream", job_id=run.job_id,
                                 pool_id=run.pool_id, worker_id=run.worker_id,
                                 error=f"{type(exc).__name__}: {exc}")
                await self.finish(run, "failed", "WORKER_FAILED", {
                    "job_id": run.job_id, "code": "WORKER_FAILED",
                    "message": f"worker {run.worker_id} on {run.pool_id} failed mid-stream: "
                               f"{type(exc).__name__}", "retriable": True})
        finally:
            if run.exchange is not None:  # a no-op unless the runner never read the answer
                run.exchange.close()
            self.registry.give_back(run.pool_id, run.worker_id)
            runs = self.book.runs
            if not any(r.pool_id == run.pool_id and r.worker_id == run.worker_id
                       for r in runs.values() if r is not run):
                self.pools.idle(run.pool_id, run.worker_id)
            if runs.get(run.job_id) is run:
                runs.pop(run.job_id, None)
            self.book.changed()

    async def _stream(self, run: Run, body: dict[str, Any]) -> None:
        channel = self.book.channel(run.job_id)
        exchange = run.exchange = run.exchange or self.execute(run, body)
        async with exchange as answer:
            if not await run.is_written():
                return
            if answer.status != 200:
                raw = await answer.read()
                try:
                    refusal = json.loads(raw)["error"]
                    code = str(refusal["code"])
                except (ValueError, KeyError, TypeError):
                    refusal, code = None, f"HTTP_{answer.status}"
                if code in RETRIABLE_WORKER_CODES or answer.status >= 500:
                    raise WorkerFailedBeforeTokenError(f"worker answered {code}")
                if code == "CONFLICT":  # its run from before a restart of rbees-orcd still
                    # holds a slot there (the worker ends it at its next step): end it, again
                    await self._tell_worker_cancel(run)
                    raise WorkerFailedBeforeTokenError("worker answered CONFLICT: an earlier "
                                                       "run of this job was still there")
                run.final = True
                data: dict[str, Any] = {"job_id": run.job_id, "code": code, "retriable": False}
                if isinstance(refusal, dict) and isinstance(refusal.get("message"), str):
                    # the worker's own words (a chat template's refusal names the model)
                    data["message"] = f"the worker refused the job: {refusal['message']}"
                    field = (refusal.get("details") or {}).get("field")
                    if isinstance(field, str):
                        data["field"] = field
                else:
                    data["message"] = f"the worker refused the job: {raw[:300]!r}"
                await self.finish(run, "failed", code, data)
                return
            publish, token = channel.publish, self.metrics.token
            async for event, data in answer.events():
                if run.final:
                    return
                if event == "token" and run.tokens:  # a token after the first, inline: no
                    run.tokens += 1                  # coroutine per token
                    publish("token", data, persisted=False)
                    token(run)
                else:
                    await self._on_worker_event(run, channel, event, data)
            if not run.final:
                raise UpstreamError("the worker's stream ended without end/error")

    async def _on_worker_event(self, run: Run, channel: Channel, event: str,
                               data: dict[str, Any]) -> None:
        if event == "started":
            # written with the first token (or the end): one durable write, not two, before
            # the first token can be announced
            run.started = data
        elif event == "token":  # the first: _stream publishes the others itself
            run.tokens += 1
            # durable before announced: a restart must know we produced
            await self._mark_running(run, channel, [("token", data)])
            if run.final:
                return
            channel.publish("token", data, persisted=True)
            self.metrics.first_token(run)
        elif event == "metrics":
            channel.publish("metrics", data, persisted=False)
        elif event == "end":
            run.final = True
            await self._mark_running(run, channel, [])
            await self.finish(run, "completed", None, data)
        elif event == "error":
            code = str(data.get("code", "WORKER_ERROR"))
            if run.tokens == 0 and code in RETRIABLE_WORKER_CODES:
                raise WorkerFailedBeforeTokenError(f"worker error {code}")
            run.final = True
            await self._mark_running(run, channel, [])
            await self.finish(run, "failed", code, data)

    async def _mark_running(self, run: Run, channel: Channel,
                            more: list[tuple[str, dict[str, Any]]]) -> None:
        """Write ``running`` with the worker's ``started`` event (and ``more``), then
        announce them; a no-op once done."""
        if run.started is None:
            if more:
                await self.store.append_events_async(run.job_id,
                                                     [*channel.take_unpersisted(), *more])
            return
        started, run.started = run.started, None
        await self.store.transition_async(
            run.job_id, "running",
            events=[*channel.take_unpersisted(), ("started", started), *more])
        channel.publish("started", started, persisted=True)

    async def finish(self, run: Run, status: str, code: str | None,
                     data: dict[str, Any]) -> None:
        """Write the job's final ``status`` with its terminal event (``end`` with the
        worker's ``data``, else ``error``), announce it and retire the job. A write that
        fails is logged: the event is announced all the same."""
        channel = self.book.channel(run.job_id)
        terminal = "end" if status == "completed" else "error"
        fields: dict[str, Any] = {}
        if status == "completed":
            fields = {"tokens_in": data.get("tokens_in"), "tokens_out": data.get("tokens_out"),
                      "ttft_ms": data.get("ttft_ms"), "stop_reason": data.get("stop_reason")}
            fields = {k: v for k, v in fields.items() if v is not None}
            if data.get("decode_ms") and data.get("tokens_out"):
                seconds = float(data["decode_ms"]) / 1000
                self.book.job_seconds = 0.8 * self.book.job_seconds + 0.2 * seconds
        elif code is not None:
            fields = {"error_code": code, "error_message": str(data.get("message", ""))[:1000]}
        data = {**data, "job_id": run.job_id}
        # an embedding job's vectors reach its readers through the channel only: the store
        # keeps the rest of the end event (tokens, passes), not a megabyte of floats
        kept = {k: v for k, v in data.items() if k != "embeddings"}
        pending = channel.take_unpersisted()
        try:
            await self.store.transition_async(run.job_id, status,
                                              events=[*pending, (terminal, kept)], **fields)
        except RbeesError as exc:
            self.log.error("finish_failed", job_id=run.job_id, error=exc.message)
        channel.publish(terminal, data, persisted=True)
        self.metrics.finished.labels(outcome=status).inc()
        self.book.retire(run.job_id)

    async def _retry(self, run: Run, why: str, *, at_once: bool = False) -> None:
        """Put a job that failed before its first token back in the queue, after the
        backoff of its retry (RETRY_BACKOFF_S; UNREACHABLE_RETRY_S ``at_once``: its worker is
        gone or could not be reached, and the job waits for another one); past
        MAX_RETRIES it fails with ``WORKER_FAILED``."""
        if run.final:
            return
        record = await asyncio.to_thread(self.store.get, run.job_id)
        self.log.warning("dispatch_failed", job_id=run.job_id, pool_id=run.pool_id,
                         worker_id=run.worker_id, retry=record.retry_count + 1, error=why)
        if record.retry_count >= MAX_RETRIES:
            run.final = True
            await self.finish(run, "failed", "WORKER_FAILED", {
                "job_id": run.job_id, "code": "WORKER_FAILED", "retriable": True,
                "message": f"gave up after {MAX_RETRIES} retries: {why}"})
            return
        self.pools.suspect(run.pool_id, run.worker_id)
        await self.store.transition_async(run.job_id, "queued")
        self.book.runs.pop(run.job_id, None)
        run.final = True
        if at_once:
            await self._until_reported_gone(run.pool_id, run.worker_id, UNREACHABLE_RETRY_S)
        else:
            await asyncio.sleep(RETRY_BACKOFF_S[min(record.retry_count,
                                                    len(RETRY_BACKOFF_S) - 1)])
        spec = await asyncio.to_thread(self.store.spec, run.job_id)
        self.queue.push(run.job_id, spec.priority, model=spec.model, seq=run.queue_seq,
                        placement=spec.placement, since=run.created_at, force=True,
                        embedding=spec.embedding)
        self.book.changed()

    async def _until_reported_gone(self, pool_id: str, worker_id: str, at_most: float) -> None:
        """Wait until the pool reports the worker gone (or no longer lists it), ``at_most``
        seconds: a job sent back to the queue before that report could meet the worker
        still "ready" in a heartbeat sent before the pool saw it die. A killed worker's pool
        reports it within about 0.1 s; waiting the whole 0.3 s each time held the restart
        of a crashed worker with queued demand back by that much (issue 22: back within 2
        s)."""
        deadline = time.monotonic() + at_most
        while time.monotonic() < deadline:
            entry = self.registry.pools.get(pool_id)
            worker = None if entry is None else entry.workers.get(worker_id)
            if worker is None or worker.get("state") in GONE_STATES:
                return
            await asyncio.sleep(0.02)

    async def abandon(self, run: Run, why: str) -> None:
        """End a running job whose worker can no longer be reached (its pool turned
        unavailable; called by :class:`~rbees_core.orchestrator.recovery.Recovery`): its
        stream is dropped; one that produced no token goes back to the queue (a retry, as
        any failure before the first token), one that did fails with ``WORKER_FAILED``
        (``retriable: true``)."""
        if run.final:
            return
        if run.tokens == 0:
            task = run.task
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if not run.final and await run.is_written():
                await self._retry(run, why, at_once=True)
            return
        run.final = True
        self.log.warning("worker_failed_mid_stream", job_id=run.job_id, pool_id=run.pool_id,
                         worker_id=run.worker_id, error=why)
        await self.finish(run, "failed", "WORKER_FAILED", {
            "job_id": run.job_id, "code": "WORKER_FAILED", "retriable": True,
            "message": f"worker {run.worker_id} on {run.pool_id} was lost mid-stream: {why}"})
        if run.task is not None:
            run.task.cancel()

    async def cancel(self, run: Run) -> None:
        """End a running job as cancelled and tell its worker (no token after this)."""
        run.cancelled = True
        run.final = True
        await self.finish(run, "cancelled", "CANCELLED", {
            "job_id": run.job_id, "code": "CANCELLED", "message": "cancelled by request",
            "retriable": False})
        self.book.spawn(self._tell_worker_cancel(run))
        if run.task is not None:
            run.task.cancel()

    async def _tell_worker_cancel(self, run: Run) -> None:
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post(f"{run.uri}/v2/cancel", json={"job_id": run.job_id},
                                   headers=request_headers(credential_for(
                                       self.token, run.pool_id,
                                       self.generations.get(run.pool_id, 0))), timeout=5)

    # -- writing tokens in batches ---------------------------------------------------------

    async def flush(self) -> None:
        """Write every channel's events not yet written, in one transaction."""
        self.metrics.settle()
        dirty = list(self.book.dirty)  # the set stays the one every channel holds
        self.book.dirty.clear()
        writes = {channel.job_id: self.store.append_events_async(channel.job_id, pending)
                  for channel in dirty if (pending := channel.take_unpersisted())}
        # submitted together, they are committed together: one transaction per flush
        outcomes = await asyncio.gather(*writes.values(), return_exceptions=True)
        for job_id, outcome in zip(writes, outcomes, strict=True):
            if isinstance(outcome, RbeesError):
                self.log.warning("flush_failed", job_id=job_id, error=outcome.message)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            await self.flush()
