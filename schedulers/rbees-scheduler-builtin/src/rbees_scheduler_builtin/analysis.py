"""One snapshot read for one job: the workers and devices that could take it, and why not.

:class:`Analysis` applies the rules every policy shares, so that each policy only ranks:

- a pool that is not ``ready`` can take nothing ("pool mac is unavailable");
- the job's placement ``pool`` and ``device`` are hard filters;
- a worker takes the job when it holds the job's model, is ``ready`` or ``busy`` and has a
  free slot; a ``starting`` worker with a free slot is worth waiting for; an embedding job
  (``job.embedding``) only an embedding worker, any other job only a worker that is not;
- a device can start a worker when its pool has the model on disk and it has the memory,
  and a CPU a free core (:func:`rbees_core.placement.cores_to_start`: workers never share
  cores); a GPU without the memory for the whole model may still start it split across its
  host's GPUs or with part of its layers in RAM (:attr:`DeviceView.plan`, from
  :func:`rbees_core.planning.host_plans` in the policy's order); a CPU with no free core may
  free one by stopping an idle worker of another model (:meth:`Analysis.evictable`), and a
  device without the memory may free it by stopping idle workers of other models, least
  recently used first (:meth:`Analysis.evictable_memory`, :func:`rbees_core.planning.
  evict_for`);
- ``avoid_pools`` only marks candidates (:attr:`PoolView.avoided`): the policy uses them when
  nothing else can take the job; ``prefer_pools`` gives each pool a rank (:attr:`PoolView.pref`).

The script scheduler uses the same analysis for its helpers and to check what a script
returns, so scripts and built-in policies agree on what is possible.
"""

from __future__ import annotations

from typing import Any

from rbees_core.placement import cores_to_start, worker_defaults
from rbees_core.planning import (
    DEFAULT_PREFER,
    Host,
    Kind,
    ModelNeed,
    Plan,
    evict_for,
    host_of,
    host_plans,
    need_of,
    rank,
)
from rbees_core.scheduling import (
    Candidate,
    failed_mark,
    gib,
    memory_needed,
    model_aliases,
    model_entry,
    same_model,
)

#: Worker states a job can be dispatched to (given a free slot).
USABLE_STATES = frozenset({"ready", "busy"})
#: Worker states on their way to ready.
STARTING_STATES = frozenset({"starting", "loading"})
#: A job that waited this long for the cores of a CPU has a busy worker of another model
#: there stopped (gracefully), not only an idle one (:meth:`Analysis.evictable`).
EVICT_BUSY_AFTER_S = 10.0
_DEVICE_FAMILIES = {"mps": "metal"}


def device_matches(device: str, pin: str | None) -> bool:
    """Whether ``device`` satisfies a placement ``device`` (``cuda`` matches ``cuda:1``)."""
    if pin is None or device == pin:
        return True
    family = _DEVICE_FAMILIES.get(pin, pin)
    return ":" not in family and device.split(":", 1)[0] == family


def held_by(pool: dict[str, Any]) -> str:
    """``its 2 cores are held by worker-cpu-0 (2)``: who holds a pool's cores."""
    cpu: dict[str, Any] = next((d for d in pool.get("devices") or ()
                                if d.get("device") == "cpu"), {})
    holders = [f"{w.get('worker_id')} ({len(w['cpus'])})" for w in pool.get("workers") or ()
               if w.get("cpus") and w.get("state") not in ("stopped", "failed")]
    held = f"held by {', '.join(holders)}" if holders else "held"
    return f"its {plural(int(cpu.get('cores_total') or 0), 'core')} are {held}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class PoolView:
    """One pool as the job sees it; device memory and slot counts are read on first use."""

    __slots__ = ("_free", "_load", "aliases", "avoided", "data", "has_model", "index", "pool_id",
                 "pref", "reason")

    def __init__(self, index: int, data: dict[str, Any], pool_id: str, reason: str | None,
                 avoided: bool, pref: int, aliases: dict[str, str]) -> None:
        self.index = index
        self.data = data
        self.pool_id = pool_id
        self.reason = reason  # why nothing here can take the job; None when the pool can
        self.avoided = avoided
        self.pref = pref  # position in prefer_pools; len(prefer_pools) when not preferred
        self.aliases = aliases
        self.has_model = False
        self._free: dict[str, int] | None = None
        self._load: tuple[int, int, int] | None = None

    @property
    def free(self) -> dict[str, int]:
        """Device name -> bytes available for a new worker."""
        if self._free is None:
            free = self._free = {}
            for d in self.data.get("devices") or ():
                n = (d.get("memory_free_bytes") or 0) - (d.get("memory_reserved_bytes") or 0)
                free[d.get("device")] = n if n > 0 else 0
        return self._free

    def _slots(self) -> tuple[int, int, int]:
        if self._load is None:
            busy = total = count = 0
            for w in self.data.get("workers") or ():
                count += 1
                n = w.get("slots_total") or 0
                total += n
                busy += n - (w.get("slots_free") or 0)
            self._load = (busy, total, count)
        return self._load

    @property
    def slots_busy(self) -> int:
        return self._slots()[0]

    @property
    def slots_total(self) -> int:
        return self._slots()[1]

    @property
    def worker_count(self) -> int:
        return self._slots()[2]

    @property
    def busy_fraction(self) -> float:
        busy, total, _ = self._slots()
        return busy / total if total else 0.0


