"""rbees-orcd's hand on the pools: heartbeats, aging, worker start/stop, idle stops.

The registry (:mod:`.registry`) knows each pool as its last heartbeat said; this module
keeps it current, tells the book (:mod:`.book`) when what a policy reads has changed, starts
and stops workers when a verdict says so (and every idle worker when its keep-alive ends:
:mod:`.keepalive`), and forwards an operator's calls to a pool
(:meth:`PoolControl.call_pool`).
Every call to a pool goes to the pool-managerd API at the URL the pool registered with:
the scheduler's through the typed :class:`~rbees_core.pool_client.http.HttpPoolClient`,
an operator's relayed as the pool answered it (:meth:`PoolControl.call_pool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import httpx

from rbees_core.api.pool import PoolHeartbeat, WorkerStartRequest
from rbees_core.errors import (
    ConflictError,
    ForbiddenError,
    HostAuthError,
    HostUnreachableError,
    NotFoundError,
    RbeesError,
)
from rbees_core.log import Logger
from rbees_core.orchestrator.book import Book, credential_for, request_headers
from rbees_core.orchestrator.keepalive import KeepAlive
from rbees_core.orchestrator.registry import PoolEntry, PoolRegistry
from rbees_core.placement import worker_defaults
from rbees_core.pool_client.http import HttpPoolClient
from rbees_core.scheduling import model_aliases, same_model

if TYPE_CHECKING:
    from rbees_core.orchestrator.recovery import Recovery

#: a pool's statuses are aged at most this often
AGE_EVERY_S = 0.5
#: waiting jobs are decided again at least this often, even when nothing changed
POLICY_CLOCK_S = 30.0
#: how long a worker this process started may take to be ready
WORKER_START_TIMEOUT_S = 90.0
#: an operator's call to a pool (see :meth:`PoolControl.call_pool`)
POOL_TIMEOUT_S = 30.0
#: a pool that refused rbees-orcd's credential gets nothing placed for this long, doubled
#: after each further refusal in a row, at most LOCKOUT_MAX_S
LOCKOUT_FIRST_S = 15.0
LOCKOUT_MAX_S = 300.0


def _expected_key(model: str, embedding: bool) -> str:
    """The registry's key of a worker being started (an embedding one apart: both may be
    starting for one model on one pool)."""
    return f"{model} (embedding)" if embedding else model


def unreachable(pool_id: str, url: str, exc: httpx.HTTPError) -> HostUnreachableError:
    """The error of a pool that did not answer ``exc``."""
    from rbees_core.tls import tls_failure

    why = tls_failure(exc) or type(exc).__name__
    return HostUnreachableError(f"pool {pool_id} at {url} did not answer: {why}",
                                details={"pool_id": pool_id})


def _shape(entry: PoolEntry) -> tuple[list[tuple[Any, ...]], list[str]]:
    """What of a pool a policy cares about beyond its status: its workers (not health
    timestamps) and the models it marked failed."""
    return (sorted((w, v.get("state"), v.get("model_ref"), v.get("slots_total"))
                   for w, v in entry.workers.items()),
            sorted(m.model_ref for m in entry.state.failed_models))


class PoolControl:
    """Pools as rbees-orcd sees and drives them. Created by the service; the dispatcher
    calls :meth:`age`, :meth:`start_worker`, :meth:`stop_worker` and :meth:`busy`, the
    runners :meth:`idle` and :meth:`suspect`, the routes (through the service) the rest."""

    def __init__(self, book: Book, registry: PoolRegistry, log: Logger, client: httpx.AsyncClient,
                 *, token: str | None, idle_timeout_s: float,
                 generations: dict[str, int] | None = None,
                 worker_defaults: dict[str, Any] | None = None,
                 keep_alive_s: float | None = None,
                 queued_models: Callable[[], set[str]] | None = None) -> None:
        self.book = book
        #: ``[placement]`` as a snapshot's ``worker_defaults``: what a start decision that
        #: names no slots, context or threads gets (a script policy's)
        self.worker_defaults: dict[str, Any] = worker_defaults or {}
        self.registry = registry
        self.log = log
        self.client = client
        self.token = token
        #: each pool's join-token generation (KeyRing.join_generations, shared)
        self.generations = generations if generations is not None else {}
        #: (pool_id, model, embedding) -> the task starting a worker for it there
        self.starting: dict[tuple[str, str, bool], asyncio.Task[None]] = {}
        #: every idle worker is stopped when its keep-alive ends (the latest job's, else
        #: ``keep_alive_s``, else ``idle_timeout_s``); ``queued_models()``: the models of
        #: the queued jobs (the idle workers of those are kept)
        self.queued_models = queued_models or set
        self.keepalive = KeepAlive(
            idle_timeout_s if keep_alive_s is None else keep_alive_s,
            workers=self._known_workers, waiting=self._waited_for, stop=self._stop_idle)
        registry.idle_since = lambda pool_id, worker_id: self.keepalive.last_used(
            (pool_id, worker_id))
        #: workers this process started (shown in logs; keep-alive covers every worker)
        self.started_by_us: set[tuple[str, str]] = set()
        #: the pools' statuses as last counted (by a heartbeat or by :meth:`age`)
        self.statuses: dict[str, str] = {}
        self.aged_at = 0.0
        #: pool_id -> credential refusals in a row (:meth:`_locked_out`)
        self.lockouts: dict[str, int] = {}
        #: counts crashes and backs restarts off (set by the service)
        self.recovery: Recovery | None = None

    # -- what pools say --------------------------------------------------------------------

    def heartbeat(self, beat: PoolHeartbeat) -> None:
        """Record a pool's heartbeat (the first registers it)."""
        entry = self.registry.pools.get(beat.pool_id)
        before = None if entry is None else (self.registry.status(entry), _shape(entry))
        workers_before = {} if entry is None else entry.workers
        entry, new = self.registry.heartbeat(beat)
        if self.recovery is not None and entry.workers is not workers_before:
            self.recovery.observe(beat.pool_id, workers_before, entry.workers)
        if new:
            self.log.info("pool_registered", pool_id=beat.pool_id, url=beat.url)
        status = self.registry.status(entry)
        if before != (status, _shape(entry)):
            self.book.changed()
            # counted here: the aging pass bumps the version only for what no heartbeat
            # announced (with 1,000 pools registered, each bump costs a decision of 10-20 ms
            # of the loop). Only here: a beat that changed nothing (a late one, ignored)
            # must not hide from the aging pass a status that aging changed meanwhile.
            self.statuses[beat.pool_id] = status

    def deregister(self, pool_id: str) -> bool:
        """Forget a pool; False when it was not registered."""
        found = self.registry.remove(pool_id)
        self.statuses.pop(pool_id, None)
        if found:
            self.log.info("pool_deregistered", pool_id=pool_id)
            self.book.changed()
        return found

    def drain(self, pool_id: str) -> None:
        """Place no more jobs on a pool. Raises :class:`NotFoundError`."""
        self.entry(pool_id).draining = True
        self.book.changed()

    def age(self) -> None:
        """Pools age without events: missed heartbeats make one unavailable, then offline.
        Twice a second, a status changed by aging bumps the version so waiting jobs are
        decided again (one changed by a heartbeat has bumped it already); so does the
        passing of POLICY_CLOCK_S, for policies that read the clock. Called by the
        dispatcher before each round."""
        now = time.monotonic()
        if now - self.aged_at < AGE_EVERY_S:
            return
        self.aged_at = now
        statuses = self.registry.statuses()
        book = self.book
        if statuses != self.statuses or now - book.version_bumped_at > POLICY_CLOCK_S:
            self.statuses = statuses
            book.version += 1
            book.version_bumped_at = now

    def entry(self, pool_id: str) -> PoolEntry:
        """The registered pool; raises :class:`NotFoundError`."""
        entry = self.registry.pools.get(pool_id)
        if entry is None:
            raise NotFoundError(f"no pool {pool_id!r}", details={"pool_id": pool_id})
        return entry

    # -- workers' use ----------------------------------------------------------------------

    def busy(self, pool_id: str, worker_id: str, keep_alive_s: float | None = None) -> None:
        """A job was placed on the worker: it is not idle, and the job's keep-alive
        (seconds, ``math.inf``: forever, None: the default) is the worker's now."""
        self.keepalive.dispatched((pool_id, worker_id), keep_alive_s)

    def idle(self, pool_id: str, worker_id: str) -> None:
        """The worker's last job ended: its idle time starts now."""
        self.keepalive.ended((pool_id, worker_id))

    def _waited_for(self, pool_id: str, model_ref: str) -> bool:
        """Whether a queued job wants ``model_ref`` (by reference, or by the catalog id the
        pool ties it to)."""
        wanted = self.queued_models()
        if not wanted or model_ref in wanted:
            return bool(wanted)
        entry = self.registry.pools.get(pool_id)
        aliases = model_aliases({"models": entry.state.models}) if entry is not None else {}
        return any(same_model(model_ref, model, aliases) for model in wanted)

    def _known_workers(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        """Every worker of a ready pool, with the jobs in flight there (for keep-alive)."""
        registry = self.registry
        for entry in registry:
            if registry.status(entry) != "ready":
                continue
            for worker in list(entry.workers.values()):
                worker_id = str(worker.get("worker_id"))
                yield entry.pool_id, worker, registry.inflight.get((entry.pool_id, worker_id), 0)

    def suspect(self, pool_id: str, worker_id: str) -> None:
        """The worker failed a job before its first token: nothing is placed on it until
        the pool's next report says otherwise."""
        entry = self.registry.pools.get(pool_id)
        if entry is not None and worker_id in entry.workers:
            entry.workers[worker_id]["state"] = "suspect"

    def stopping(self, pool_id: str, worker_id: str) -> None:
        """The worker was asked to stop: no new jobs for it before the pool's next
        heartbeat says how it is."""
        entry = self.registry.pools.get(pool_id)
        worker = None if entry is None else entry.workers.get(worker_id)
        if worker is not None:
            worker["state"] = "stopping"

    # -- starting and stopping workers -----------------------------------------------------

    def start_worker(self, pool_id: str, device: str, model: str, *, slots: int | None = None,
                     ctx: int | None = None, threads: int | None = None,
                     embedding: bool = False, n_gpu_layers: int | None = None,
                     tensor_split: Sequence[float] | None = None) -> None:
        """Start a worker for ``model`` on a pool's ``device`` with ``slots`` slots of
        ``ctx`` tokens and ``threads`` cores (None: :attr:`worker_defaults` for the device's
        kind, then the pool's own), an embedding worker with ``embedding``, with
        ``n_gpu_layers`` on the GPU or split by ``tensor_split`` over the pool's GPUs (a
        model larger than one GPU: :mod:`rbees_core.planning`), unless one is starting
        there already; a task of the book waits for it to be ready."""
        key = (pool_id, model, embedding)
        if key in self.starting:
            return
        defaults = worker_defaults({"worker_defaults": self.worker_defaults}, device)
        request = WorkerStartRequest(
            model_ref=model, device=device, slots=slots or defaults.get("slots") or 1,
            ctx=ctx or defaults.get("ctx"), threads=threads or defaults.get("threads"),
            embedding=embedding, n_gpu_layers=n_gpu_layers,
            tensor_split=list(tensor_split) if tensor_split else None)
        expected: dict[str, Any] = {
            "worker_id": "starting-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model)[:100]
            + ("-embedding" if embedding else ""),
            "model_ref": model, "device": device,
            "state": "starting", "slots_total": request.slots, "slots_free": request.slots,
            "uri": None, "threads": request.threads, "cpus": None, "expected": True}
        if embedding:
            expected["embedding"] = True
        self.registry.expect_worker(pool_id, _expected_key(model, embedding), expected)
        self.starting[key] = self.book.spawn(self._start_worker(pool_id, request))

    async def _start_worker(self, pool_id: str, request: WorkerStartRequest) -> None:
        model, device = request.model_ref, request.device
        try:
            pool = self.client_of(pool_id)
            if pool is None:
                raise RbeesError(f"pool {pool_id} has no URL to start a worker on")
            started = await pool.start_worker(request)
            worker_id = started.worker_id
            expected = self.registry.expected.get(pool_id, {}).get(model)
            if expected is not None:  # known by its id now: a heartbeat showing it wins
                expected.update(worker_id=worker_id, uri=started.uri)
            self.started_by_us.add((pool_id, worker_id))
            self.lockouts.pop(pool_id, None)
            self.log.info("worker_start_requested", pool_id=pool_id, worker_id=worker_id,
                          model=model, device=device, slots=request.slots,
                          threads=request.threads)
            deadline = time.monotonic() + WORKER_START_TIMEOUT_S
            while time.monotonic() < deadline:
                worker = await pool.get_worker(worker_id)
                if worker.state in ("ready", "busy"):
                    self.registry.set_worker(pool_id, attrs.asdict(worker))
                    break
                if worker.state in ("failed", "stopped"):
                    # it ended before it was ready: not a refusal to wait out. A crash's
                    # backoff (recovery) says when the next start may come; holding this
                    # start a second longer delayed a restart due at once
                    if worker.state == "failed" and self.recovery is not None:
                        self.recovery.crashed(pool_id, attrs.asdict(worker))
                    self.log.error("worker_start_failed", pool_id=pool_id, model=model,
                                   worker_id=worker_id,
                                   error=f"worker {worker.state}: {worker.error}")
                    break
                await asyncio.sleep(0.05)
        except RbeesError as exc:  # the pool's refusal, or it could not be reached
            self.log.error("worker_start_failed", pool_id=pool_id, model=model, error=str(exc))
            details = exc.details or {}
            need, free = details.get("needed_bytes"), details.get("free_bytes")
            code = details.get("code", exc.code)  # a pool-core code comes in details
            if code in ("INSUFFICIENT_RAM", "INSUFFICIENT_VRAM") and isinstance(need, int):
                # its figures size the model and the device there from now: the next
                # decision evicts, places it elsewhere or says why it waits
                self.registry.refused(pool_id, model, need, device=device,
                                      free_bytes=free if isinstance(free, int) else None)
            if isinstance(exc, HostAuthError | ForbiddenError):
                self._locked_out(pool_id, exc)
            await asyncio.sleep(1.0)  # do not hammer a pool that refuses
        finally:
            self.registry.forget_expected(pool_id, _expected_key(model, request.embedding))
            self.starting.pop((pool_id, model, request.embedding), None)
            self.book.changed()

    def _locked_out(self, pool_id: str, exc: RbeesError) -> None:
        """The pool refused this orchestrator's credential: nothing is placed there for
        LOCKOUT_FIRST_S, twice as long after each further refusal (at most LOCKOUT_MAX_S),
        so a wrong control token or join mix-up costs one request a while, not one a
        second, and ``why`` of the jobs that wait says so."""
        n = self.lockouts.get(pool_id, 0)
        self.lockouts[pool_id] = n + 1
        hold = min(LOCKOUT_MAX_S, LOCKOUT_FIRST_S * 2 ** n)
        why = (f"pool {pool_id} refuses rbees-orcd's credential ({exc.code}); nothing is "
               f"placed there for {hold:.0f} s (check the pool's control token)")
        self.registry.lock_out(pool_id, why, hold)
        self.log.error("pool_refuses_credential", pool_id=pool_id, code=exc.code,
                       hold_s=hold, error=exc.message)

    async def stop_worker(self, pool_id: str, worker_id: str) -> None:
        """Ask a pool to stop one of its workers (no error when it cannot be reached or
        refuses: its next heartbeat tells)."""
        pool = self.client_of(pool_id)
        if pool is None:
            return
        with contextlib.suppress(RbeesError):
            await pool.request_stop(worker_id)
        self.stopping(pool_id, worker_id)
        self.log.info("worker_stop_requested", pool_id=pool_id, worker_id=worker_id)

    def client_of(self, pool_id: str) -> HttpPoolClient | None:
        """A typed client of the pool's API at the URL it registered with (None for an
        unknown pool or one with no URL), over this process's connections, sending its
        token and the correlation id of the request being served."""
        entry = self.registry.pools.get(pool_id)
        if entry is None or not entry.state.url:
            return None
        return HttpPoolClient(entry.state.url, name=pool_id, client=self.client,
                              headers=lambda: self.headers(pool_id))

    async def idle_loop(self) -> None:
        """Stop every worker whose keep-alive has ended (see :mod:`.keepalive`)."""
        await self.keepalive.loop()

    async def _stop_idle(self, pool_id: str, worker_id: str) -> None:
        """Stop a worker whose keep-alive ended: marked ``stopping`` first, so that no job
        is placed on it while the pool is asked."""
        self.stopping(pool_id, worker_id)
        self.started_by_us.discard((pool_id, worker_id))
        self.log.info("worker_keep_alive_ended", pool_id=pool_id, worker_id=worker_id)
        self.book.changed()
        await self.stop_worker(pool_id, worker_id)

    # -- an operator's calls ---------------------------------------------------------------

    def url(self, pool_id: str) -> str:
        """Where the pool's API answers. Raises :class:`NotFoundError` for an unknown pool
        and :class:`ConflictError` for one that registered no URL."""
        entry = self.entry(pool_id)
        if not entry.state.url:
            raise ConflictError(f"pool {pool_id} registered no URL to reach it by",
                                details={"pool_id": pool_id})
        return entry.state.url

    async def call_pool(self, pool_id: str, method: str, path: str,
                        body: dict[str, Any] | None = None, *,
                        stream: bool = False) -> httpx.Response:
        """Send ``method path`` (JSON ``body``) to the pool's API with this process's token
        and the correlation id of the request being served; the pool's answer, whatever its
        status. With ``stream``, the answer's body is not read (no read timeout): the caller
        reads it and closes it. Raises what :meth:`url` raises, and
        :class:`HostUnreachableError` when the pool does not answer."""
        url = self.url(pool_id)
        timeout = httpx.Timeout(POOL_TIMEOUT_S, read=None) if stream else POOL_TIMEOUT_S
        request = self.client.build_request(method, f"{url}{path}", json=body,
                                            headers=self.headers(pool_id), timeout=timeout)
        try:
            return await self.client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise unreachable(pool_id, url, exc) from exc

    def headers(self, pool_id: str) -> dict[str, str]:
        """What a request to pool ``pool_id`` (or one of its workers) carries: that pool's
        control token (rbees_core.auth; never the operator token, which stays here) and
        the correlation id."""
        return request_headers(credential_for(self.token, pool_id,
                                              self.generations.get(pool_id, 0)))

    async def retry_model(self, model: str, pool_id: str | None = None
                          ) -> list[dict[str, Any]]:
        """Ask the pool (every registered pool when None) to clear ``model``'s failed mark
        (pool-managerd's ``POST /v2/models/retry``) and forget the cleared marks now, so
        that jobs for it wait for a worker again rather than end. Per pool: ``{pool_id,
        cleared}`` or ``{pool_id, error: {code, message}}``. Raises :class:`NotFoundError`
        for an unknown ``pool_id``."""
        targets = [self.entry(pool_id)] if pool_id is not None else list(self.registry)
        out: list[dict[str, Any]] = []
        for entry in targets:
            try:
                answer = await self.call_pool(entry.pool_id, "POST", "/v2/models/retry",
                                              {"model": model})
                body = answer.json()
            except (RbeesError, ValueError) as exc:
                message = exc.message if isinstance(exc, RbeesError) else "no JSON answer"
                out.append({"pool_id": entry.pool_id, "error": {
                    "code": getattr(exc, "code", "TRANSPORT_FAILED"), "message": message}})
                continue
            if answer.status_code >= 400 or not isinstance(body, dict):
                error = body.get("error") if isinstance(body, dict) else None
                out.append({"pool_id": entry.pool_id, "error": error or {
                    "code": "TRANSPORT_FAILED", "message": f"answered {answer.status_code}"}})
                continue
            cleared = [m for m in body.get("cleared") or () if isinstance(m, dict)]
            gone = {model, *(str(m.get("model_ref")) for m in cleared)}
            entry.state = attrs.evolve(entry.state, failed_models=[
                m for m in entry.state.failed_models if m.model_ref not in gone])
            out.append({"pool_id": entry.pool_id, "cleared": cleared})
            self.log.info("model_retry", pool_id=entry.pool_id, model=model,
                          cleared=len(cleared))
        self.book.changed()
        return out
