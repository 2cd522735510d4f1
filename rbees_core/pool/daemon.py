"""pool-managerd's service: the worker registry, supervision, downloads and heartbeat.

Runs on one asyncio loop. It executes and reports facts; it never decides to restart a
worker (the orchestrator does). Memory is accounted per worker and changes in the same
step as the worker's state, so ``/v2/state`` never shows a failed worker's memory as used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import httpx
import pluggy

from rbees_core import __version__
from rbees_core.api.common import clip
from rbees_core.api.pool import (
    LIVE_WORKER_STATES,
    PoolState,
    WorkerEntry,
    WorkerStartRequest,
)
from rbees_core.api.worker import ReadyCallback
from rbees_core.errors import ConflictError, ModelLoadError, NotFoundError, RbeesError
from rbees_core.log import Logger
from rbees_core.placement import core_donor
from rbees_core.pool import cores, credentials, memory, rpc, workers
from rbees_core.pool.downloads import Downloads
from rbees_core.pool.load_marks import (
    LoadMarks,
    ModelMarkedFailedError,
    catalog_canon,
    load_reason,
)
from rbees_core.tls import ServerTLS, client_context, scheme, tls_failure

LIVE = LIVE_WORKER_STATES
#: How often the supervision loop looks while something can only be seen by looking
POLL_S = 0.1
#: The longest it waits for a reason to look (a pidfd, a new worker) while idle
IDLE_LOOK_S = 1.0
#: Stopped and failed workers kept in the pool's state (for /v2/workers and rbees-orcd to
#: show how they ended); older ones are forgotten as new workers start
ENDED_WORKERS_KEPT = 32


@attrs.define
class PoolSettings:
    pool_id: str
    host: str
    port: int
    orchestrator: str | None = None
    token: str | None = None
    token_file: str | None = None
    #: this pool's join token (``rbees pools join-token``): its heartbeats carry it instead
    #: of the operator token, and the pool may run without the operator token at all
    join_token: str | None = None
    health_interval_s: float = 2.0
    heartbeat_interval_s: float = 5.0
    ready_timeout_s: float = 60.0
    stop_grace_s: float = 30.0
    #: serve HTTPS (--tls-cert, --tls-key); its workers then serve HTTPS with the same
    tls: ServerTLS | None = None

    @property
    def worker_host(self) -> str:
        """The pool's own address (loopback when it listens on every address): where its
        URL points and where its workers listen, so that whoever reaches the pool reaches
        its workers."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    @property
    def url(self) -> str:
        return f"{scheme(self.tls)}://{workers.host_port(self.worker_host, self.port)}"


@attrs.define(eq=False)
class ManagedWorker:
    record: workers.WorkerRecord
    proc: subprocess.Popen[bytes]
    state: str = "starting"
    failed_polls: int = 0
    exit_code: int | None = None
    error: str | None = None
    memory_kind: str = "ram"
    #: the threads it started with, once its pool halved it for another worker
    full_threads: int | None = None
    #: its exit wakes the supervision loop (a pidfd); else the loop looks every POLL_S
    watched: bool = False

    def entry(self) -> WorkerEntry:
        r = self.record
        return WorkerEntry(
            worker_id=r.worker_id, model_ref=r.model_ref, backend=r.backend, device=r.device,
            uri=r.uri, pid=r.pid, state=self.state,  # type: ignore[arg-type]
            slots_total=r.slots_total, slots_free=r.slots_free, memory_bytes=r.memory_bytes,
            started_at=r.started_at, last_health_at=r.last_health_at, exit_code=self.exit_code,
            error=self.error, threads=r.threads, cpus=r.cpus, cpu_shared=r.cpu_shared,
            embedding=r.embedding)