class WorkerView:
    """A worker that holds the job's model and can take it: now, or once it has started
    (:attr:`waitable`). Workers that cannot are only :class:`Candidate` entries with their
    reason (:attr:`Analysis.entries`)."""

    __slots__ = ("available", "data", "device", "index", "lost", "pool", "prefix", "slots_free",
                 "slots_total", "state", "waitable", "worker_id")

    def __init__(self, pool: PoolView, index: int, data: dict[str, Any], worker_id: str,
                 device: str, state: str, slots_free: int, available: int) -> None:
        self.pool = pool
        self.index = index
        self.data = data
        self.worker_id = worker_id
        self.device = device
        self.state = state
        self.slots_free = slots_free
        self.slots_total: int = data.get("slots_total") or 0
        self.available = available
        self.waitable = state in STARTING_STATES  # starting, with a free slot
        self.lost: str | None = None  # why it lost, once a policy has ranked it
        #: characters of the job's prompt this worker's slots hold (snapshot ``prefix_match``)
        self.prefix = 0

    @property
    def label(self) -> str:
        return f"worker {self.worker_id} on pool {self.pool.pool_id}"


class DeviceView:
    """A device on which a worker for the job's model could be started."""

    __slots__ = ("available", "cores", "data", "device", "gpu", "index", "kind", "need", "plan",
                 "pool", "reason")

    def __init__(self, pool: PoolView, index: int, data: dict[str, Any], need: int,
                 threads: int | None = None, model: str | None = None) -> None:
        self.pool = pool
        self.index = index
        self.data = data
        self.device: str = str(data.get("device", "cpu"))
        self.kind: str = str(data.get("kind") or self.device.split(":", 1)[0])
        self.gpu = self.kind != "cpu" and self.device != "cpu"
        self.available = pool.free.get(self.device, 0)
        self.need = need
        #: cores a worker started here gets (None: its pool does not count cores)
        self.cores = cores_to_start(pool.data, "gpu" if self.gpu else "cpu", threads, model)
        self.reason: str | None = None
        #: how the model goes here when it does not fit whole: a split (this GPU the main
        #: one) or a partial offload (:mod:`rbees_core.planning`); None: whole
        self.plan: Plan | None = None

    @property
    def label(self) -> str:
        return f"device {self.device} on pool {self.pool.pool_id}"

    def rank(self, prefer: tuple[Kind, ...]) -> int:
        """Its place in the policy's order of ways to hold the model: a whole GPU first,
        then ``prefer``'s (a whole CPU is ``cpu``; :func:`rbees_core.planning.rank`)."""
        if self.plan is not None:
            return rank(self.plan, prefer)
        return rank(Plan("gpu" if self.gpu else "cpu", self.pool.pool_id, self.device), prefer)

    def how(self) -> str:
        """``split cuda:0 0.67, cuda:1 0.33``, ``12 of 32 layers on cuda:0, rest on CPU``,
        else ``whole``."""
        return self.plan.describe() if self.plan is not None else "whole"


