"""The built-in placement policies.

Every policy follows one procedure (:meth:`BuiltinPolicy.verdict`) and differs only in how
it ranks workers and devices:

1. warm-model affinity: a ``ready``/``busy`` worker holding the job's model with a free slot
   wins over everything else; among them, those whose slots hold the longest prefix of the
   job's prompt (the snapshot's ``prefix_match``: a chat's next turn goes where its last one
   ran), then the policy ranks them;
2. else, when a worker for the model is already starting with a free slot, the job waits
   for it rather than starting another one;
3. else a worker is started on a device of a pool that has the model on disk, the memory
   and (a CPU) a free core: a GPU that holds the model whole first, then, in the policy's
   :attr:`~BuiltinPolicy.spill` order, a split across the GPUs of one host, part of its
   layers on one GPU and the rest in RAM, the CPU (:mod:`rbees_core.planning`; the split
   or offload is in the decision and its reason); then a device without a copy of the
   model before one with a copy; the policy ranks those devices. The worker gets the snapshot's
   ``worker_defaults`` for the device's kind (slots, context) and the cores it can have
   (:func:`rbees_core.placement.cores_to_start`);
4. else, when a CPU lacks only a free core, an idle worker of another model there is
   stopped to free its cores (a busy one once the job has waited 10 s:
   :meth:`~rbees_scheduler_builtin.analysis.Analysis.evictable`), and the job waits;
5. else, when no pool holds the model and a source can download it (the snapshot's
   ``job.downloadable``), it is downloaded to the pool :func:`rbees_core.scheduling.
   download_choice` picks (``download``, then ``wait``), or waited for while a download
   of it is in progress (a pool's ``downloading``): pull on first use;
6. else, when a device lacks only memory, idle workers of other models there are stopped,
   least recently used first, until it fits (never one with a job:
   :meth:`~rbees_scheduler_builtin.analysis.Analysis.evictable_memory`), and the job waits
   for the memory; each stop is a decision of the verdict, with its reason;
7. else the job waits, and the reason says what stood in the way.

Pools of the job's ``avoid_pools`` are only used when no other pool can do any of 1-3;
``prefer_pools`` ranks before the policy does. Candidates cover every worker holding the
job's model, and every device when a start was considered, each loser with its reason.
"""

from __future__ import annotations

import functools
import time
from typing import Any, ClassVar

import attrs

from rbees_core.interfaces import Scheduler
from rbees_core.placement import worker_defaults
from rbees_core.planning import DEFAULT_PREFER, Kind
from rbees_core.pulls import describe_download, download_choice, downloading
from rbees_core.scheduling import (
    Candidate,
    Decision,
    Snapshot,
    Verdict,
    gib,
    same_model,
)
from rbees_scheduler_builtin.analysis import Analysis, DeviceView, WorkerView, plural

AVOIDED = "pool {} is avoided by the job's placement"
# reasons quote the same few numbers over and over
_gib = functools.lru_cache(maxsize=4096)(gib)


@functools.lru_cache(maxsize=256)
def _slots(n: int) -> str:
    return plural(n, "free slot")


def _cores(n: int) -> str:
    return plural(n, "core")


def _chars(n: int) -> str:
    return plural(n, "char")


