"""The pool registry of rbees-orcd, fed by heartbeats.

A pool is ``ready`` while heartbeats arrive, ``unavailable`` after 3 missed intervals and
``offline`` after 60 s of silence (``[orchestrator] heartbeat_grace``, ``offline_after_s``).
Slots are counted here too: the orchestrator knows which jobs it sent to which worker, so a
worker's free slots are its total minus those in flight, not the (up to one interval old)
number of the last heartbeat.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from rbees_core.api.pool import PoolHeartbeat
from rbees_core.placement import held_back
from rbees_core.scheduling import snapshot_pool

UNAVAILABLE_AFTER_MISSED = 3
OFFLINE_AFTER_S = 60.0
#: How long a pool's refusal of a worker for want of memory sizes its model there.
REFUSAL_S = 30.0


@attrs.frozen
class Refusal:
    """A pool's refusal of a worker for want of memory (:meth:`PoolRegistry.refused`)."""

    needed_bytes: int
    device: str | None
    free_bytes: int | None
    seq: int  # the pool's heartbeat when it refused
    until: float  # monotonic


@attrs.define(eq=False)
class PoolEntry:
    pool_id: str
    state: PoolHeartbeat
    registered_at: float
    last_heartbeat_at: float
    last_seen: float  # monotonic
    draining: bool = False
    #: worker id -> worker dict (from heartbeats, updated by the orchestrator's own polls)
    workers: dict[str, dict[str, Any]] = attrs.field(factory=dict)


