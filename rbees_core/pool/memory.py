"""A pool's memory: what it offers new workers on each device, and what a model will need.

One rule, used by the preflight of a worker start (:func:`rbees_core.pool.workers.preflight`)
and by the devices a pool reports (``/v2/state``, heartbeats), which the scheduler reads
(:func:`rbees_core.scheduling.device_available`): a device has
``memory_free_bytes - memory_reserved_bytes`` available for a new worker, where

- ``memory_free_bytes`` is the smaller of the device's live free memory (MemAvailable, NVML
  free), which already excludes what loaded workers hold, and the pool's capacity on it
  (its total, at most ``[pool] memory_limit``) less what its loaded workers hold (their
  reported memory): each worker counted once in each view, never twice. The second view
  covers what the first cannot see (llama.cpp maps a model's weights from its file: the
  kernel counts those pages as available cache) and the limit;
- ``memory_reserved_bytes`` is what workers still loading were promised (their estimate),
  which no live figure shows yet.

A worker fits when its estimate (:meth:`Estimates.estimate`) is at most that. Estimates
come from the backend's hook (:meth:`rbees_core.backend.Backend.estimate_memory`), cached by
file size and mtime; once a worker is ready, the memory it reports calibrates later
estimates for its model file on that device kind (:meth:`Estimates.measured`).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pluggy

from rbees_core import plugins
from rbees_core.api.pool import CpuEntry, GpuEntry
from rbees_core.backend import MemoryEstimate
from rbees_core.errors import ModelLoadError, RbeesError
from rbees_core.files import write_private

Device = TypeVar("Device", GpuEntry, CpuEntry)
#: the backend a scheduler's start decision gets (it names none): models are reported
#: sized for it
DEFAULT_BACKEND = "llamacpp"


@attrs.frozen
class Held:
    """What a pool's live workers on one device hold: loaded ones (``ready``, ``busy``,
    ``draining``...: their reported memory) and ones still loading (their estimate)."""

    loaded_bytes: int = 0
    starting_bytes: int = 0


@attrs.frozen
class Offer:
    """A device's memory as its pool reports it (see the module's rule)."""

    free_bytes: int
    reserved_bytes: int
    total_bytes: int

    @property
    def available_bytes(self) -> int:
        return max(0, self.free_bytes - self.reserved_bytes)


def offer(live_free: int, total: int, held: Held, limit: int | None = None) -> Offer:
    """The module's rule. ``live_free``/``total``: the device's own figures; ``limit``:
    ``[pool] memory_limit`` (None: none). ``total_bytes`` is the capacity the pool offers
    (the limit, when smaller than the device). Pure."""
    cap = min(total, limit) if limit is not None and total else (limit or total)
    free = max(0, min(live_free, cap - held.loaded_bytes))
    return Offer(free_bytes=free, reserved_bytes=held.starting_bytes, total_bytes=cap)


def held_on(device: str, workers: Iterable[tuple[str, str, int]]) -> Held:
    """:class:`Held` of ``device`` from ``(device, state, memory_bytes)`` of live workers:
    ``starting``/``loading`` ones are still loading, every other one is loaded."""
    loaded = starting = 0
    for where, state, memory in workers:
        if where != device:
            continue
        if state in ("starting", "loading"):
            starting += memory
        else:
            loaded += memory
    return Held(loaded_bytes=loaded, starting_bytes=starting)


class InsufficientMemoryError(RbeesError):
    code = "INSUFFICIENT_RAM"
    status = 409


class InsufficientVramError(InsufficientMemoryError):
    code = "INSUFFICIENT_VRAM"


def check_fits(pm: pluggy.PluginManager, model_ref: str, parts: dict[str, int], main: str,
               limit: int | None, held: Callable[[str], Held]) -> tuple[int | None, str]:
    """Refuse a start whose part on any device (``parts``: bytes per device, the whole
    model on ``main``, or a split's or partial offload's shares) exceeds what the pool
    offers there (:func:`offer` of ``held(device)`` under ``limit``): 409
    ``INSUFFICIENT_RAM``/``_VRAM`` naming the device. Returns ``main``'s live free memory
    and memory kind. The pool's worker preflight."""
    free, memory_kind = None, "ram"
    for device, need in sorted(parts.items(), key=lambda kv: kv[0] != main):
        free_here, total, kind_here = device_memory(pm, device)
        if device == main:
            free, memory_kind = free_here, kind_here
        if free_here is None:
            continue
        offered = offer(free_here, total or 0, held(device), limit)
        if need > offered.available_bytes:
            error = InsufficientMemoryError if kind_here == "ram" else InsufficientVramError
            capped = f" (of a {offered.total_bytes / 2**20:.0f} MiB limit)" \
                if limit is not None and offered.total_bytes == limit else ""
            raise error(
                f"{model_ref} needs about {need / 2**20:.0f} MiB on {device}; "
                f"{offered.available_bytes / 2**20:.0f} MiB is free{capped}",
                details={"needed_bytes": need, "free_bytes": offered.available_bytes,
                         "device": device})
    return free, memory_kind