class BuiltinPolicy(Scheduler):
    """Shared procedure of the built-in policies; subclasses rank workers and devices."""

    name: ClassVar[str]
    #: One line for ``rbees scheduler`` listings.
    description: ClassVar[str] = ""
    #: Where a model that no GPU holds whole goes, best first (:mod:`rbees_core.planning`):
    #: split across one host's GPUs, part of its layers on one GPU, the CPU.
    spill: ClassVar[tuple[Kind, ...]] = DEFAULT_PREFER

    # -- ranking (smaller keys win; ties fall to pool id, then worker id or device) --------

    def worker_key(self, w: WorkerView) -> tuple[Any, ...]:
        return (-w.slots_free, -w.available)

    def worker_score(self, w: WorkerView) -> float:
        return float(w.slots_free)

    def describe_worker(self, w: WorkerView) -> str:
        """What the ranking looked at, for the reasons of losers."""
        return f"{_slots(w.slots_free)}, {_gib(w.available)} free on {w.device}"

    def why_worker(self, w: WorkerView) -> str:
        """Why the winner won, completing "... because it ..."."""
        return (f"has the most free slots ({w.slots_free}), then the most free memory "
                f"({gib(w.available)} on {w.device})")

    def device_key(self, d: DeviceView) -> tuple[Any, ...]:
        return (not d.gpu, -d.available)

    def describe_device(self, d: DeviceView) -> str:
        return f"{'GPU' if d.gpu else 'CPU'}, {gib(d.available)} free"

    def why_device(self, d: DeviceView) -> str:
        kind = "the GPU" if d.gpu else "the device"
        return f"is {kind} with the most free memory ({gib(d.available)})"

    def pick_worker(self, ready: list[WorkerView]) -> WorkerView:
        """The winner among eligible workers: the smallest ``(pref, worker_key, pool id,
        worker id)``."""
        key = self.worker_key
        return min(ready, key=lambda w: (w.pool.pref, *key(w), w.pool.pool_id, w.worker_id))

    # -- the procedure ----------------------------------------------------------------------

    def decide(self, snapshot: Snapshot) -> Verdict:
        started = time.perf_counter()
        verdict = self.verdict(Analysis(snapshot.data, self.spill))
        return attrs.evolve(verdict, elapsed_ms=(time.perf_counter() - started) * 1000)

    def verdict(self, a: Analysis) -> Verdict:
        """Decide for an already analysed snapshot (the script scheduler's fallback)."""
        tier = a.tier()
        if tier is None:
            evict = a.evictable()
            if evict is not None:
                return self._evict(a, *evict)
            if a.job.get("downloadable") and not any(p.has_model for p in a.pools):
                return self._download(a)
            freed = a.evictable_memory()
            return self._nothing(a) if freed is None else self._evict_memory(a, *freed)
        workers = [w for w in a.workers if w.pool.avoided is tier]
        ready = [w for w in workers if not w.waitable]
        if ready:
            return self._dispatch(a, ready, tier)
        starting = [w for w in workers if w.waitable]
        if starting:
            return self._wait_for(a, starting, tier)
        return self._start(a, [d for d in a.startable() if d.pool.avoided is tier], tier)

    def _pref_reason(self, loser_pref: int, winner_pref: int, winner_pool: str) -> str | None:
        if loser_pref != winner_pref:
            return f"the job's placement prefers pool {winner_pool}"
        return None

    def _worker_candidates(self, a: Analysis, winner: WorkerView | None,
                           tier: bool | None) -> list[Candidate]:
        out: list[Candidate] = []
        add = out.append
        score = self.worker_score
        for w in a.entries:
            if type(w) is Candidate:
                add(w)
                continue
            assert isinstance(w, WorkerView)
            pool = w.pool
            if w is winner:
                add(Candidate(pool.pool_id, w.worker_id, "worker", score(w), None))
            elif pool.avoided is not tier:
                add(Candidate(pool.pool_id, w.worker_id, "worker", None,
                              AVOIDED.format(pool.pool_id)))
            elif w.waitable:
                add(Candidate(pool.pool_id, w.worker_id, "worker", None,
                              w.lost or f"{w.label} is still starting"))
            else:
                add(Candidate(pool.pool_id, w.worker_id, "worker", score(w),
                              w.lost or "not chosen"))
        return out

    def _device_candidates(self, a: Analysis, winner: DeviceView | None, tier: bool | None,
                           lost: dict[int, str]) -> list[Candidate]:
        out = []
        for d in a.devices():
            score = round(d.available / 1024 ** 3, 3)
            if d is winner:
                out.append(Candidate(d.pool.pool_id, d.device, "device", score, None))
            elif d.reason is not None:
                out.append(Candidate(d.pool.pool_id, d.device, "device", None, d.reason))
            elif d.pool.avoided is not tier:
                out.append(Candidate(d.pool.pool_id, d.device, "device", None,
                                     AVOIDED.format(d.pool.pool_id)))
            else:
                out.append(Candidate(d.pool.pool_id, d.device, "device", score,
                                     lost.get(id(d), "not chosen")))
        return out

    def _dispatch(self, a: Analysis, ready: list[WorkerView], tier: bool) -> Verdict:
        top = min(w.pool.pref for w in ready)
        # prefix-aware: the workers whose slots hold the longest prefix of the prompt
        # (the snapshot's prefix_match) come first, then the policy's own order
        held = max(w.prefix for w in ready if w.pool.pref == top)
        winner = self.pick_worker(ready if held <= 0 else [
            w for w in ready if w.pool.pref == top and w.prefix == held])
        beaten_by = self.worker_lost_to(winner)
        for w in ready:
            if w is winner:
                continue
            if w.pool.pref != top:
                w.lost = self._pref_reason(w.pool.pref, top, winner.pool.pool_id)
            elif w.prefix < held:
                w.lost = (f"{winner.label} holds {_chars(held)} of this prompt's prefix, "
                          f"{w.label} {_chars(w.prefix)}")
            else:
                w.lost = self.worker_lost(w, beaten_by)
        why = self.why_worker(winner)
        if held > 0:
            why = f"holds {_chars(held)} of this prompt's prefix (the most), then it {why}"
        summary = (f"{winner.label} already has {a.model} loaded and a free slot; "
                   f"{self.name} chose it because it {why}")
        if tier:
            summary += "; its pool is avoided by the job's placement, but no other pool can run it"
        decision = Decision("dispatch", pool_id=winner.pool.pool_id, worker_id=winner.worker_id)
        return Verdict(self.name, [decision], self._worker_candidates(a, winner, tier), summary)

    def worker_lost_to(self, winner: WorkerView) -> str:
        """The part of a loser's reason that names the winner (made once per decision)."""
        return f"{winner.label} ({self.describe_worker(winner)})"

    def worker_lost(self, w: WorkerView, beaten_by: str) -> str:
        return f"{w.label} ({self.describe_worker(w)}) ranked below {beaten_by}"

    def _wait_for(self, a: Analysis, starting: list[WorkerView], tier: bool) -> Verdict:
        ranked = sorted(starting, key=lambda w: (w.pool.pref, -w.slots_free, w.pool.pool_id,
                                                 w.worker_id))
        winner = ranked[0]
        for w in ranked[1:]:
            w.lost = f"{w.label} is also starting; {winner.label} was picked to wait for"
        reason = (f"{winner.label} is starting with {a.model}; the job waits for it rather "
                  "than starting another worker")
        decision = Decision("wait", pool_id=winner.pool.pool_id, worker_id=winner.worker_id,
                            reason=reason)
        candidates = self._worker_candidates(a, winner, tier)
        return Verdict(self.name, [decision], candidates, reason)

    def _start(self, a: Analysis, devices: list[DeviceView], tier: bool) -> Verdict:
        copies = {(w.pool.pool_id, w.device) for w in a.workers}
        for e in a.entries:  # busy workers with the model: a new copy goes elsewhere first
            if isinstance(e, Candidate):
                pool = next(p for p in a.pools if p.pool_id == e.pool_id)
                copies.update((e.pool_id, str(w.get("device") or "cpu"))
                              for w in pool.data.get("workers") or ()
                              if w.get("worker_id") == e.target and same_model(
                                  w.get("model_ref"), a.model, pool.aliases))
        prefer = a.spill
        ranked = sorted(devices, key=lambda d: (d.pool.pref, d.rank(prefer),
                                                (d.pool.pool_id, d.device) in copies,
                                                *self.device_key(d), d.pool.pool_id, d.device))
        winner = ranked[0]
        first = winner.rank(prefer)
        lost = {}
        for d in ranked[1:]:
            lost[id(d)] = (self._pref_reason(d.pool.pref, winner.pool.pref, winner.pool.pool_id)
                           or (f"{d.label} already runs a copy of {a.model}" if
                               (d.pool.pool_id, d.device) in copies and
                               (winner.pool.pool_id, winner.device) not in copies else None)
                           or (f"{d.label} is a CPU; a GPU comes first" if winner.gpu
                               and not d.gpu and winner.plan is None else None)
                           or (f"{d.label} could take it {d.how()}; {self.name} prefers "
                               f"{winner.how()} on {winner.label}" if d.rank(prefer) != first
                               else None)
                           or f"{d.label} ({self.describe_device(d)}) ranked below "
                              f"{winner.label} ({self.describe_device(winner)})")
        need = f"; it needs {gib(winner.need)}" if winner.need else ""
        if winner.plan is not None and winner.plan.describe():
            need += f", which it does not have whole: {winner.plan.describe()}"
        summary = (f"no {'embedding ' if a.embedding else ''}worker with {a.model} can take the "
                   f"job now; {self.name} starts one on "
                   f"{winner.label}, which {self.why_device(winner)}{need}")
        if tier:
            summary += "; its pool is avoided by the job's placement, but no other pool can run it"
        defaults = worker_defaults(a.snapshot, winner.device)
        threads = winner.cores if winner.cores is not None else defaults.get("threads")
        if threads:
            summary += f", with {_cores(threads)}"
        plan = winner.plan
        decision = Decision("start_worker", pool_id=winner.pool.pool_id, device=winner.device,
                            model=a.model, slots=defaults.get("slots"),
                            ctx=defaults.get("ctx"), threads=threads or None,
                            embedding=a.embedding or None,
                            n_gpu_layers=plan.n_gpu_layers if plan is not None else None,
                            tensor_split=plan.split_by_index() if plan is not None else None)
        candidates = self._worker_candidates(a, None, tier)
        candidates += self._device_candidates(a, winner, tier, lost)
        return Verdict(self.name, [decision], candidates, summary)

    def _evict(self, a: Analysis, device: DeviceView, idle: dict[str, Any]) -> Verdict:
        pool_id = device.pool.pool_id
        idle_now = (idle.get("slots_free") or 0) >= (idle.get("slots_total") or 0)
        how = "is idle there" if idle_now else (
            f"holds them while the job has waited {a.job.get('waited_s', 0):.0f} s; it finishes "
            "its running jobs and")
        reason = (f"{device.label} could start {a.model} but has no free core; worker "
                  f"{idle.get('worker_id')} ({idle.get('model_ref')}) {how} is stopped to "
                  "free its cores, and the job waits for them")
        candidates = self._worker_candidates(a, None, None)
        candidates += self._device_candidates(a, None, None, {})
        return Verdict(self.name, [
            Decision("stop_worker", pool_id=pool_id, worker_id=str(idle.get("worker_id"))),
            Decision("wait", reason=reason)], candidates, reason)

    def _download(self, a: Analysis) -> Verdict:
        """Pull on first use: no pool holds the model and a source can download it."""
        pools = a.snapshot.get("pools") or []
        going = downloading(pools, a.model)
        if going is not None:  # one download per model: wait for it
            reason = describe_download(a.model, *going)
            return Verdict(self.name, [Decision("wait", reason=reason)], [], reason)
        pool_id, lost = download_choice(a.job, pools)
        candidates = [Candidate(p, p, "device", None, why) for p, why in lost.items()]
        if pool_id is None:
            reason = (f"no pool has {a.model} on disk and none can download it now: "
                      + "; ".join(list(dict.fromkeys(lost.values()))[:3]))
            return Verdict(self.name, [Decision("wait", reason=reason)], candidates, reason)
        reason = (f"no pool has {a.model} on disk; {self.name} downloads it to pool "
                  f"{pool_id}, then starts a worker there")
        candidates.insert(0, Candidate(pool_id, pool_id, "device", None, None))
        return Verdict(self.name, [Decision("download", pool_id=pool_id, model=a.model),
                                   Decision("wait", reason=reason)], candidates, reason)

    def _evict_memory(self, a: Analysis, device: DeviceView,
                      stops: list[dict[str, Any]]) -> Verdict:
        candidates = self._worker_candidates(a, None, None)
        candidates += self._device_candidates(a, None, None, {})
        short = (f"{device.label} could start {a.model} but has {gib(device.available)} "
                 f"free, needs {gib(device.need)}")
        if not stops:
            reason = f"{short}; workers being stopped there free the rest, and the job waits"
            return Verdict(self.name, [Decision("wait", reason=reason)], candidates, reason)
        now = a.snapshot.get("now")
        words = []
        for w in stops:
            since = w.get("idle_since")
            idle = (f"idle for {max(0.0, float(now) - float(since)):.0f} s"
                    if isinstance(since, int | float) and isinstance(now, int | float)
                    else "idle")
            words.append(f"{w.get('worker_id')} ({w.get('model_ref')}, {idle})")
        reason = (f"{short}; least recently used idle "
                  f"{'worker' if len(stops) == 1 else 'workers'} {', '.join(words)} "
                  f"{'is' if len(stops) == 1 else 'are'} stopped to free memory, and the job "
                  "waits for it")
        pool_id = device.pool.pool_id
        decisions = [Decision("stop_worker", pool_id=pool_id, worker_id=str(w.get("worker_id")),
                              reason=f"evicted (least recently used) to fit {a.model} on "
                                     f"{device.device}") for w in stops]
        return Verdict(self.name, [*decisions, Decision("wait", reason=reason)], candidates,
                       reason)

    def _nothing(self, a: Analysis) -> Verdict:
        reason = a.nothing_reason()
        candidates = self._worker_candidates(a, None, None)
        candidates += self._device_candidates(a, None, None, {})
        return Verdict(self.name, [Decision("wait", reason=reason)], candidates, reason)