class PoolRegistry:
    def __init__(self, *, heartbeat_interval_s: float = 5.0,
                 unavailable_after_missed: int = UNAVAILABLE_AFTER_MISSED,
                 offline_after_s: float = OFFLINE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = heartbeat_interval_s
        self.missed = unavailable_after_missed
        self.offline_after_s = offline_after_s
        self.clock = clock
        self.pools: dict[str, PoolEntry] = {}
        #: (pool_id, worker_id) -> jobs in flight there
        self.inflight: dict[tuple[str, str], int] = {}
        #: pool_id -> model -> a worker this orchestrator asked the pool for and may not
        #: have seen in a heartbeat yet (see :meth:`expect_worker`)
        self.expected: dict[str, dict[str, dict[str, Any]]] = {}
        #: (pool_id, worker_id) -> since when (epoch seconds) the worker has had no job,
        #: None when in use or unknown: the snapshot's ``idle_since`` (set by pool control)
        self.idle_since: Callable[[str, str], float | None] = lambda pool_id, worker_id: None
        #: ``[placement] ctx``: the context per slot models are sized for in snapshots
        self.worker_ctx: int | None = None
        #: pool_id -> (until, on the clock; why): the pool refused this orchestrator's
        #: credential, so nothing is placed there until then (:meth:`lock_out`)
        self.locked_out: dict[str, tuple[float, str]] = {}
        #: ``[placement] interactive_slots``: slots of each worker batch jobs leave free
        self.interactive_slots = 0
        #: (pool_id, model) -> the pool's last refusal of a worker of it for want of memory
        self.refusals: dict[tuple[str, str], Refusal] = {}

    def refused(self, pool_id: str, model: str, needed_bytes: int, *,
                device: str | None = None, free_bytes: int | None = None) -> None:
        """The pool refused a worker of ``model`` for want of memory (``INSUFFICIENT_RAM``
        / ``_VRAM``), saying it needs ``needed_bytes`` and ``device`` has ``free_bytes``:
        snapshots size the model there at least so for :data:`REFUSAL_S`, and show the
        device with no more than that available until the pool's next heartbeat, so that
        the next decision evicts, places it elsewhere or says why it waits, instead of
        asking for the same start again."""
        entry = self.pools.get(pool_id)
        self.refusals[(pool_id, model)] = Refusal(
            needed_bytes=int(needed_bytes), device=device, free_bytes=free_bytes,
            seq=entry.state.seq if entry is not None else 0, until=self.clock() + REFUSAL_S)

    def _sized(self, entry: PoolEntry, pool: dict[str, Any]) -> dict[str, Any]:
        """``pool`` (a snapshot's) with its refusals applied (:meth:`refused`)."""
        now = self.clock()
        for (where, model), refusal in list(self.refusals.items()):
            if refusal.until < now:
                self.refusals.pop((where, model), None)
                continue
            if where != entry.pool_id:
                continue
            for m in pool.get("models") or ():
                if isinstance(m, dict) and model in (m.get("id"), m.get("ref")) \
                        and refusal.needed_bytes > int(m.get("memory_bytes") or 0):
                    m["memory_bytes"] = refusal.needed_bytes
            if refusal.free_bytes is None or entry.state.seq != refusal.seq:
                continue  # a newer heartbeat tells the device's memory
            for d in pool.get("devices") or ():
                if d.get("device") == refusal.device:
                    reserved = int(d.get("memory_reserved_bytes") or 0)
                    d["memory_free_bytes"] = min(int(d.get("memory_free_bytes") or 0),
                                                 refusal.free_bytes + reserved)
        return pool

    def statuses(self) -> dict[str, str]:
        """Every pool's status now."""
        return {pool_id: self.status(entry) for pool_id, entry in self.pools.items()}

    def status(self, entry: PoolEntry) -> str:
        silent = self.clock() - entry.last_seen
        if silent > self.offline_after_s:
            return "offline"
        if silent > self.missed * self.interval:
            return "unavailable"
        return "ready"

    def heartbeat(self, beat: PoolHeartbeat) -> tuple[PoolEntry, bool]:
        """Record a heartbeat; returns the entry and whether the pool is new."""
        now_wall = time.time()
        entry = self.pools.get(beat.pool_id)
        new = entry is None
        if entry is None:
            entry = PoolEntry(pool_id=beat.pool_id, state=beat, registered_at=now_wall,
                              last_heartbeat_at=now_wall, last_seen=self.clock())
            self.pools[beat.pool_id] = entry
        elif beat.seq < entry.state.seq and beat.seq != 1:
            return entry, False  # late and out of order: keep the newer state
        entry.state = beat
        entry.last_heartbeat_at = now_wall
        entry.last_seen = self.clock()
        entry.workers = {w.worker_id: attrs.asdict(w) for w in beat.workers}
        return entry, new

    def remove(self, pool_id: str) -> bool:
        return self.pools.pop(pool_id, None) is not None

    def set_worker(self, pool_id: str, worker: dict[str, Any]) -> None:
        entry = self.pools.get(pool_id)
        if entry is not None:
            entry.workers[str(worker["worker_id"])] = worker

    def expect_worker(self, pool_id: str, model: str, worker: dict[str, Any]) -> None:
        """Show a worker being started on ``pool_id`` in every snapshot until
        :meth:`forget_expected`: a ``starting`` entry with its slots and the cores it will
        take (``threads``; None: every free one). Without it, a start decided between two
        heartbeats is invisible to the next decision: a policy started a second model on
        cores the first was given (the pool then made both share them)."""
        self.expected.setdefault(pool_id, {})[model] = worker

    def forget_expected(self, pool_id: str, model: str) -> None:
        """The start ended (ready, refused or failed): heartbeats tell from now on."""
        pending = self.expected.get(pool_id)
        if pending is not None:
            pending.pop(model, None)
            if not pending:
                self.expected.pop(pool_id, None)

    def _workers(self, entry: PoolEntry) -> list[dict[str, Any]]:
        """The pool's workers as this orchestrator knows them: its last heartbeat, updated
        by its own polls, and the starts it asked for that neither shows yet."""
        known = entry.workers
        pending = self.expected.get(entry.pool_id)
        if not pending:
            return list(known.values())
        return [*known.values(),
                *(w for w in pending.values() if w.get("worker_id") not in known)]

    def __iter__(self) -> Iterator[PoolEntry]:
        return iter(list(self.pools.values()))

    def lock_out(self, pool_id: str, why: str, hold_s: float) -> None:
        """The pool refused this orchestrator's credential (401/403 on a control call):
        snapshots show it ``unavailable``, with ``why`` as its ``reason``, for ``hold_s``
        seconds; its records (``GET /v2/pools``) say ``control_refused``."""
        self.locked_out[pool_id] = (self.clock() + hold_s, why)

    def refusing(self, pool_id: str) -> str | None:
        """Why nothing is placed on the pool now (:meth:`lock_out`), else None."""
        held = self.locked_out.get(pool_id)
        if held is None:
            return None
        if self.clock() >= held[0]:
            del self.locked_out[pool_id]
            return None
        return held[1]

    def free_slots(self, pool_id: str, worker: dict[str, Any], *, batch: bool = False) -> int:
        """The worker's slots no job of this orchestrator holds; for a ``batch`` job less
        those kept for interactive ones (:func:`rbees_core.placement.held_back`)."""
        total = int(worker.get("slots_total") or 0)
        free = total - self.inflight.get((pool_id, str(worker["worker_id"])), 0)
        if batch:
            free -= held_back(total, self.interactive_slots)
        return max(0, free)

    def take(self, pool_id: str, worker_id: str) -> None:
        key = (pool_id, worker_id)
        self.inflight[key] = self.inflight.get(key, 0) + 1

    def give_back(self, pool_id: str, worker_id: str) -> None:
        key = (pool_id, worker_id)
        left = self.inflight.get(key, 0) - 1
        if left > 0:
            self.inflight[key] = left
        else:
            self.inflight.pop(key, None)

    def record(self, entry: PoolEntry) -> dict[str, Any]:
        """The pool as ``GET /v2/pools/{id}`` shows it."""
        state = attrs.asdict(entry.state)
        state.pop("seq", None)
        state.pop("sent_at", None)
        state["workers"] = list(entry.workers.values())
        record = {**state, "status": self.status(entry), "draining": entry.draining,
                  "last_heartbeat_at": entry.last_heartbeat_at, "last_seq": entry.state.seq,
                  "registered_at": entry.registered_at}
        refused = self.refusing(entry.pool_id) if self.locked_out else None
        if refused is not None:
            record["control_refused"] = refused
        return record

    def snapshot_pools(self) -> list[dict[str, Any]]:
        """Pools in the shape of :mod:`rbees_core.scheduling`'s snapshot: each built by
        :func:`~rbees_core.scheduling.snapshot_pool` from its last heartbeat, with the
        workers as this orchestrator knows them and their free slots net of the jobs it
        sent there, models sized for ``[placement] ctx`` (:attr:`worker_ctx`) or as a pool's
        refusal said (:meth:`refused`). A draining pool is ``unavailable``, and so is one
        that refused this orchestrator's credential lately (:meth:`lock_out`)."""
        inflight = self.inflight
        out = []
        for entry in self:
            pool_id = entry.pool_id

            def in_flight(worker_id: str, pool_id: str = pool_id) -> int:
                return inflight.get((pool_id, worker_id), 0)

            def idle_since(worker_id: str, pool_id: str = pool_id) -> float | None:
                if inflight.get((pool_id, worker_id)):
                    return None  # in use
                return self.idle_since(pool_id, worker_id)

            refused = self.refusing(pool_id) if self.locked_out else None
            pool = snapshot_pool(
                entry.state, pool_id=pool_id, workers=self._workers(entry),
                status="unavailable" if entry.draining or refused else self.status(entry),
                in_flight=in_flight, idle_since=idle_since, ctx=self.worker_ctx)
            if refused is not None:
                pool["reason"] = refused
            out.append(self._sized(entry, pool) if self.refusals else pool)
        return out
