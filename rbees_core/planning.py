"""Placement planning: where a new worker's model goes, given each device's memory (pure).

A model either fits one device whole, or it does not. When it does not fit one GPU, the
planner offers what llama.cpp can do instead, in the order a policy prefers
(:data:`DEFAULT_PREFER`):

- ``split``: across the GPUs of one host (llama.cpp's ``tensor_split``), in proportion to
  the memory each has available; the worker starts on the one with the most (its main GPU,
  which also holds the layers that do not repeat);
- ``partial``: the number of its repeating layers that fit on one GPU (``n_gpu_layers``),
  the rest in the host's RAM;
- ``cpu``: the whole model in RAM.

Split and partial offload need the model's shape (:class:`ModelNeed`: its repeating layers
and the bytes of each); a model sized by its file alone fits whole or not at all. When no
device can take the model now, :func:`evict_for` frees one: idle workers of other models
there are stopped least recently used first, never one with a job.

Accounting: a device's available memory is its live free memory (which already leaves out
what loaded workers hold) less what is promised to workers still loading
(:attr:`DeviceMemory.pending_bytes`); the workers on it are never subtracted again. Each
worker (:class:`Resident`, by id) is counted once: stopping it gives back its memory once,
however often a snapshot lists it.

Called by the built-in policies (:mod:`rbees_scheduler_builtin.analysis`, through
:func:`host_of` and :func:`need_of` over a snapshot's pools), by
:mod:`rbees_core.feasibility` (:func:`could_ever_fit`: ``NO_CAPACITY``) and by
:func:`rbees_core.replay.apply_verdict` (:func:`uses`). Everything here is plain data in,
plain data out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import attrs

Kind = Literal["gpu", "split", "partial", "cpu"]
#: Where a model that no GPU holds whole goes, in the built-in policies' default order.
DEFAULT_PREFER: tuple[Kind, ...] = ("split", "partial", "cpu")
#: Compute buffers a GPU holds besides its layers when it holds only part of a model.
GPU_OVERHEAD_BYTES = 128 * 1024 ** 2
#: GPUs whose memory is the host's RAM (Apple silicon): nothing is gained by putting part
#: of a model in RAM or on another such GPU, so they hold a model whole or not at all.
UNIFIED_KINDS = frozenset({"metal", "mps"})
#: Worker states whose memory is on its way back (a stop was asked for).
FREEING_STATES = frozenset({"stopping", "draining"})
#: Worker states that can be stopped for memory when every slot is free.
IDLE_STATES = frozenset({"ready", "busy"})


def _gib(n: float) -> str:
    return f"{n / 1024 ** 3:.1f} GiB"


@attrs.frozen
class ModelNeed:
    """What a model needs: ``total_bytes`` whole on one device; of that, ``layers``
    repeating layers of ``layer_bytes`` each (weights and their KV cache), the rest
    (:attr:`rest_bytes`: embeddings, output, compute buffers) apart. ``layers`` 0: the shape
    is unknown, the model cannot be split or partly offloaded."""

    total_bytes: int
    layers: int = 0
    layer_bytes: int = 0

    @classmethod
    def of(cls, estimate: Any) -> ModelNeed:
        """A :class:`rbees_core.backend.MemoryEstimate` as a need: its total, its
        ``layers`` of ``layer_bytes`` (weights and KV cache) each. For a pool's preflight of
        a start with ``n_gpu_layers``/``tensor_split``: :func:`device_bytes` of it."""
        layers = int(getattr(estimate, "layers", 0) or 0)
        layer = int(getattr(estimate, "layer_bytes", 0) or 0)
        total = int(estimate.total_bytes)
        return cls(total, layers, layer) if 0 < layers * layer <= total else cls(total)

    @property
    def rest_bytes(self) -> int:
        return max(0, self.total_bytes - self.layers * self.layer_bytes)

    @property
    def layered(self) -> bool:
        return self.layers > 0 and self.layer_bytes > 0 and self.total_bytes > 0


@attrs.frozen
class DeviceMemory:
    """One device: ``free_bytes`` live (what loaded workers hold is already out of it),
    ``pending_bytes`` promised to workers still loading."""

    device: str
    total_bytes: int
    free_bytes: int
    pending_bytes: int = 0

    @property
    def gpu(self) -> bool:
        return self.device.split(":", 1)[0] != "cpu"

    @property
    def available(self) -> int:
        return max(0, self.free_bytes - self.pending_bytes)

    @property
    def offloads(self) -> bool:
        """Whether part of a model can go here (a GPU with memory of its own)."""
        return self.gpu and self.device.split(":", 1)[0] not in UNIFIED_KINDS


@attrs.frozen
class Resident:
    """A worker on a device: ``memory_bytes`` it holds; ``idle`` (no job, may be stopped);
    ``idle_since`` its last use (None: unknown, the least recent); ``freeing`` (being
    stopped: its memory is coming back); ``keep`` (never stopped: the job's own model)."""

    worker_id: str
    device: str
    memory_bytes: int
    idle: bool = False
    idle_since: float | None = None
    freeing: bool = False
    keep: bool = False
    model_ref: str | None = None


@attrs.frozen
class Host:
    """A pool: its devices and the workers on them (each once, by id)."""

    pool_id: str
    devices: tuple[DeviceMemory, ...]
    residents: tuple[Resident, ...] = ()

    def device(self, name: str) -> DeviceMemory | None:
        return next((d for d in self.devices if d.device == name), None)


@attrs.frozen
class Plan:
    """Where a new worker goes. ``device`` is the one it is started on (a split's main
    GPU); ``n_gpu_layers`` the repeating layers on it (None: all, or none on the CPU);
    ``tensor_split`` the share of each of ``split_devices``; ``evict`` the workers to stop
    first (least recently used first); ``uses`` the bytes it takes on each device."""

    kind: Kind
    pool_id: str
    device: str
    layers: int = 0
    n_gpu_layers: int | None = None
    tensor_split: tuple[float, ...] | None = None
    split_devices: tuple[str, ...] = ()
    evict: tuple[str, ...] = ()
    uses: tuple[tuple[str, int], ...] = ()

    def split_by_index(self) -> tuple[float, ...] | None:
        """:attr:`tensor_split` as llama.cpp takes it: one share per GPU index, 0 for a GPU
        of the host the split leaves out."""
        if not self.tensor_split:
            return None
        index = [int(d.split(":", 1)[1]) if ":" in d else 0 for d in self.split_devices]
        out = [0.0] * (max(index) + 1)
        for i, share in zip(index, self.tensor_split, strict=True):
            out[i] = share
        return tuple(out)

    def describe(self) -> str:
        """``12 of 32 layers on cuda:0, rest on CPU`` / ``split cuda:0 0.67, cuda:1 0.33``;
        empty for a whole model on one device."""
        if self.kind == "partial":
            return f"{self.n_gpu_layers} of {self.layers} layers on {self.device}, rest on CPU"
        if self.kind == "split" and self.tensor_split:
            return "split " + ", ".join(f"{d} {s:.2f}" for d, s in
                                        zip(self.split_devices, self.tensor_split, strict=True))
        return ""


@attrs.frozen
class NoFit:
    """No device can take the model now. ``never``: none could even with every worker
    stopped (``NO_CAPACITY``); ``reason`` says why, in words."""

    reason: str
    never: bool = False


# -- planning ------------------------------------------------------------------------------

def _whole(need: ModelNeed, host: Host, d: DeviceMemory) -> Plan:
    return Plan("gpu" if d.gpu else "cpu", host.pool_id, d.device, layers=need.layers,
                uses=((d.device, need.total_bytes),))


def _ram(host: Host) -> DeviceMemory | None:
    return next((d for d in host.devices if not d.gpu), None)


def _partial(need: ModelNeed, host: Host, d: DeviceMemory) -> Plan | None:
    """The most layers that fit on GPU ``d``, the rest in the host's RAM (when it reports
    it, it must fit there)."""
    if not need.layered or not d.offloads:
        return None
    k = min(need.layers, (d.available - GPU_OVERHEAD_BYTES) // need.layer_bytes)
    if k < 1:
        return None
    on_gpu = k * need.layer_bytes + GPU_OVERHEAD_BYTES
    rest = need.total_bytes - k * need.layer_bytes
    ram = _ram(host)
    if ram is not None and ram.available < rest:
        return None
    uses = ((d.device, on_gpu),) + (((ram.device, rest),) if ram is not None else ())
    return Plan("partial", host.pool_id, d.device, layers=need.layers, n_gpu_layers=int(k),
                uses=uses)


def _split(need: ModelNeed, host: Host) -> Plan | None:
    """The model across the host's GPUs of one kind, in proportion to their available
    memory (the main GPU, the one with the most, also holds the rest); None when one of
    them would not hold its share."""
    if not need.layered:
        return None
    kinds: dict[str, list[DeviceMemory]] = {}
    for d in host.devices:
        if d.offloads and d.available > GPU_OVERHEAD_BYTES:
            kinds.setdefault(d.device.split(":", 1)[0], []).append(d)
    best: Plan | None = None
    for gpus in kinds.values():
        if len(gpus) < 2:
            continue
        main = max(gpus, key=lambda g: (g.available, -gpus.index(g)))
        total = sum(g.available for g in gpus)
        shares = tuple(round(g.available / total, 3) for g in gpus)
        split = Plan("split", host.pool_id, main.device, layers=need.layers,
                     tensor_split=shares, split_devices=tuple(g.device for g in gpus))
        # the bytes of each as the worker's flags give them (the shares as rounded)
        uses = device_bytes(need, main.device, None, split.split_by_index())
        if any(uses.get(g.device, 0) > g.available for g in gpus):
            continue
        split = attrs.evolve(split, uses=tuple((g.device, uses.get(g.device, 0)) for g in gpus))
        if best is None or len(gpus) < len(best.split_devices):
            best = split
    return best


def device_bytes(need: ModelNeed, device: str, n_gpu_layers: int | None = None,
                 tensor_split: Sequence[float] | None = None) -> dict[str, int]:
    """The bytes a worker started on ``device`` with ``n_gpu_layers``/``tensor_split`` (a
    start decision's, rbees-workerd's flags) takes on each device: the whole model on
    ``device``; or k layers and the compute buffers on it and the rest on ``cpu``; or each
    GPU of the split its share of the layers, the main one (``device``) the rest too. A
    model of unknown shape counts whole on ``device``. The figures :class:`Plan.uses`
    holds, for whoever only has the flags (a pool's preflight, a replayed decision)."""
    kind = device.split(":", 1)[0]
    if kind == "cpu" or not need.layered or (n_gpu_layers is None and not tensor_split):
        return {device: need.total_bytes}
    body = need.layers * need.layer_bytes
    if tensor_split:
        total = sum(tensor_split) or 1.0
        out = {f"{kind}:{i}": int(share / total * body) + GPU_OVERHEAD_BYTES
               for i, share in enumerate(tensor_split) if share > 0}
        out[device] = out.get(device, GPU_OVERHEAD_BYTES) - GPU_OVERHEAD_BYTES \
            + need.rest_bytes
        return out
    k = max(0, min(int(n_gpu_layers or 0), need.layers))
    return {device: k * need.layer_bytes + GPU_OVERHEAD_BYTES,
            "cpu": need.total_bytes - k * need.layer_bytes}


def rank(plan: Plan | None, prefer: Sequence[Kind] = DEFAULT_PREFER) -> int:
    """A plan's place in the policy's order: a whole GPU 0, then ``prefer``'s order (a
    whole model on the CPU is ``cpu``); None (no plan) last."""
    if plan is None:
        return len(prefer) + 2
    if plan.kind == "gpu":
        return 0
    return 1 + (list(prefer).index(plan.kind) if plan.kind in prefer else len(prefer))


def host_plans(need: ModelNeed, host: Host, prefer: Sequence[Kind] = DEFAULT_PREFER
               ) -> dict[str, Plan]:
    """The best way to start the model on each device of ``host`` without stopping any
    worker: whole where it fits; on a GPU where it does not, a split (on its main GPU) or
    the layers that fit (``partial``), whichever ``prefer`` puts first. Devices that can
    take it in no way are left out."""
    out: dict[str, Plan] = {}
    split: Plan | None = None
    split_done = False
    for d in host.devices:
        if need.total_bytes <= d.available:
            out[d.device] = _whole(need, host, d)
            continue
        if not d.gpu:
            continue
        options = []
        if "partial" in prefer:
            options.append(_partial(need, host, d))
        if "split" in prefer:
            if not split_done:
                split, split_done = _split(need, host), True
            if split is not None and split.device == d.device:
                options.append(split)
        found = [p for p in options if p is not None]
        if found:
            out[d.device] = min(found, key=lambda p: rank(p, prefer))
    return out


def evict_for(need: ModelNeed, host: Host, device: str) -> Plan | None:
    """The workers to stop so that the model fits ``device`` whole: idle ones of other
    models there (never :attr:`Resident.keep`, never one with a job), least recently used
    first, as few as fit. Workers being stopped there count as freeing: when they are
    enough, the plan stops nothing (``evict`` empty: wait for them). None when stopping
    every idle worker would not do, or the model is larger than the device."""
    d = host.device(device)
    if d is None or need.total_bytes > d.total_bytes > 0:
        return None
    have = d.available
    idle: list[Resident] = []
    seen: set[str] = set()
    for r in host.residents:
        if r.device != device or r.worker_id in seen:
            continue
        seen.add(r.worker_id)  # each worker once, however often it is listed
        if r.freeing:
            have += r.memory_bytes
        elif r.idle and not r.keep:
            idle.append(r)
    chosen: list[str] = []
    for r in sorted(idle, key=lambda r: (r.idle_since if r.idle_since is not None else 0.0,
                                         r.worker_id)):
        if have >= need.total_bytes:
            break
        chosen.append(r.worker_id)
        have += r.memory_bytes
    if have < need.total_bytes:
        return None
    return attrs.evolve(_whole(need, host, d), evict=tuple(chosen))


def could_ever_fit(need: ModelNeed, host: Host) -> bool:
    """Whether the model could run on ``host`` with every worker stopped: whole on one
    device, split across its GPUs of one kind, or part on a GPU and the rest in RAM."""
    if need.total_bytes <= 0:
        return True
    empty = Host(host.pool_id, tuple(attrs.evolve(d, free_bytes=d.total_bytes, pending_bytes=0)
                                     for d in host.devices))
    return bool(host_plans(need, empty, ("split", "partial", "cpu")))


def plan(need: ModelNeed, hosts: Iterable[Host], prefer: Sequence[Kind] = DEFAULT_PREFER
         ) -> Plan | NoFit:
    """The placement of a new worker across ``hosts``: a plan that stops nothing if there
    is one (``prefer``'s order, a whole GPU first; then the most available memory, pool and
    device), else the one that stops the fewest idle workers (GPUs first), else
    :class:`NoFit` (``never`` when no host could ever hold it). The policies rank devices
    their own way over :func:`host_plans` and :func:`evict_for`; this is their common
    order, for callers without one."""
    hosts = list(hosts)
    best: tuple[tuple[Any, ...], Plan] | None = None
    for host in hosts:
        for p in host_plans(need, host, prefer).values():
            d = host.device(p.device)
            key = (rank(p, prefer), -(d.available if d else 0), host.pool_id, p.device)
            if best is None or key < best[0]:
                best = (key, p)
    if best is not None:
        return best[1]
    for host in hosts:
        for d in host.devices:
            freed = evict_for(need, host, d.device)
            if freed is not None:
                key = (len(freed.evict), not d.gpu, host.pool_id, d.device)
                if best is None or key < best[0]:
                    best = (key, freed)
    if best is not None:
        return best[1]
    if not hosts:
        return NoFit("no pool can take it", never=True)
    never = not any(could_ever_fit(need, h) for h in hosts)
    largest = max((d.total_bytes for h in hosts for d in h.devices), default=0)
    if never:
        return NoFit(f"it needs {_gib(need.total_bytes)}, more than any device (the largest: "
                     f"{_gib(largest)}), split or offloaded, even with every worker stopped",
                     never=True)
    return NoFit(f"it needs {_gib(need.total_bytes)}, and no device has that free, even after "
                 "stopping idle workers; it waits for memory")


# -- reading a scheduling snapshot (rbees_core.scheduling) ----------------------------------

def _positive(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and value > 0 else 0


def need_of(job: dict[str, Any], entry: Any, total: int) -> ModelNeed:
    """The job's model as a :class:`ModelNeed` of ``total`` bytes (the caller's
    :func:`rbees_core.scheduling.memory_needed`), with its shape from the snapshot's
    ``job.memory_layers``/``job.memory_layer_bytes``, else from the pool's model ``entry``
    (:func:`rbees_core.scheduling.model_entry`): its ``layers``/``layer_bytes``, or its
    ``memory`` estimate (:class:`rbees_core.backend.MemoryEstimate` as a dict: ``layers``
    of ``layer_weights_bytes`` each, and the KV cache in ``total`` beyond the estimate's
    weights and overhead, shared by the layers). A shape larger than ``total`` is dropped
    (the model is sized whole)."""
    layers, layer_bytes = _positive(job.get("memory_layers")), \
        _positive(job.get("memory_layer_bytes"))
    if not (layers and layer_bytes) and isinstance(entry, dict):
        layers, layer_bytes = _positive(entry.get("layers")), _positive(entry.get("layer_bytes"))
        memory = entry.get("memory")
        if not (layers and layer_bytes) and isinstance(memory, dict):
            # the estimate is for its own slots and context; ``total`` for the worker's
            # (rescaled): what ``total`` holds beyond weights and overhead is KV cache,
            # one share of it per layer
            layers = _positive(memory.get("layers"))
            kv = max(0, total - _positive(memory.get("weights_bytes"))
                     - _positive(memory.get("overhead_bytes")))
            layer_bytes = _positive(memory.get("layer_weights_bytes")) \
                + (kv // layers if layers else 0)
    if not (layers and layer_bytes) or layers * layer_bytes > total:
        layers = layer_bytes = 0
    return ModelNeed(int(total), layers, layer_bytes)


def as_shares(value: Any) -> tuple[float, ...] | None:
    """A ``tensor_split`` as a tuple of floats (a decision's, read back from JSON)."""
    return None if value is None else tuple(float(v) for v in value)


def parse_shares(text: str, name: str = "--tensor-split") -> tuple[float, ...]:
    """``0.667,0.333`` -> ``(0.667, 0.333)``: rbees-workerd's ``--tensor-split``. Raises
    :class:`rbees_core.errors.InvalidParamsError` naming ``name`` for anything but comma
    separated non-negative numbers with a positive sum, at most 16."""
    from rbees_core.errors import InvalidParamsError

    try:
        shares = tuple(float(part) for part in text.split(","))
    except ValueError:
        shares = ()
    if not shares or len(shares) > 16 or any(not s >= 0 for s in shares) or sum(shares) <= 0:
        raise InvalidParamsError(name, "must be comma separated shares of each GPU, by index "
                                       "(0.67,0.33)")
    return shares


def describe_offload(device: str, n_gpu_layers: int | None,
                     tensor_split: Sequence[float] | None) -> str:
    """A start decision's offload in words: ``12 layers on cuda:0, rest on CPU``, ``split
    cuda:0 0.67, cuda:1 0.33`` (``tensor_split`` by GPU index); empty for neither."""
    kind = device.split(":", 1)[0]
    if tensor_split:
        return "split " + ", ".join(f"{kind}:{i} {s:.2f}" for i, s in enumerate(tensor_split)
                                    if s > 0)
    if n_gpu_layers is not None and kind != "cpu":
        return f"{n_gpu_layers} layers on {device}, rest on CPU"
    return ""


def host_of(pool: dict[str, Any], *, keep: Any = None,
            sizes: Any = None) -> Host:
    """A snapshot pool as a :class:`Host`: its devices (``memory_free_bytes``, pending
    ``memory_reserved_bytes``) and workers, each once. ``keep(worker)`` tells a worker
    never to stop (the job's own model); ``sizes(worker)`` its memory when it reports
    none (default 0)."""
    devices = tuple(DeviceMemory(str(d.get("device") or "cpu"),
                                 int(d.get("memory_total_bytes") or 0),
                                 int(d.get("memory_free_bytes") or 0),
                                 int(d.get("memory_reserved_bytes") or 0))
                    for d in pool.get("devices") or ())
    residents: dict[str, Resident] = {}
    for w in pool.get("workers") or ():
        wid = str(w.get("worker_id"))
        if wid in residents:
            continue
        state = w.get("state")
        held = _positive(w.get("memory_bytes")) or (int(sizes(w)) if sizes else 0)
        since = w.get("idle_since")
        residents[wid] = Resident(
            wid, str(w.get("device") or "cpu"), held,
            idle=state in IDLE_STATES and not w.get("expected")
            and (w.get("slots_free") or 0) >= (w.get("slots_total") or 0),
            idle_since=float(since) if isinstance(since, int | float) else None,
            freeing=state in FREEING_STATES, keep=bool(keep(w)) if keep else False,
            model_ref=w.get("model_ref"))
    return Host(str(pool.get("pool_id")), devices, tuple(residents.values()))


__all__ = ["DEFAULT_PREFER", "DeviceMemory", "Host", "ModelNeed", "NoFit", "Plan", "Resident",
           "as_shares", "could_ever_fit", "describe_offload", "device_bytes", "evict_for",
           "host_of", "host_plans", "need_of", "plan", "rank"]