def ram_total_bytes() -> int:
    """This host's RAM (psutil: the same figure on Linux, macOS and Windows)."""
    import psutil

    return int(psutil.virtual_memory().total)


def ram_free_bytes() -> int:
    """RAM a new process can have without swapping (psutil's ``available``: MemAvailable
    on Linux, free + inactive on macOS)."""
    import psutil

    return int(psutil.virtual_memory().available)


def device_memory(pm: pluggy.PluginManager, device: str
                  ) -> tuple[int | None, int | None, str]:
    """Live free memory, total memory and memory kind (ram, vram, unified) of ``device``;
    None for figures no probe reports."""
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return ram_free_bytes(), ram_total_bytes(), "ram"
    for cls in plugins.gpu_inventories(pm).values():
        for gpu in cls().collect():
            if isinstance(gpu, GpuEntry) and gpu.index == int(index or 0) and \
                    gpu.backend in (kind, "cuda" if kind == "cuda" else "metal"):
                memory_kind = "unified" if kind in ("metal", "mps") else "vram"
                return gpu.memory_free_bytes, gpu.memory_total_bytes, memory_kind
    return None, None, "unified" if kind in ("metal", "mps") else "vram"


def store_path() -> Path:
    """Where a pool keeps its measurements: ``$RBEES_HOME/memory.json``."""
    from rbees_core.config import rbees_home

    return rbees_home() / "memory.json"


def _key_kind(device: str) -> str:
    return device.partition(":")[0]


@attrs.frozen
class Measured:
    """What a ready worker of a model file held: its reported memory, for the slots and
    context it was started with."""

    memory_bytes: int
    slots: int
    ctx: int | None
    #: the file's size and mtime then: a measurement of another file is not used
    size: int = 0
    mtime_ns: int = 0