class Analysis:
    """What one snapshot offers its job. Cheap: workers of other models are skipped, and
    devices are only looked at when :meth:`devices` is called.

    :attr:`entries` holds every worker with the job's model in snapshot order: a
    :class:`WorkerView` when it can take the job (also in :attr:`workers`), else its final
    :class:`Candidate` with the reason.
    """

    def __init__(self, snapshot: dict[str, Any],
                 spill: tuple[Kind, ...] = DEFAULT_PREFER) -> None:
        self.snapshot = snapshot
        #: where a model no GPU holds whole goes, in the policy's order (planning's kinds)
        self.spill = spill
        job = snapshot.get("job") or {}
        self.job: dict[str, Any] = job
        self.model: str = str(job.get("model") or "")
        #: an embedding job: it runs on embedding workers (``embedding: true``) only
        self.embedding = bool(job.get("embedding"))
        placement = job.get("placement") or {}
        self.pin_pool: str | None = placement.get("pool")
        self.pin_device: str | None = placement.get("device")
        prefer = placement.get("prefer_pools") or ()
        self.prefer: dict[str, int] = {}
        for i, pool_id in enumerate(prefer):
            self.prefer.setdefault(pool_id, i)
        self.avoid = frozenset(placement.get("avoid_pools") or ())
        self.pools: list[PoolView] = []
        self.workers: list[WorkerView] = []
        self.entries: list[WorkerView | Candidate] = []
        self._devices: list[DeviceView] | None = None
        model = self.model
        unpreferred = len(prefer)
        pin_pool = self.pin_pool
        pin_device = self.pin_device
        workers = self.workers
        entries = self.entries
        usable = USABLE_STATES
        starting = STARTING_STATES
        embedding = self.embedding
        prefix_match = snapshot.get("prefix_match") or None
        for pi, pool in enumerate(snapshot.get("pools") or ()):
            status = pool.get("status", "unknown")
            pool_id = str(pool.get("pool_id", f"#{pi}"))
            reason = None
            if status != "ready":
                reason = str(pool.get("reason") or f"pool {pool_id} is {status}")
            elif pin_pool is not None and pool_id != pin_pool:
                reason = f"the job is pinned to pool {pin_pool}"
            aliases = model_aliases(pool)
            view = PoolView(pi, pool, pool_id, reason, pool_id in self.avoid,
                            self.prefer.get(pool_id, unpreferred), aliases)
            self.pools.append(view)
            canon = aliases.get(model, model)
            free: dict[str, int] | None = None
            for wi, worker in enumerate(pool.get("workers") or ()):
                ref = worker.get("model_ref")
                if ref != model and (not aliases or aliases.get(ref, ref) != canon):
                    continue
                view.has_model = True
                wid = worker.get("worker_id") or f"#{wi}"
                if reason is not None:
                    entries.append(Candidate(pool_id, wid, "worker", None, reason))
                    continue
                state = worker.get("state") or "unknown"
                slots_free = worker.get("slots_free") or 0
                dev = worker.get("device") or "cpu"
                why = None
                if bool(worker.get("embedding")) is not embedding:
                    why = (f"worker {wid} on pool {pool_id} serves "
                           + ("generation, not embeddings" if embedding else "embeddings only"))
                elif pin_device is not None and not device_matches(dev, pin_device):
                    why = f"the job is pinned to device {pin_device}"
                elif state in usable:
                    if slots_free <= 0:
                        why = f"worker {wid} on pool {pool_id} has no free slot"
                elif state in starting:
                    if slots_free <= 0:
                        why = f"worker {wid} on pool {pool_id} is starting and has no free slot"
                else:
                    why = f"worker {wid} on pool {pool_id} is {state}"
                if why is not None:
                    entries.append(Candidate(pool_id, wid, "worker", None, why))
                    continue
                if free is None:
                    free = view.free
                w = WorkerView(view, wi, worker, wid, dev, state, slots_free, free.get(dev, 0))
                if prefix_match is not None:
                    w.prefix = int(prefix_match.get(f"{pool_id}/{wid}") or 0)
                workers.append(w)
                entries.append(w)
        for view in self.pools:
            if not view.has_model:
                view.has_model = model_entry(view.data, model) is not None

    def rejection(self, pool_id: str, worker_id: str) -> str | None:
        """Why that worker (holding the job's model) cannot take the job; None if it can or
        does not hold the model."""
        for e in self.entries:
            if isinstance(e, Candidate) and e.pool_id == pool_id and e.target == worker_id:
                return e.rejected
        return None

    @property
    def dispatchable(self) -> list[WorkerView]:
        """Workers that can take the job now (avoided pools included)."""
        return [w for w in self.workers if not w.waitable]

    @property
    def waitable(self) -> list[WorkerView]:
        """Starting workers with the model and a free slot."""
        return [w for w in self.workers if w.waitable]

    def devices(self) -> list[DeviceView]:
        """Every device of every pool, with why a worker cannot start there (or None)."""
        if self._devices is None:
            out = []
            job = self.job
            threads = worker_defaults(self.snapshot, "cpu").get("threads")
            for view in self.pools:
                need = memory_needed(job, view.data) if view.reason is None else 0
                plans: dict[str, Plan] | None = None
                for di, device in enumerate(view.data.get("devices") or ()):
                    d = DeviceView(view, di, device, need, threads, self.model)
                    if d.gpu and d.available < need and view.reason is None:
                        if plans is None:  # only for a model some GPU cannot hold whole
                            plans = host_plans(
                                need_of(job, model_entry(view.data, self.model), need),
                                host_of(view.data), self.spill)
                        d.plan = plans.get(d.device)
                    d.reason = self._device_reason(d)
                    out.append(d)
            self._devices = out
        return self._devices

    def _device_reason(self, d: DeviceView) -> str | None:
        if d.pool.reason:
            return d.pool.reason
        if not d.pool.has_model:
            mark = failed_mark(d.pool.data, self.model)
            if mark is not None:  # left out of the pool's models: it never loads there
                return (f"pool {d.pool.pool_id} marked {self.model} failed after "
                        f"{mark.get('attempts')} load attempts: {mark.get('reason')}")
            return f"pool {d.pool.pool_id} does not have {self.model} on disk"
        if not device_matches(d.device, self.pin_device):
            return f"the job is pinned to device {self.pin_device}"
        if d.available < d.need and d.plan is None:
            return f"{d.label} has {gib(d.available)} free, needs {gib(d.need)}"
        if d.cores == 0:
            return f"{d.label} has no free core: {held_by(d.pool.data)}"
        return None

    def evictable(self) -> tuple[DeviceView, dict[str, Any]] | None:
        """A CPU that could start the job's worker but for its cores, and the worker of
        another model there whose stop frees them: an idle one (``ready``, every slot free),
        else, once the job has waited :data:`EVICT_BUSY_AFTER_S`, a busy one (stopped
        gracefully: its running jobs finish, no new ones come), so that a model in steady
        use does not starve another of cores. Idle before busy, then the most cores, the
        fewest busy slots, the least recently used (``idle_since``), pool and worker id;
        None when there is none. The built-in policies stop it and start the job's worker
        once the pool reports the cores free."""
        patient = float(self.job.get("waited_s") or 0.0) >= EVICT_BUSY_AFTER_S
        best: tuple[tuple[Any, ...], DeviceView, dict[str, Any]] | None = None
        for d in self.devices():
            if d.cores != 0 or d.reason is None or "has no free core" not in d.reason:
                continue
            for w in d.pool.data.get("workers") or ():
                busy = (w.get("slots_total") or 0) - (w.get("slots_free") or 0)
                if not w.get("cpus") or w.get("cpu_shared") or \
                        w.get("state") not in ("ready", "busy") or (busy > 0 and not patient):
                    continue
                if same_model(w.get("model_ref"), self.model, d.pool.aliases) and \
                        bool(w.get("embedding")) is self.embedding:
                    continue  # its own model's worker: stopping it only starts it again
                    # (one of the other kind, embedding or not, cannot take the job)
                since = w.get("idle_since")  # the least recently used among equals
                key = (busy > 0, d.pool.pref, -len(w["cpus"]), busy,
                       float(since) if isinstance(since, int | float) else 0.0,
                       d.pool.pool_id, str(w.get("worker_id")))
                if best is None or key < best[0]:
                    best = (key, d, w)
        return None if best is None else (best[1], best[2])

    def evictable_memory(self) -> tuple[DeviceView, list[dict[str, Any]]] | None:
        """A device that could start the job's worker but for its memory, and the idle
        workers of other models there (``ready``/``busy`` with every slot free: never one
        with a job) whose stop frees enough, least recently used first (the snapshot's
        ``idle_since``; a worker without it counts as the least recent). The list is empty
        when workers being stopped there (``stopping``) free enough already: the job waits
        for them, nothing more is stopped. A worker's memory is its ``memory_bytes``, else
        what its model needs on the pool; each worker counts once
        (:func:`rbees_core.planning.evict_for` decides). A CPU with no free core qualifies
        when a worker stopped there gives its cores back too. Among devices: the job's preferred
        pools, GPUs, the fewest stops, then pool and device; None when no device can be
        freed so."""
        best: tuple[tuple[Any, ...], DeviceView, list[dict[str, Any]]] | None = None
        for d in self.devices():
            if d.reason is None or d.pool.reason or not d.pool.has_model \
                    or not device_matches(d.device, self.pin_device) or d.available >= d.need:
                continue
            freed = evict_for(ModelNeed(d.need), self._host(d.pool), d.device)
            if freed is None:
                continue
            by_id = {str(w.get("worker_id")): w for w in d.pool.data.get("workers") or ()}
            chosen = [by_id[wid] for wid in freed.evict]
            if d.cores == 0 and not any(w.get("cpus") and not w.get("cpu_shared")
                                        for w in chosen):
                continue  # no core either, and these stops free none
            key = (d.pool.pref, not d.gpu, len(chosen), d.pool.pool_id, d.device)
            if best is None or key < best[0]:
                best = (key, d, chosen)
        return None if best is None else (best[1], best[2])

    def _host(self, view: PoolView) -> Host:
        """The pool for :mod:`rbees_core.planning`: a worker of the job's own model (of its
        kind, embedding or not) is kept, since stopping it only starts it again; a worker
        that reports no memory holds what its model needs."""
        pool, aliases = view.data, view.aliases
        return host_of(pool, keep=lambda w: same_model(w.get("model_ref"), self.model, aliases)
                       and bool(w.get("embedding")) is self.embedding,
                       sizes=lambda w: self._worker_memory(w, pool))

    def _worker_memory(self, w: dict[str, Any], pool: dict[str, Any]) -> int:
        """Bytes a worker holds: its ``memory_bytes``, else what its model needs."""
        held = w.get("memory_bytes")
        if isinstance(held, int | float) and held > 0:
            return int(held)
        return memory_needed({"model": w.get("model_ref") or ""}, pool)

    def startable(self) -> list[DeviceView]:
        """Devices where a worker for the job's model can start (avoided pools included)."""
        return [d for d in self.devices() if d.reason is None]

    def tier(self) -> bool | None:
        """Which pools may be used: False (not avoided) when any of them can take the job or
        start a worker, True (avoided ones) when only those can, None when nothing can."""
        for avoided in (False, True):
            if any(w.pool.avoided is avoided for w in self.workers):
                return avoided
            if any(d.pool.avoided is avoided for d in self.startable()):
                return avoided
        return None

    def nothing_reason(self) -> str:
        """Why no worker and no device can take the job, in one sentence."""
        model = self.model or "the job's model"
        if not self.pools:
            return "no pools are registered"
        if self.pin_pool is not None and all(p.pool_id != self.pin_pool for p in self.pools):
            return f"the job is pinned to pool {self.pin_pool}, which is not registered"
        if not any(p.has_model for p in self.pools):
            marked = [p.pool_id for p in self.pools if failed_mark(p.data, self.model)]
            if marked:
                return f"{model} failed to load on pool {', '.join(marked)}; no other pool has it"
            return f"no pool has {model} on disk"
        reasons = [e.rejected for e in self.entries if isinstance(e, Candidate)]
        reasons += [d.reason for d in self.devices() if d.reason]
        unique = list(dict.fromkeys(r for r in reasons if r))
        more = f" (and {plural(len(unique) - 3, 'other reason')})" if len(unique) > 3 else ""
        return f"nothing can take {model} now: " + "; ".join(unique[:3]) + more