class LeastLoaded(BuiltinPolicy):
    """The default: the worker with the most free slots, then the most free device memory."""

    name: ClassVar[str] = "least-loaded"
    description: ClassVar[str] = ("most free slots, then most free memory; start on the GPU "
                                  "with the most free memory")


class MostFreeMemory(BuiltinPolicy):
    """The worker whose device has the most free memory, then the most free slots."""

    name: ClassVar[str] = "most-free-memory"
    description: ClassVar[str] = "the worker whose device has the most free memory"

    def worker_key(self, w: WorkerView) -> tuple[Any, ...]:
        return (-w.available, -w.slots_free)

    def worker_score(self, w: WorkerView) -> float:
        return round(w.available / 1024 ** 3, 3)

    def describe_worker(self, w: WorkerView) -> str:
        return f"{_gib(w.available)} free on {w.device}, {_slots(w.slots_free)}"

    def why_worker(self, w: WorkerView) -> str:
        return f"runs on the device with the most free memory ({gib(w.available)} on {w.device})"


class RoundRobin(BuiltinPolicy):
    """Takes eligible workers in turn (ordered by pool and worker id); the turn is a counter
    kept in the instance, so a sequence of snapshots gives one sequence of choices."""

    name: ClassVar[str] = "round-robin"
    description: ClassVar[str] = "eligible workers in turn, by pool and worker id"

    def __init__(self) -> None:
        self.turn = 0

    def worker_key(self, w: WorkerView) -> tuple[Any, ...]:
        return ()

    def pick_worker(self, ready: list[WorkerView]) -> WorkerView:
        top = min(w.pool.pref for w in ready)
        best = sorted((w for w in ready if w.pool.pref == top),
                      key=lambda w: (w.pool.pool_id, w.worker_id))
        winner = best[self.turn % len(best)]
        self.turn += 1
        return winner

    def worker_score(self, w: WorkerView) -> float:
        return 0.0

    def worker_lost_to(self, winner: WorkerView) -> str:
        return f"it was {winner.label}'s turn"

    def worker_lost(self, w: WorkerView, beaten_by: str) -> str:
        return beaten_by

    def why_worker(self, w: WorkerView) -> str:
        return "was next in turn"