class Estimates:
    """Memory estimates of one pool, shared by its preflight and its model listing.

    Thread-safe (the preflight runs in a worker thread). A prediction is cached by (file,
    its size and mtime, backend, device kind, slots, context, embedding); a measurement by
    (file, backend, device kind, embedding), kept in ``store`` (JSON, when given:
    ``$RBEES_HOME/memory.json`` for pool-managerd and ``rbees-pool status``) so that a
    restarted pool still knows it.
    """

    def __init__(self, pm: pluggy.PluginManager, *, limit: int | None = None,
                 store: Path | None = None) -> None:
        self.pm = pm
        #: ``[pool] memory_limit`` in bytes (None: none)
        self.limit = limit
        self.store = store
        self._lock = threading.Lock()
        self._predicted: dict[tuple[Any, ...], MemoryEstimate] = {}
        self._measured: dict[tuple[str, str, str, bool], Measured] = self._load()

    @classmethod
    def for_pool(cls, pm: pluggy.PluginManager) -> Estimates:
        """The estimates of this home's pool: ``[pool] memory_limit``, measurements kept in
        :func:`store_path` (pool-managerd, ``rbees-pool status``)."""
        from rbees_core.config import load_config

        return cls(pm, limit=load_config().pool.memory_limit_bytes(), store=store_path())

    def _load(self) -> dict[tuple[str, str, str, bool], Measured]:
        """The measurements in :attr:`store` (none when it is missing or unreadable)."""
        try:
            rows = json.loads(self.store.read_text(encoding="utf-8")) if self.store else []
            return {(str(r["path"]), str(r["backend"]), str(r["kind"]), bool(r["embedding"])):
                    Measured(**r["measured"]) for r in rows}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _save(self) -> None:
        if self.store is None:
            return
        rows = [{"path": k[0], "backend": k[1], "kind": k[2], "embedding": k[3],
                 "measured": attrs.asdict(m)} for k, m in self._measured.items()]
        with contextlib.suppress(OSError):
            write_private(self.store, json.dumps(rows, indent=1) + "\n")

    def predict(self, path: str, *, backend: str, device: str, slots: int, ctx: int | None,
                embedding: bool = False) -> MemoryEstimate:
        """The backend's estimate (the size on disk plus overhead when it has none).
        Raises what the backend raises; anything else reading the file raised is
        :class:`ModelLoadError` (a corrupt header's counts can ask for any memory)."""
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise ModelLoadError(f"{path} cannot be read: {exc}",
                                 details={"path": path}) from exc
        key = (path, stat.st_size, stat.st_mtime_ns, backend, _key_kind(device), slots, ctx,
               embedding)
        with self._lock:
            cached = self._predicted.get(key)
        if cached is not None:
            return cached
        found = plugins.backends(self.pm)[backend]()
        mode = {"embedding": True} if embedding and type(found).embeds else {}
        try:
            estimate = found.estimate_memory(path, device=device, slots=slots, ctx=ctx,
                                             **mode)
        except RbeesError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{path} cannot be read as a model: {type(exc).__name__}: "
                                 f"{exc}", details={"path": path}) from exc
        estimate = estimate or MemoryEstimate.on_disk(path)
        with self._lock:
            self._predicted[key] = estimate
        return estimate

    def estimate(self, path: str, *, backend: str, device: str, slots: int,
                 ctx: int | None, embedding: bool = False) -> MemoryEstimate:
        """:meth:`predict`, calibrated by a measurement of the same file on the same device
        kind: the prediction's total moves by what the measurement differed from the
        prediction for the measured worker's slots and context (the same figure when they
        are the same), marked ``measured``."""
        predicted = self.predict(path, backend=backend, device=device, slots=slots, ctx=ctx,
                                 embedding=embedding)
        with self._lock:
            seen = self._measured.get((path, backend, _key_kind(device), embedding))
        stat = os.stat(path)
        if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            return predicted
        base = self.predict(path, backend=backend, device=device, slots=seen.slots,
                            ctx=seen.ctx, embedding=embedding)
        return calibrated(predicted, predicted.total_bytes + seen.memory_bytes
                          - base.total_bytes)

    def measured(self, path: str, *, backend: str, device: str, slots: int, ctx: int | None,
                 memory_bytes: int, embedding: bool = False) -> None:
        """Record what a ready worker reports holding (pool-managerd's ready callback)."""
        try:
            stat = os.stat(path)
        except OSError:
            return
        if memory_bytes <= 0:
            return
        with self._lock:
            self._measured[(path, backend, _key_kind(device), embedding)] = Measured(
                memory_bytes=memory_bytes, slots=slots, ctx=ctx, size=stat.st_size,
                mtime_ns=stat.st_mtime_ns)
            self._save()

    def offered(self, entry: Device, held: Held) -> Device:
        """A GPU or the CPU entry of the inventory as its pool reports it: its memory
        figures by :func:`offer` under :attr:`limit`."""
        if isinstance(entry, GpuEntry):
            o = offer(entry.memory_free_bytes, entry.memory_total_bytes, held, self.limit)
            return attrs.evolve(entry, memory_total_bytes=o.total_bytes,
                                memory_free_bytes=o.free_bytes,
                                memory_reserved_bytes=o.reserved_bytes)
        o = offer(entry.ram_free_bytes, entry.ram_total_bytes, held, self.limit)
        return attrs.evolve(entry, ram_total_bytes=o.total_bytes, ram_free_bytes=o.free_bytes,
                            ram_reserved_bytes=o.reserved_bytes)

    def ready(self, record: Any) -> None:
        """Record what a worker that just got ready reports holding (its
        :class:`rbees_core.pool.workers.WorkerRecord`: pool-managerd's ready callback). A
        sharded worker's figure is its share of the model: it calibrates nothing."""
        if getattr(record, "sharded", False):
            return
        self.measured(record.model_path, backend=record.backend, device=record.device,
                      slots=record.slots_total, ctx=record.ctx,
                      memory_bytes=record.memory_bytes, embedding=record.embedding)

    def sized(self, model: dict[str, Any]) -> dict[str, Any]:
        """A model of the pool's listing (``/v2/state``) with ``memory``
        (:meth:`for_listing`) and its ``memory_bytes``, when known."""
        path = model.get("path")
        estimate = self.for_listing(str(path)) if path else None
        if estimate is not None:
            model.update(memory=estimate, memory_bytes=estimate["total_bytes"])
        return model

    def for_listing(self, path: str) -> dict[str, Any] | None:
        """What a pool's model listing says a model needs (``models[].memory``): the
        estimate of one :data:`DEFAULT_BACKEND` worker of one slot and the backend's
        default context on the CPU, calibrated; None when the backend is not installed or
        the file cannot be read (the listing then has only its size)."""
        if DEFAULT_BACKEND not in plugins.backends(self.pm) or not Path(path).exists():
            return None
        try:
            return self.estimate(path, backend=DEFAULT_BACKEND, device="cpu", slots=1,
                                 ctx=None).to_dict()
        except RbeesError:
            return None


def calibrated(estimate: MemoryEstimate, total: int) -> MemoryEstimate:
    """``estimate`` with its total moved to ``total`` (the overhead takes the difference,
    then the KV cache, then the weights, none below 0), marked ``measured``."""
    total = max(0, total)
    weights, kv = estimate.weights_bytes, estimate.kv_cache_bytes
    if total >= weights + kv:
        return attrs.evolve(estimate, overhead_bytes=total - weights - kv, measured=True)
    if total >= weights:
        return attrs.evolve(estimate, kv_cache_bytes=total - weights, overhead_bytes=0,
                            measured=True)
    return attrs.evolve(estimate, weights_bytes=total, kv_cache_bytes=0, overhead_bytes=0,
                        measured=True)