class PoolService:
    """Everything pool-managerd does; the HTTP routes are thin wrappers over it."""

    def __init__(self, settings: PoolSettings, pm: pluggy.PluginManager, log: Logger) -> None:
        self.settings = settings
        self.pm = pm
        self.log = log
        self.workers: dict[str, ManagedWorker] = {}
        self.worker_tokens: dict[str, str] = {}  # worker id -> SHA-256 of its own token
        self.downloads = Downloads(pm, on_fetched=self.retry)
        self.seq = 0
        self.draining = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._client = httpx.AsyncClient(timeout=2.0, verify=client_context())
        self._lock = asyncio.Lock()
        from rbees_core.config import load_config

        #: models that failed to load too often here (the one owner of these marks)
        pool_config = load_config().pool
        self.marks = LoadMarks(pool_config.max_load_failures, canon=catalog_canon(pm))
        self.estimates = memory.Estimates.for_pool(pm)  # the preflight and listing figures
        #: set to send the next heartbeat now (a mark was set or cleared)
        self.beat_now = asyncio.Event()
        self.rpc = rpc.RpcServers(self, enabled=pool_config.rpc, changed=self.beat_now.set)
        #: set to make the supervision loop look now (a worker exited or started)
        self.look_now = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._stop_leftovers()
        self._tasks.append(asyncio.create_task(self._supervise()))
        if self.settings.orchestrator:
            self._tasks.append(asyncio.create_task(self._heartbeat()))

    def _stop_leftovers(self) -> None:
        """The previous run's workers: stopped, not adopted (docs/contract.md, "Leftover
        workers"); records of dead processes removed. Found before any worker of this run
        starts, stopped in the background (a drain may take the stop grace)."""
        from rbees_core.pool import leftovers

        owner = leftovers.pool_managerd()
        if owner is not None and owner.pid != os.getpid():  # not ours: a service built
            self.log.warning("leftovers_not_ours", owner_pid=owner.pid)  # beside a daemon
            return
        found = leftovers.previous_run()
        for gone in (f for f in found if not f.running):
            self.log.info("stale_worker_record_removed", worker_id=gone.record.worker_id,
                          pid=gone.record.pid)
        ids = [f.record.worker_id for f in found if f.running and f.daemon]
        if not ids:
            return

        async def stop() -> None:
            for record in await asyncio.to_thread(leftovers.stop_workers, ids,
                                                  grace=self.settings.stop_grace_s):
                self.log.warning("leftover_worker_stopped", worker_id=record.worker_id,
                                 pid=record.pid, model=record.model_ref, state=record.state)

        self.log.warning("leftover_workers", count=len(ids), worker_ids=ids)
        self._tasks.append(asyncio.create_task(stop()))

    async def close(self) -> None:
        """Drain every worker (bounded by the stop grace), deregister, stop the loops."""
        self.draining = True
        await asyncio.gather(*(self.stop_worker(w, grace=self.settings.stop_grace_s, wait=True)
                               for w in list(self.workers) if self.workers[w].state in LIVE),
                             self.rpc.stop_all(), return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        if self.settings.orchestrator:
            try:
                await self._client.delete(
                    f"{self.settings.orchestrator}/v2/pools/{self.settings.pool_id}",
                    headers=credentials.orcd_headers(self.settings))
            except httpx.HTTPError as exc:
                self.log.warning("deregister_failed", error=str(exc))
        await self._client.aclose()

    def _auth(self) -> dict[str, str]:  # towards its workers (:mod:`.credentials`)
        return credentials.bearer(self.control_token)

    def _worker_token(self, worker_id: str) -> str:
        token, self.worker_tokens[worker_id] = credentials.new_worker_token(worker_id)
        return credentials.worker_token_file(worker_id, token)

    @property
    def control_token(self) -> str | None:
        """What rbees-orcd sends this pool and its workers (:mod:`.credentials`)."""
        return credentials.control_token(self.settings)

    # -- state ---------------------------------------------------------------------------

    def held(self, device: str) -> memory.Held:
        """What the live workers and RPC servers on ``device`` hold (:func:`memory.offer`)."""
        return rpc.held_with(device, ((w.record.device, w.state, w.record.memory_bytes)
                                      for w in self.workers.values() if w.state in LIVE),
                             self.rpc)

    def cores_held(self) -> set[int]:
        """Cores held by this pool's live workers (their own CPU sets)."""
        return cores.held((w.record.cpus, w.record.cpu_shared) for w in self.workers.values()
                          if w.state in LIVE)

    def state(self) -> PoolState:
        from rbees_core.pool import inventory
        from rbees_core.pool import models as local_models

        inv = inventory.collect(self.pm)
        gpus = [self.estimates.offered(gpu, self.held(gpu.device)) for gpu in inv.gpus]
        cpu = None
        if inv.cpu is not None:
            cpu = attrs.evolve(self.estimates.offered(inv.cpu, self.held("cpu")),
                               cores=inv.cpu.cores or os.cpu_count() or 1,
                               cores_reserved=len(self.cores_held()))
        try:
            models = [self.estimates.sized(m.to_dict())
                      for m in local_models.list_models(self.pm)]
        except RbeesError as exc:
            self.log.warning("models_list_failed", error=exc.message)
            models = []
        return PoolState(pool_id=self.settings.pool_id, host=socket.gethostname(), gpus=gpus,
                         cpu=cpu, workers=[w.entry() for w in self.workers.values()],
                         models=models, version=__version__, url=self.settings.url,
                         failed_models=self.marks.listed(),
                         disk_free_bytes=local_models.disk_free_bytes(),
                         rpc=self.rpc.enabled, rpc_servers=self.rpc.entries())

    def get(self, worker_id: str) -> ManagedWorker:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise NotFoundError(f"no worker {worker_id!r} in this pool",
                                details={"worker_id": worker_id}) from None

    # -- workers -------------------------------------------------------------------------

    async def start_worker(self, req: WorkerStartRequest) -> ManagedWorker:
        from rbees_core.errors import DrainingError

        if self.draining:
            raise DrainingError("the pool is shutting down")
        spawn = workers.SpawnRequest(
            model_ref=req.model_ref, backend=req.backend, device=req.device, slots=req.slots,
            ctx=req.ctx, threads=req.threads, embedding=req.embedding,
            n_gpu_layers=req.n_gpu_layers, tensor_split=tuple(req.tensor_split or ()) or None,
            rpc=tuple(req.rpc or ()), rpc_token=req.rpc_token,
            callback_url=f"{self.settings.url}/v2/internal/workers/ready",
            host=self.settings.worker_host, tls=self.settings.tls)
        self.marks.check(req.model_ref)  # marked failed here: refused, nothing spawned
        async with self._lock:  # preflight and reservation (memory, cores) in one step
            try:  # the slots asked for, fewer when their KV caches do not fit
                spawn, checked = await asyncio.to_thread(
                    workers.fit_slots, self.pm, spawn, self.held(req.device),
                    estimates=self.estimates, limit=self.estimates.limit)
            except ModelLoadError as exc:  # the file cannot be read as a model: a failed load
                if not isinstance(exc, ModelMarkedFailedError):
                    self.load_failed(req.model_ref, f"{exc.code}: {exc.message}")
                raise
            taken = {w.record.port for w in self.workers.values() if w.state in LIVE}
            port = await asyncio.to_thread(workers.pick_port, taken, spawn.host)
            wid = self._new_id(req.device)
            spawn = attrs.evolve(spawn, port=port, worker_id=wid)
            await self._make_room(spawn.threads if spawn.device == "cpu" else 1)
            record, proc = await asyncio.to_thread(
                workers.spawn_process, self.pm, spawn, checked=checked,
                token_file=self.settings.token_file, taken=self.cores_held(),
                control_token_file=await asyncio.to_thread(credentials.control_token_file,
                                                           self.settings),
                callback_token_file=await asyncio.to_thread(self._worker_token, wid))
            managed = ManagedWorker(record=record, proc=proc, memory_kind=checked.memory_kind)
            self._forget_ended()
            self.workers[record.worker_id] = managed
            managed.watched = self._watch_exit(proc.pid)
            self.look_now.set()
        self.log.info("worker_starting", worker_id=record.worker_id, model=req.model_ref,
                      device=req.device, pid=record.pid, slots=record.slots_total,
                      threads=record.threads, cpus=record.cpus, cpu_shared=record.cpu_shared)
        self._tasks.append(asyncio.create_task(self._ready_deadline(managed)))
        return managed

    async def _make_room(self, wanted: int | None) -> None:
        """No core free for a new worker: halve the worker holding the most
        (the scheduler's :func:`core_donor`, :func:`cores.halve`); it keeps decoding on the lower
        half. Under ``_lock``."""
        held = self.cores_held()
        if any(c not in held for c in cores.host_cpus()):
            return
        entries = [{"worker_id": w.record.worker_id, "cpus": w.record.cpus or [],
                    "state": w.state, "device": w.record.device,
                    "cpu_shared": w.record.cpu_shared, "embedding": w.record.embedding}
                   for w in self.workers.values()]
        chosen = core_donor({"workers": entries})
        halving = None if chosen is None else cores.halve(chosen["worker_id"], chosen["cpus"],
                                                          wanted)
        if halving is not None:
            w = self.workers[halving.worker_id]
            if await self._set_cores(w, halving.keep) and w.full_threads is None:
                w.full_threads = len(halving.keep) + len(halving.give)

    async def _set_cores(self, w: ManagedWorker, cpus: tuple[int, ...]) -> bool:
        """Move ``w`` onto ``cpus`` (its ``POST /v2/cores``); False when it refused."""
        try:
            answer = await self._client.post(
                f"{w.record.uri}/v2/cores", json={"threads": len(cpus), "cpus": list(cpus)},
                headers=self._auth(), timeout=5.0)
            ok = answer.status_code == 200
        except httpx.HTTPError:
            ok = False
        self.log.info("worker_cores", worker_id=w.record.worker_id, cpus=list(cpus), ok=ok)
        if ok:
            w.record.threads, w.record.cpus = len(cpus), list(cpus)
            workers.save(w.record)
        return ok

    async def _regrow(self) -> None:
        """Give cores that turned free back to the workers halved for others."""
        async with self._lock:
            for w in self.workers.values():
                if w.full_threads is None or w.state not in ("ready", "busy"):
                    continue
                free = set(cores.host_cpus()) - self.cores_held()
                grown = cores.regrow(w.record.cpus or (), w.full_threads, free)
                if grown is not None and await self._set_cores(w, grown) \
                        and len(grown) >= w.full_threads:
                    w.full_threads = None

    def _new_id(self, device: str) -> str:
        kind = device.partition(":")[0]
        used = set(self.workers) | {r.worker_id for r in workers.records()}
        n = 0
        while f"worker-{kind}-{n}" in used:
            n += 1
        return f"worker-{kind}-{n}"

    async def _ready_deadline(self, w: ManagedWorker) -> None:
        await asyncio.sleep(self.settings.ready_timeout_s)
        if w.state == "starting":
            workers.kill(w.record.pid)
            self._fail(w, "WORKER_START_TIMEOUT",
                       f"not ready after {self.settings.ready_timeout_s:.0f} s; killed")

    def ready_callback(self, body: ReadyCallback) -> ManagedWorker:
        w = self.workers.get(body.worker_id)
        if w is None:
            raise ConflictError(f"unknown worker {body.worker_id!r}",
                                details={"worker_id": body.worker_id})
        if w.state != "starting":
            raise ConflictError(f"worker {body.worker_id!r} is {w.state}, not starting",
                                details={"worker_id": body.worker_id, "state": w.state})
        if body.pid != w.record.pid:
            raise ConflictError("the callback's pid is not the worker's",
                                details={"worker_id": body.worker_id})
        w.record.memory_bytes = body.memory_bytes
        self.estimates.ready(w.record)  # calibrates later estimates of its model
        w.record.slots_free = body.slots_total
        w.record.last_health_at = time.time()
        w.memory_kind = body.memory_kind
        w.state = "ready"
        self.marks.loaded(w.record.model_ref)
        workers.save(w.record)
        self.log.info("worker_ready", worker_id=body.worker_id, memory_bytes=body.memory_bytes)
        return w

    def _fail(self, w: ManagedWorker, code: str, message: str) -> None:
        if w.state in ("failed", "stopped"):
            return
        loading = w.state == "starting"
        w.state = "failed"  # memory is released with this state change
        w.error = clip(f"{code}: {message}")
        self.log.error("worker_failed", worker_id=w.record.worker_id, code=code,
                       exit_code=w.exit_code, message=message)
        self.beat_now.set()  # the orchestrator learns of it now: it may restart it at once
        if loading:  # it never got ready: its model failed to load (its own words if any)
            reason = load_reason(workers.tail(w.record.worker_id, 50)) or w.error
            self.load_failed(w.record.model_ref, reason)

    def load_failed(self, model_ref: str, reason: str) -> None:
        """Count a failed load of ``model_ref``; mark it once it reached the limit and tell
        the orchestrator at once."""
        mark = self.marks.failed(model_ref, reason)
        if mark is not None:
            self.log.error("model_marked_failed", model=model_ref, attempts=mark.attempts,
                           reason=reason)
            self.beat_now.set()

    def retry(self, refs: list[str]) -> list[Any]:
        """Clear the marks of the models ``refs`` name (``POST /v2/models/retry``, a new
        download); returns the marks cleared."""
        cleared = self.marks.clear(refs)
        if cleared:
            self.log.info("model_marks_cleared", models=[m.model_ref for m in cleared])
            self.beat_now.set()
        return cleared

    async def stop_worker(self, worker_id: str, *, grace: float | None = None,
                          wait: bool = False, drain_only: bool = False) -> ManagedWorker:
        w = self.get(worker_id)
        if w.state not in LIVE:
            return w
        w.state = "draining" if drain_only else "stopping"
        try:
            await self._client.post(f"{w.record.uri}/v2/shutdown", headers=self._auth())
        except httpx.HTTPError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.record.pid, signal.SIGTERM)
        task = asyncio.create_task(self._reap(w, None if drain_only else
                                              (grace if grace is not None
                                               else self.settings.stop_grace_s)))
        self._tasks.append(task)
        if wait:
            await task
        return w

    async def _reap(self, w: ManagedWorker, grace: float | None) -> None:
        deadline = None if grace is None else time.monotonic() + grace
        while w.proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                w.proc.kill()
                self.log.warning("worker_killed", worker_id=w.record.worker_id)
            await asyncio.sleep(0.05)
        w.exit_code = w.proc.returncode
        if w.state in ("stopping", "draining"):
            w.state = "stopped"
            (workers.worker_dir(w.record.worker_id) / "state.json").unlink(missing_ok=True)
            self.log.info("worker_stopped", worker_id=w.record.worker_id, exit_code=w.exit_code)
        await self._regrow()

    def _forget_ended(self) -> None:
        """Keep the :data:`ENDED_WORKERS_KEPT` latest stopped or failed workers, not every
        one since the pool started: a pool that had started 1,025 workers (keep-alive
        unloads, ``keep_alive: 0``, a crash loop) reported them all in every heartbeat, and
        rbees-orcd refuses a heartbeat of more than 2,048."""
        workers.forget_ended(self.workers, LIVE, ENDED_WORKERS_KEPT)

    def _watch_exit(self, pid: int) -> bool:
        """Set :attr:`look_now` the moment process ``pid`` exits: a pidfd (Linux 5.3 and
        later) in the event loop. False where there is none: the loop then looks every
        :data:`POLL_S`."""
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux, an old kernel, or already gone
            return False
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self.look_now.set()

        loop.add_reader(fd, exited)
        return True

    def _next_look(self, last_poll: float) -> float:
        """How long the supervision loop may wait for :attr:`look_now`: :data:`POLL_S`
        while something can only be seen by looking (an RPC server, a worker whose exit
        has no pidfd), else until the next health poll, at most :data:`IDLE_LOOK_S`."""
        live = [w for w in self.workers.values() if w.state in ("starting", "ready", "busy")]
        if self.rpc.polled() or any(not w.watched for w in live):
            return POLL_S
        if any(w.state in ("ready", "busy") for w in live):
            return max(0.0, min(IDLE_LOOK_S, last_poll + self.settings.health_interval_s
                                - time.monotonic()))
        return IDLE_LOOK_S

    async def _supervise(self) -> None:
        """Exit codes at once (a pidfd; elsewhere within :data:`POLL_S`: a crashed worker
        with jobs waiting for its model is started again once rbees-orcd hears of it, and
        every tenth of a second counts towards its "back within 2 s"); health polls every
        ``health_interval_s``. An idle pool wakes once a second, not ten times."""
        last_poll = 0.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.look_now.wait(), self._next_look(last_poll))
            self.look_now.clear()
            for w in list(self.workers.values()):
                if w.state in ("starting", "ready", "busy") and w.proc.poll() is not None:
                    w.exit_code = w.proc.returncode
                    self._fail(w, "WORKER_EXITED", f"process exited with {w.exit_code}")
                    await self._regrow()
            await self.rpc.supervise()
            if time.monotonic() - last_poll >= self.settings.health_interval_s:
                last_poll = time.monotonic()
                await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())
                                       if w.state in ("ready", "busy")))

    async def _poll(self, w: ManagedWorker) -> None:
        try:
            answer = await self._client.get(f"{w.record.uri}/v2/ready", headers=self._auth(),
                                            timeout=min(2.0, self.settings.health_interval_s))
            body = answer.json()
            if answer.status_code >= 500 and body.get("state") not in ("busy", "draining"):
                raise ValueError(f"status {answer.status_code}")
        except (httpx.HTTPError, ValueError) as exc:
            w.failed_polls += 1
            if w.failed_polls >= 3:
                workers.kill(w.record.pid)
                self._fail(w, "WORKER_UNHEALTHY", f"3 failed health polls ({exc})")
            return
        w.failed_polls = 0
        w.record.slots_free = body.get("slots_free")
        w.record.last_health_at = time.time()
        if w.state in ("ready", "busy"):
            w.state = "busy" if body.get("slots_free") == 0 else "ready"

    # -- downloads -----------------------------------------------------------------------

    def download(self, model: str, force: bool,
                 on_event: Callable[[str, dict[str, Any]], Awaitable[None] | None]
                 ) -> asyncio.Queue[tuple[str, dict[str, Any]]]:
        """Start (or join) the download of ``model``; events arrive on the returned queue."""
        return self.downloads.start(model, force)

    # -- heartbeat -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        base = self.settings.heartbeat_interval_s
        delay = base
        url = f"{self.settings.orchestrator}/v2/pools/{self.settings.pool_id}/heartbeat"
        while True:
            self.seq += 1
            body = {**attrs.asdict(self.state()), "seq": self.seq, "sent_at": time.time()}
            try:
                answer = await self._client.post(
                    url, json=body, headers=credentials.orcd_headers(self.settings),
                    timeout=max(1.0, base))
                ok = answer.status_code < 300
                if not ok:
                    self.log.warning("heartbeat_refused", status=answer.status_code)
            except httpx.HTTPError as exc:
                ok = False
                self.log.warning("heartbeat_failed", url=url,
                                 error=tls_failure(exc) or str(exc) or type(exc).__name__)
            # a failed one is tried again after 2 intervals (+-20%), never longer: a
            # restarted rbees-orcd judges no job unplaceable during its first 3 intervals
            # while its pools report in, and a pool that had backed off to up to a minute
            # missed that window (its models looked held by no pool: NO_CAPACITY), its
            # workers' keep-alive waiting as long
            delay = base if ok else min(delay * 2, 2 * base)
            with contextlib.suppress(asyncio.TimeoutError):  # or at once, when told
                await asyncio.wait_for(self.beat_now.wait(), timeout=delay * random.uniform(
                    0.8, 1.2) if not ok else base)
            self.beat_now.clear()