class Binpack(BuiltinPolicy):
    """Fills the busiest worker that still has a free slot; starts on the device that fits
    most tightly, so large devices stay free for large models."""

    name: ClassVar[str] = "binpack"
    description: ClassVar[str] = "fill the busiest worker with a free slot first"
    #: a model too large for one GPU takes one GPU and RAM, leaving the others free
    spill: ClassVar[tuple[Kind, ...]] = ("partial", "split", "cpu")

    def worker_key(self, w: WorkerView) -> tuple[Any, ...]:
        return (w.slots_free, -(w.slots_total - w.slots_free))

    def worker_score(self, w: WorkerView) -> float:
        return float(w.slots_total - w.slots_free)

    def describe_worker(self, w: WorkerView) -> str:
        return f"{w.slots_total - w.slots_free} of {w.slots_total} slots busy"

    def why_worker(self, w: WorkerView) -> str:
        return (f"is the busiest worker with a free slot ({w.slots_total - w.slots_free} of "
                f"{w.slots_total} slots busy)")

    def device_key(self, d: DeviceView) -> tuple[Any, ...]:
        return (not d.gpu, d.available)

    def why_device(self, d: DeviceView) -> str:
        return f"fits it most tightly ({gib(d.available)} free)"


class Spread(BuiltinPolicy):
    """The emptiest pool first (fewest of its slots busy), then the most free slots; starts
    in the pool with the fewest workers."""

    name: ClassVar[str] = "spread"
    description: ClassVar[str] = "the emptiest pool first"

    def worker_key(self, w: WorkerView) -> tuple[Any, ...]:
        return (w.pool.busy_fraction, -w.slots_free, -w.available)

    def worker_score(self, w: WorkerView) -> float:
        return round(1.0 - w.pool.busy_fraction, 4)

    def describe_worker(self, w: WorkerView) -> str:
        p = w.pool
        return f"pool {p.pool_id} has {p.slots_busy} of {p.slots_total} slots busy"

    def why_worker(self, w: WorkerView) -> str:
        p = w.pool
        return f"is in the emptiest pool ({p.slots_busy} of {p.slots_total} slots busy)"

    def device_key(self, d: DeviceView) -> tuple[Any, ...]:
        return (not d.gpu, d.pool.worker_count, -d.available)

    def describe_device(self, d: DeviceView) -> str:
        return (f"{'GPU' if d.gpu else 'CPU'}, {gib(d.available)} free, pool has "
                f"{plural(d.pool.worker_count, 'worker')}")

    def why_device(self, d: DeviceView) -> str:
        return (f"is in the pool with the fewest workers ({d.pool.worker_count}) and has "
                f"{gib(d.available)} free")


POLICIES: tuple[type[BuiltinPolicy], ...] = (LeastLoaded, MostFreeMemory, RoundRobin, Binpack,
                                             Spread)
#: The policy rbees uses when the configuration names none.
DEFAULT_POLICY = LeastLoaded.name
