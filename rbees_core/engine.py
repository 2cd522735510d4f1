"""The worker's decode loop: N slots of one loaded model, decoded together.

One thread owns the :class:`~rbees_core.backend.LoadedModel`. Each iteration it admits new
jobs, drops cancelled ones, then builds one batch holding the next token of every decoding
sequence plus prompt chunks of newly admitted ones, runs one forward pass for all of them,
and samples a token per sequence. Each token's text leaves through the job's ``sink`` as
soon as it is sampled; the sink must be cheap and thread-safe (the HTTP layer hands events
to its event loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs

from rbees_core.backend import DecodeInterrupted, Feed, LoadedModel, SamplingParams
from rbees_core.errors import (
    AllSlotsBusyError,
    ConflictError,
    DrainingError,
    InvalidParamsError,
    RbeesError,
)
from rbees_core.logprobs import logprob_entry
from rbees_core.textstream import TextStream

Sink = Callable[[str, dict[str, Any]], None]
METRICS_INTERVAL_S = 0.25


class Observer(Protocol):
    def job_started(self, queue_wait_s: float) -> None: ...
    def first_token(self, ttft_s: float) -> None: ...
    def token(self, gap_s: float) -> None: ...
    def job_finished(self, outcome: str, tokens_out: int) -> None: ...


class _NullObserver:
    def job_started(self, queue_wait_s: float) -> None:
        pass

    def first_token(self, ttft_s: float) -> None:
        pass

    def token(self, gap_s: float) -> None:
        pass

    def job_finished(self, outcome: str, tokens_out: int) -> None:
        pass


@attrs.define(eq=False)
class Job:
    """One generation request, prepared (tokenized) and waiting for or holding a slot."""

    job_id: str
    tokens: list[int]
    max_tokens: int
    params: SamplingParams
    stop: Sequence[str]
    sink: Sink
    #: alternatives per token to report with each token's logprob; None: no logprobs
    logprobs: int | None = None
    #: a batch-priority job: paused while an interactive job's prompt is read
    batch: bool = False
    received_at: float = attrs.field(factory=time.perf_counter)
    cancelled: bool = False
    slot: int = -1
    feed: list[int] = attrs.field(factory=list)
    next_token: int = -1
    tokens_out: int = 0
    pieces: int = 0
    started_at: float = 0.0
    first_token_at: float | None = None
    last_token_at: float = 0.0
    last_metrics_at: float = 0.0
    stream: TextStream = attrs.field(init=False)
    #: logprob entries of tokens whose text has not been sent yet
    entries: list[dict[str, Any]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.stream = TextStream(self.stop)


class Engine:
    """Owns the decode thread. Public methods are thread-safe and never block on decoding."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        slots: int,
        model_name: str,
        worker_id: str,
        observer: Observer | None = None,
    ) -> None:
        if model.n_batch < slots:
            raise ValueError("the model's n_batch must be >= slots")
        self.model = model
        self.slots = slots
        self.model_name = model_name
        self.worker_id = worker_id
        self.n_batch = model.n_batch
        self._obs: Observer = observer or _NullObserver()
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._jobs: dict[str, Job] = {}
        self._free = list(range(slots - 1, -1, -1))
        #: tokens each slot's cache holds (prefix reuse, when the model supports it)
        self._cached: list[list[int]] = [[] for _ in range(slots)]
        #: when each slot last took a job (an admission count): a job sharing no more of
        #: one slot's cache than another's goes where it loses the least recent cache
        self._used = [0] * slots
        #: slots whose cache an interactive job filled last: a batch job takes one only when
        #: no other slot is free (its prefix is the one a chat's next turn comes back to)
        self._interactive = [False] * slots
        self._admissions = 0
        self._draining = False
        self._stopping = False
        #: whether the pass in flight may be interrupted (batch jobs' tokens only)
        self._interruptible = False
        #: passes interrupted for an interactive job (:meth:`_decode`)
        self.interrupted = 0
        #: a thread count to apply before the next step (:meth:`set_threads`)
        self._threads: int | None = None
        self._thread = threading.Thread(target=self._run, name="rbees-decode", daemon=True)

    # -- control (any thread) -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def slots_free(self) -> int:
        with self._cond:
            return self.slots - len(self._jobs)

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._jobs

    def prepare(self, job_id: str, text: str, *, max_tokens: int, params: SamplingParams,
                stop: Sequence[str], sink: Sink, logprobs: int | None = None,
                batch: bool = False) -> Job:
        """Tokenize ``text`` and fit ``max_tokens`` to the slot's context (a job asking for
        more than the slot holds ends with ``max_tokens`` when the context is full).
        ``logprobs`` (alternatives per token, 0 for none; None: no logprobs) makes every
        token event carry the entries of its tokens (:mod:`rbees_core.logprobs`). A
        ``batch`` job waits while an interactive one reads its prompt (:meth:`_build_batch`).

        Raises :class:`InvalidParamsError` (field ``prompt``) for a prompt of no tokens (a
        model without BOS has nothing to continue from: llama.cpp fails the empty batch) or
        one that leaves no room in the slot."""
        tokens = self.model.tokenize(text)
        if not tokens:
            raise InvalidParamsError("prompt", "is empty: a job needs at least one token")
        room = self.model.n_ctx_slot - len(tokens)
        if room < 1:
            raise InvalidParamsError(
                "prompt",
                f"is {len(tokens)} tokens; this worker holds {self.model.n_ctx_slot} per job",
            )
        return Job(job_id=job_id, tokens=tokens, max_tokens=min(max_tokens, room),
                   params=params, stop=stop, sink=sink, logprobs=logprobs, batch=batch)

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the next iteration; it holds a slot from now on."""
        with self._cond:
            if self._draining or self._stopping:
                raise DrainingError("worker is draining; it takes no new jobs")
            if job.job_id in self._jobs:
                raise ConflictError(f"job {job.job_id!r} is already running here",
                                    details={"job_id": job.job_id})
            if len(self._jobs) >= self.slots:
                raise AllSlotsBusyError(f"all {self.slots} slots are busy",
                                        details={"slots_total": self.slots})
            self._jobs[job.job_id] = job
            self._pending.append(job)
            if self._interruptible and not job.batch:
                self.model.interrupt()  # the pass in flight holds batch jobs only
            self._cond.notify()

    def cancel(self, job_id: str) -> bool:
        """Mark ``job_id`` cancelled; decoding of it stops at the next iteration."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            job.cancelled = True
            self._cond.notify()
            return True

    def set_threads(self, threads: int) -> None:
        """Decode with ``threads`` threads from the next step on (the decode thread applies
        it between steps: :meth:`LoadedModel.set_threads`). Raises
        :class:`InvalidParamsError` when the model cannot (:attr:`supports_threads`)."""
        if not self.model.supports_threads:
            raise InvalidParamsError("threads", "this backend cannot change its thread count")
        with self._cond:
            self._threads = threads
            self._cond.notify()

    def drain(self) -> None:
        with self._cond:
            self._draining = True

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is left and end the thread."""
        with self._cond:
            self._stopping = True
            for job in self._jobs.values():
                job.cancelled = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the decode thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping and self._threads is None:
                    self._cond.wait()
                threads, self._threads = self._threads, None
                if self._stopping and not self._jobs:
                    return
                admitted = []
                while self._pending:
                    job = self._pending.popleft()
                    job.slot = self._pick_slot(job.tokens, job.batch)
                    self._active[job.slot] = job
                    admitted.append(job)
            if threads is not None:
                self.model.set_threads(threads)
            for job in admitted:
                self._admit(job)
            for job in list(self._active.values()):
                if job.cancelled:
                    code = "WORKER_STOPPED" if self._stopping else "CANCELLED"
                    self._fail(job, code, "job cancelled", retriable=self._stopping)
            feeds = self._build_batch()
            if not feeds:
                continue
            try:
                self._decode(feeds)
            except DecodeInterrupted:  # an interactive job came: its prompt goes first
                self._refeed(feeds)
                continue
            except Exception as exc:  # the batch is lost; its jobs end, the worker lives on
                for feed in feeds:
                    self._cached[feed.slot] = []
                    self._fail(self._active[feed.slot], "DECODE_FAILED", str(exc))
                continue
            for feed in feeds:
                if feed.logits:
                    job = self._active[feed.slot]
                    try:
                        self._step(job)
                    except Exception as exc:  # sampling failed: this job ends, not the loop
                        if self._active.get(feed.slot) is job:
                            self._fail(job, "DECODE_FAILED", f"{type(exc).__name__}: {exc}")

    def _decode(self, feeds: list[Feed]) -> None:
        """One pass. A pass of batch jobs' tokens alone is interruptible (when the model
        supports it): :meth:`submit` of an interactive job stops it, so that the new
        prompt is read at once, not after the pass (:meth:`_refeed` puts it back)."""
        if not (self.model.supports_interrupt
                and all(self._active[f.slot].batch for f in feeds)):
            self.model.decode(feeds)
            return
        with self._cond:
            if any(not job.batch for job in self._pending):  # one came as it was built
                raise DecodeInterrupted
            self._interruptible = True
        try:
            self.model.decode(feeds, interruptible=True)  # type: ignore[call-arg]
        finally:
            with self._cond:
                self._interruptible = False

    def _refeed(self, feeds: list[Feed]) -> None:
        """An interrupted pass: none of its tokens are in the model's cache now, so they
        leave the slots' records, and prompt chunks go back to the front of their jobs'
        feeds (a decoding job's next token stays its ``next_token``)."""
        self.interrupted += 1
        for feed in feeds:
            job = self._active[feed.slot]
            del self._cached[feed.slot][-len(feed.tokens):]
            if job.first_token_at is None:  # no token sampled yet: a prompt chunk
                job.feed = list(feed.tokens) + job.feed

    def _pick_slot(self, tokens: list[int], batch: bool = False) -> int:
        """The free slot whose cache shares the longest prefix with ``tokens``, else the
        one used least recently (an empty one first): a new prompt does not overwrite the
        cache a chat's next turn would reuse while another slot is free (under lock). A
        ``batch`` job leaves a slot an interactive job filled while another is free: batch
        lines share a chat's default system prompt, and the first one took the idle chat's
        slot, whose next turn then read its whole prompt again (130-140 ms instead of 15 on
        two cores, docs/benchmarks.md (q))."""
        cached, used, interactive = self._cached, self._used, self._interactive
        best = max(self._free, key=lambda s: (not (batch and interactive[s]),
                                              _common(cached[s], tokens), -used[s], -s))
        interactive[best] = not batch
        self._free.remove(best)
        self._admissions += 1
        used[best] = self._admissions
        return best

    def _admit(self, job: Job) -> None:
        now = time.perf_counter()
        job.started_at = now
        keep = 0
        if self.model.prefix_cache:  # re-feed at least one token: its logits are needed
            keep = min(_common(self._cached[job.slot], job.tokens), len(job.tokens) - 1)
        job.feed = list(job.tokens[keep:])
        self._cached[job.slot] = list(job.tokens[:keep])
        try:
            if keep:
                kept = self.model.begin(job.slot, job.params, keep=keep)  # type: ignore[call-arg, func-returns-value]
                if isinstance(kept, int) and kept != keep:  # the model could not keep them
                    job.feed = list(job.tokens[kept:])
                    self._cached[job.slot] = list(job.tokens[:kept])
            else:
                self.model.begin(job.slot, job.params)
        except RbeesError as exc:
            self._fail(job, exc.code, exc.message)
            return
        except Exception as exc:  # a backend fault ends this job, never the decode thread
            self._fail(job, "DECODE_FAILED", f"{type(exc).__name__}: {exc}")
            return
        wait = now - job.received_at
        self._obs.job_started(wait)
        job.sink("started", {"job_id": job.job_id, "model": self.model_name,
                             "worker_id": self.worker_id,
                             "queue_wait_ms": round(wait * 1000, 3)})

    def _build_batch(self) -> list[Feed]:
        """The next forward pass: every decoding job's next token, then prompt chunks, up
        to ``n_batch`` tokens. While an interactive job reads its prompt, batch jobs sit
        this pass out: its first token then comes as soon as on an idle worker (one pass of
        the prompt alone), not after passes that also decode every batch job's token."""
        feeds = []
        budget = self.n_batch
        prefilling = []
        urgent = any(job.feed and not job.batch for job in self._active.values())
        for job in self._active.values():
            if urgent and job.batch:
                continue
            if job.feed:
                prefilling.append(job)
            else:
                feeds.append(Feed(job.slot, (job.next_token,), True))
                self._cached[job.slot].append(job.next_token)
                budget -= 1
        for job in prefilling:
            if budget <= 0:
                break
            chunk, job.feed = job.feed[:budget], job.feed[budget:]
            feeds.append(Feed(job.slot, chunk, not job.feed))
            self._cached[job.slot].extend(chunk)
            budget -= len(chunk)
        return feeds

    def _step(self, job: Job) -> None:
        token = self.model.sample(job.slot)
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self._obs.first_token(now - job.received_at)
        else:
            self._obs.token(now - job.last_token_at)
        job.last_token_at = now
        if self.model.is_eog(token):
            self._emit_text(job, job.stream.flush())
            self._end(job, "stop" if job.stream.stopped else "eos")
            return
        job.tokens_out += 1
        if job.logprobs is not None:
            job.entries.append(logprob_entry(self.model, job.slot, token, job.logprobs))
        self._emit_text(job, job.stream.push(self.model.token_bytes(token)))
        if job.stream.stopped:
            self._end(job, "stop")
        elif job.tokens_out >= job.max_tokens:
            self._emit_text(job, job.stream.flush())
            self._end(job, "stop" if job.stream.stopped else "max_tokens")
        else:
            job.next_token = token
            if now - job.last_metrics_at >= METRICS_INTERVAL_S:
                job.last_metrics_at = now
                decode_s = now - job.started_at
                job.sink("metrics", {
                    "tokens_out": job.tokens_out, "decode_ms": round(decode_s * 1000, 3),
                    "tokens_per_s": round(job.tokens_out / decode_s, 2) if decode_s else 0.0,
                    "queue_depth": len(self._pending),
                })

    def _emit_text(self, job: Job, text: str) -> None:
        if text:
            if job.entries:  # the tokens this piece completes (whole characters only)
                job.sink("token", {"t": text, "i": job.pieces, "logprobs": job.entries})
                job.entries = []
            else:
                job.sink("token", {"t": text, "i": job.pieces})
            job.pieces += 1

    # A job's slot is free before its terminal event leaves: whoever reads ``end`` (the
    # orchestrator) may send the next job at once, and must not be told ALL_SLOTS_BUSY.

    def _end(self, job: Job, reason: str) -> None:
        now = time.perf_counter()
        first = job.first_token_at or now
        end = {
            "job_id": job.job_id, "tokens_in": len(job.tokens), "tokens_out": job.tokens_out,
            "decode_ms": round((now - job.started_at) * 1000, 3),
            "ttft_ms": round((first - job.received_at) * 1000, 3),
            "stop_reason": reason, "seed": job.params.seed,
        }
        self._release(job, "completed")
        job.sink("end", end)

    def _fail(self, job: Job, code: str, message: str, *, retriable: bool = False) -> None:
        self._release(job, "cancelled" if code == "CANCELLED" else "failed")
        job.sink("error", {"job_id": job.job_id, "code": code, "message": message,
                           "retriable": retriable})

    def _release(self, job: Job, outcome: str) -> None:
        try:
            self.model.end(job.slot)
        finally:
            with self._cond:
                self._active.pop(job.slot, None)
                self._jobs.pop(job.job_id, None)
                self._free.append(job.slot)
            self._obs.job_finished(outcome, job.tokens_out)


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
