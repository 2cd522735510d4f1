"""The batch runner of rbees-orcd: runs the lines of OpenAI batches as batch-lane jobs.

One task (:meth:`BatchRunner.loop`) looks at the unfinished batches (:mod:`rbees_core.
orchestrator.batches`) every half second while there are any, or sooner when woken (a
batch created or cancelled, a line answered; with none it waits to be woken, and nothing
else): it moves a ``validating`` batch to ``in_progress``, keeps up to ``window`` lines of
all batches in the queue at once (each a job of ``priority: batch``, so every interactive
request goes ahead of them: the queue's lanes), ends a ``cancelling`` batch ``cancelled``
and one past its ``expires_at`` ``expired``, and finishes a batch whose lines are all
answered.

Each line runs as its own task: it turns the line's request into the task its ``/v1``
route would make (:func:`.orcd_openai.task_of`, :func:`.orcd_embeddings.request_of`),
submits it with the line's correlation id, records the jobs on the line, waits for their
terminal events and writes the answer (:meth:`BatchStore.answer`, once). After a restart
the runner follows the jobs already recorded (or found by correlation id) instead of
submitting again; a job that ended retriable (``ORCHESTRATOR_RESTARTED``, a dropped or a
failed worker's job) is submitted again, at most :data:`MAX_ATTEMPTS` times.

Metadata: ``rbees_window`` (``"HH:MM-HH:MM"``, local time, may wrap midnight): lines are
submitted only inside it; ``rbees_pools`` (pool ids separated by commas): lines run only
on those pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import re
import time
from typing import Any

from rbees_core import protocols
from rbees_core.auth import Principal, current_principal
from rbees_core.errors import RbeesError
from rbees_core.log import correlation_id
from rbees_core.orchestrator.batches import BatchStore, Line, line_correlation, new_id
from rbees_core.orchestrator.service import OrchestratorService
from rbees_core.programs import orcd_embeddings, orcd_openai
from rbees_core.programs.openai_errors import OpenAIError, job_error
from rbees_core.protocols import Jobs, RequestError, Turn

#: The endpoints a batch may name, and the ``url`` of each of its lines.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
#: Lines of all batches in the queue at once.
DEFAULT_WINDOW = 16
#: Submissions of one line (in this process) before it is answered with its last error.
MAX_ATTEMPTS = 5
#: A line whose job ended with one of these is submitted again (a new job). CONFLICT: after a
#: restart of rbees-orcd a recovered job sent again to the worker still running it before
#: the kill is refused as "already running here".
RETRIABLE = frozenset({"ORCHESTRATOR_RESTARTED", "QUEUE_FULL_DROPPED", "WORKER_FAILED",
                       "CONFLICT"})
_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def parse_window(text: str) -> tuple[int, int]:
    """``"22:00-07:00"`` as (start, end) minutes of the day; ValueError otherwise."""
    match = _WINDOW.fullmatch(text.strip())
    if match is None:
        raise ValueError("must be HH:MM-HH:MM (24-hour local time)")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    return h1 * 60 + m1, h2 * 60 + m2


def in_window(text: str | None, now: datetime.datetime | None = None) -> bool:
    """Whether ``now`` (local time) is inside the window ``text`` (None: always)."""
    if not text:
        return True
    start, end = parse_window(text)
    now = now or datetime.datetime.now()
    minute = now.hour * 60 + now.minute
    if start <= end:
        return start <= minute < end
    return minute >= start or minute < end


def _error_line(custom_id: str, status: int, body: dict[str, Any],
                request_id: str = "") -> dict[str, Any]:
    return {"id": new_id("batch_req"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None}


class BatchRunner:
    """Runs the batches of one rbees-orcd (see the module's docstring). Made by the app
    factory; :meth:`start` after the service started (its recovery done)."""

    def __init__(self, svc: OrchestratorService, *, window: int = DEFAULT_WINDOW,
                 tick_s: float = 0.5) -> None:
        self.svc = svc
        self.store = BatchStore(svc.store)
        self.window = window
        self.tick_s = tick_s
        self.wakeup = asyncio.Event()
        self._lines: dict[tuple[str, int], asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Start the loop (a task of the service: cancelled when it closes)."""
        self.svc.book.spawn(self.loop())

    def wake(self) -> None:
        """Look at the batches now (a batch was created or cancelled)."""
        self.wakeup.set()

    async def loop(self) -> None:
        while True:
            busy = True
            try:
                busy = await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bad round must not end the runner
                self.svc.log.error("batch_round_failed", error=repr(exc))
            if busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), self.tick_s)
            else:  # no batch to look at until one is created: no tick, no thread hop
                await self.wakeup.wait()
            self.wakeup.clear()

    async def round(self) -> bool:
        """One look at every unfinished batch; whether there was one (an idle rbees-orcd
        then waits for :meth:`wake` alone, instead of asking SQLite twice a second)."""
        unfinished = await asyncio.to_thread(self.store.unfinished)
        for batch_id in unfinished:
            row = self.store.batch(batch_id)
            if row is None:
                continue
            status = row["status"]
            if status == "validating":
                await self.store.set_status(batch_id, "in_progress", only_from=("validating",))
                status = "in_progress"
            if status == "cancelling":
                await self._stop(batch_id, "cancelled", "batch_cancelled",
                                 "the batch was cancelled before this request ran")
                continue
            if time.time() >= row["expires_at"]:
                await self._stop(batch_id, "expired", "batch_expired",
                                 "the batch's completion window ended before this request ran")
                continue
            running = [k for k in self._lines if k[0] == batch_id]
            lines = self.store.open_lines(batch_id)
            if not lines and not running:
                await self.store.set_status(batch_id, "finalizing")
                await self.store.finish(batch_id, "completed", lambda _line: {})
                continue
            metadata = _metadata(row)
            if not in_window(metadata.get("rbees_window")):
                continue
            for line in lines:
                if len(self._lines) >= self.window:
                    return True
                key = (batch_id, line.line)
                if key not in self._lines:
                    task = self.svc.book.spawn(self._run_line(row, metadata, line))
                    self._lines[key] = task
                    task.add_done_callback(functools.partial(self._done, key))
        return bool(unfinished)

    def _done(self, key: tuple[str, int], _task: asyncio.Task[None]) -> None:
        self._lines.pop(key, None)
        self.wakeup.set()

    async def _stop(self, batch_id: str, status: str, code: str, message: str) -> None:
        """End a batch before all its lines ran: stop its line tasks, cancel their jobs,
        answer the rest with ``code``."""
        for key, task in list(self._lines.items()):
            if key[0] == batch_id:
                task.cancel()
                self._lines.pop(key, None)
        async def cancel(job_id: str) -> None:
            with contextlib.suppress(RbeesError):
                await self.svc.cancel(job_id)

        await asyncio.gather(*(cancel(job_id) for line in self.store.open_lines(batch_id)
                               for job_id in line.job_ids or []))

        def rest(line: Line) -> dict[str, Any]:
            return {"id": new_id("batch_req"), "custom_id": line.custom_id, "response": None,
                    "error": {"code": code, "message": message}}

        await self.store.finish(batch_id, status, rest)

    # -- one line ----------------------------------------------------------------------------

    async def _run_line(self, row: dict[str, Any], metadata: dict[str, str],
                        line: Line) -> None:
        batch_id, endpoint = str(row["batch_id"]), str(row["endpoint"])
        correlation_id.set(line_correlation(batch_id, line.line))
        if row.get("owner"):  # admitted as the key that made the batch: its models, usage
            models = json.loads(row["owner_models"]) if row.get("owner_models") else None
            current_principal.set(Principal(name=str(row["owner"]),
                                            scopes=frozenset({"inference"}),
                                            models=None if models is None else tuple(models)))
        try:
            kind, task, n, fmt = self._translate(endpoint, line.request, metadata)
        except RequestError as exc:
            error = OpenAIError.of(exc)
            await self.store.answer(batch_id, line.line, False,
                                    _error_line(line.custom_id, error.status, error.body()))
            return
        job_ids = line.job_ids
        if not job_ids:
            found = await asyncio.to_thread(self.store.jobs_of_line, batch_id, line.line)
            job_ids = found[-n:] if len(found) >= n else None
        for attempt in range(MAX_ATTEMPTS):
            if job_ids is None:
                try:
                    job_ids = await protocols.submit(self.svc, task, n)
                except RequestError as exc:
                    if exc.status in (429, 503) and attempt + 1 < MAX_ATTEMPTS:
                        await asyncio.sleep(1.0 + attempt)
                        continue
                    error = OpenAIError.of(exc)
                    await self.store.answer(batch_id, line.line, False,
                                            _error_line(line.custom_id, error.status,
                                                        error.body()))
                    return
                await self.store.set_jobs(batch_id, line.line, job_ids)
            elif not await self._known(job_ids):
                job_ids = None
                continue
            turns = [Turn(tools=bool(task.get("tools"))) for _ in job_ids]
            ends: list[dict[str, Any]] = [{} for _ in job_ids]
            failure = await _wait(Jobs(self.svc, job_ids), turns, ends)
            # an embedding job's vectors are not stored: one that ended before a restart
            # is run again
            lost = failure is None and kind == "/v1/embeddings" \
                and not isinstance(ends[0].get("embeddings"), list)
            if (lost or (failure is not None and failure.get("code") in RETRIABLE)) \
                    and attempt + 1 < MAX_ATTEMPTS:
                job_ids = None
                await self.store.set_jobs(batch_id, line.line, None)
                continue
            request_id = (job_ids or [""])[0]
            if failure is not None:
                error = job_error(failure)
                result = _error_line(line.custom_id, error.status, error.body(), request_id)
                await self.store.answer(batch_id, line.line, False, result)
                return
            body = self._body(kind, task, turns, ends, fmt, request_id)
            result = {"id": new_id("batch_req"), "custom_id": line.custom_id,
                      "response": {"status_code": 200, "request_id": request_id,
                                   "body": body}, "error": None}
            await self.store.answer(batch_id, line.line, True, result)
            return

    async def _known(self, job_ids: list[str]) -> bool:
        """Whether every job is in the store (else the line is submitted again)."""
        try:
            for job_id in job_ids:
                await self.svc.job(job_id)
        except RbeesError:
            return False
        return True

    def _translate(self, endpoint: str, request: dict[str, Any], metadata: dict[str, str]
                   ) -> tuple[str, dict[str, Any], int, str]:
        """``(kind, task, n, encoding_format)`` of a line's request; raises
        :class:`OpenAIError` (400) for a request its route would refuse."""
        if request.get("method", "POST") != "POST":
            raise OpenAIError(400, "method must be POST", param="method")
        url = request.get("url")
        if url not in ENDPOINTS:
            raise OpenAIError(400, f"url must be one of {', '.join(ENDPOINTS)}", param="url")
        if url != endpoint:
            raise OpenAIError(400, f"url {url} is not the batch's endpoint {endpoint}",
                              param="url")
        body = request.get("body")
        if not isinstance(body, dict):
            raise OpenAIError(400, "body must be an object", param="body")
        if body.get("stream"):
            raise OpenAIError(400, "a batch request cannot stream", param="stream")
        fmt = "float"
        if url == "/v1/embeddings":
            model, texts, fmt = orcd_embeddings.request_of(body)
            task: dict[str, Any] = {"model": model, "input": texts}
            n = 1
        else:
            task, n = orcd_openai.task_of(body, chat=url == "/v1/chat/completions")
        task = {**task, "priority": "batch"}
        placement = self._placement(metadata.get("rbees_pools"))
        if placement is not None:
            task["placement"] = placement
        return url, task, n, fmt

    def _placement(self, pools: str | None) -> dict[str, Any] | None:
        """The placement of ``rbees_pools``: the one pool, or every other pool avoided."""
        if not pools:
            return None
        allowed = [p.strip() for p in pools.split(",") if p.strip()]
        if len(allowed) == 1:
            return {"pool": allowed[0]}
        known = [str(r.get("pool_id")) for r in self.svc.pool_records()]
        return {"prefer_pools": allowed, "avoid_pools": [p for p in known if p not in allowed]}

    @staticmethod
    def _body(kind: str, task: dict[str, Any], turns: list[Turn], ends: list[dict[str, Any]],
              fmt: str, request_id: str) -> dict[str, Any]:
        created = int(time.time())
        if kind == "/v1/embeddings":
            return orcd_embeddings.embedding_body(task["model"], fmt, ends[0])
        chat = kind == "/v1/chat/completions"
        ident = ("chatcmpl-" if chat else "cmpl-") + request_id.removeprefix("job-")
        return orcd_openai.answer_body(task, turns, chat=chat, ident=ident, created=created)


async def _wait(jobs: Jobs, turns: list[Turn], ends: list[dict[str, Any]]
                ) -> dict[str, Any] | None:
    """Every job's terminal event, fed to its turn (``end`` data kept in ``ends``); the
    first ``error`` event's data, or None."""
    error: dict[str, Any] | None = None
    done = 0
    try:
        while done < len(jobs.job_ids):
            index, event, data = await jobs.queue.get()
            turns[index].feed(event, data)
            if event == "end":
                ends[index] = data
                done += 1
            elif event == "error":
                error = error or data
                done += 1
    finally:
        for task in jobs.tasks:
            task.cancel()
    return error


def _metadata(row: dict[str, Any]) -> dict[str, str]:
    raw = row.get("metadata")
    return dict(json.loads(raw)) if raw else {}


__all__ = ["DEFAULT_WINDOW", "ENDPOINTS", "BatchRunner", "in_window", "parse_window"]
