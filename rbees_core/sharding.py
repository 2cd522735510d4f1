"""Shard planning: a model no single device holds, split by layer over devices of several
pools through llama.cpp's RPC backend (issue 27). Pure: plain data in, plain data out.

:func:`plan_shard` first asks the placement planner (:func:`rbees_core.planning.plan`) for
what one host can do: the model whole on one device, split across the GPUs of one host, or
part on a GPU and the rest in RAM. Only when that finds nothing (not even after stopping idle
workers) does it plan a shard over devices of several pools, the worker on the first part
(its host's device, holding the layers that do not repeat too) and an RPC server on each of
the others:

1. the fewest devices that hold the model together;
2. of those, the fewest pools (devices on one host first);
3. then the best measured link between the worker's pool and the others (the lowest round
   trip time; a pair with no measurement counts as the slowest);
4. then the most memory left over.

A pool lends its devices only when it says so (``[pool] rpc = true``, its ``rpc`` in the
snapshot: the ``lenders`` here); the worker's own pool needs no such setting. Layers are
given in proportion to each device's available memory, after the first part's rest (the
compute buffers of the model's estimate included) and each other part's compute buffers
(:data:`rbees_core.planning.GPU_OVERHEAD_BYTES`); the plan's
``tensor_split`` is what rbees-workerd ``--tensor-split`` takes with ``--rpc``: the worker's
own device first. Nothing fits even with every worker stopped: :class:`NoFit` with
``never`` (``NO_CAPACITY``), its reason in words, as the placement planner's.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import attrs

from rbees_core.planning import (
    GPU_OVERHEAD_BYTES,
    DeviceMemory,
    Host,
    ModelNeed,
    NoFit,
    Plan,
    plan,
)

#: the most devices one shard spans (llama.cpp's GGML_RPC_MAX_SERVERS is 16)
MAX_PARTS = 8
#: the round trip time assumed for a pair of pools with no measurement
UNKNOWN_RTT_MS = 1e9


@attrs.frozen
class ShardPart:
    """One device of a shard: ``layers`` repeating layers of the model (the first part also
    the rest of it) in ``bytes``; ``share`` its share for ``--tensor-split``."""

    pool_id: str
    device: str
    layers: int
    bytes: int
    share: float


@attrs.frozen
class ShardPlan:
    """A worker on ``parts[0]`` with an RPC server on each other part; ``reason`` why it is
    sharded, ``rtt_ms`` the slowest measured link from its pool to another (None: one
    pool, or not measured)."""

    parts: tuple[ShardPart, ...]
    layers: int
    reason: str
    rtt_ms: float | None = None
    kind: str = "shard"

    @property
    def pool_id(self) -> str:
        return self.parts[0].pool_id

    @property
    def device(self) -> str:
        return self.parts[0].device

    @property
    def tensor_split(self) -> tuple[float, ...]:
        """rbees-workerd ``--tensor-split`` with ``--rpc``: its own device's share first."""
        return tuple(p.share for p in self.parts)

    @property
    def remote(self) -> tuple[ShardPart, ...]:
        """The parts an RPC server holds (every one but the worker's)."""
        return self.parts[1:]

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.pool_id for p in self.parts))

    def describe(self) -> str:
        """``shard over mac/cpu 15 layers 0.2 GiB, workstation/cpu 15 layers 0.2 GiB``,
        the reason after a colon: what ``why`` and a decision show."""
        parts = ", ".join(f"{p.pool_id}/{p.device} {p.layers} layers {_gib(p.bytes)}"
                          for p in self.parts)
        link = f" (link {self.rtt_ms:.1f} ms)" if self.rtt_ms is not None else ""
        return f"shard over {parts}{link}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """The plan as a decision carries it."""
        return {"kind": self.kind, "reason": self.reason, "rtt_ms": self.rtt_ms,
                "tensor_split": list(self.tensor_split),
                "parts": [attrs.asdict(p) for p in self.parts]}


def local_bytes(need: ModelNeed, tensor_split: Sequence[float] | None) -> int:
    """What a sharded worker (rbees-workerd ``--rpc``) holds on its own device: the layers
    of its share (``tensor_split[0]``) and the rest of the model; the whole model when no
    split is given (its shares then follow the devices' free memory, unknown before it
    loads) or the model's shape is unknown. Its pool's preflight of the start."""
    if not tensor_split or not need.layered or sum(tensor_split) <= 0:
        return need.total_bytes
    share = tensor_split[0] / sum(tensor_split)
    return need.rest_bytes + int(need.layers * share) * need.layer_bytes


def _gib(n: float) -> str:
    return f"{n / 1024 ** 3:.1f} GiB"


def _rtt(links: Mapping[frozenset[str], float], a: str, b: str) -> float:
    return 0.0 if a == b else float(links.get(frozenset((a, b)), UNKNOWN_RTT_MS))


def split_layers(need: ModelNeed, room: list[int]) -> tuple[int, ...] | None:
    """The repeating layers each device takes, in proportion to ``room`` (what each can
    give to layers), at most what fits in each; None when they do not all fit."""
    if not need.layered or any(r < 0 for r in room) or sum(room) <= 0:
        return None
    fits = [r // need.layer_bytes for r in room]
    if sum(fits) < need.layers:
        return None
    total = sum(room)
    layers = [min(f, need.layers * r // total) for f, r in zip(fits, room, strict=True)]
    for i in sorted(range(len(room)), key=lambda i: -room[i]):  # the rounding's remainder
        while sum(layers) < need.layers and layers[i] < fits[i]:
            layers[i] += 1
    return tuple(layers) if sum(layers) == need.layers and all(layers) else None


def shard_over(need: ModelNeed, parts: list[tuple[str, DeviceMemory]], reason: str,
               links: Mapping[frozenset[str], float]) -> ShardPlan | None:
    """The model over ``parts`` (``(pool_id, device)``; the first runs the worker and
    holds the rest of the model), or None when it does not fit them."""
    # the worker's part: the rest of the model (its estimate's compute buffers included);
    # each RPC server's: its layers and compute buffers of its own
    room = [d.available - (need.rest_bytes if i == 0 else GPU_OVERHEAD_BYTES)
            for i, (_, d) in enumerate(parts)]
    layers = split_layers(need, room)
    if layers is None:
        return None
    out = []
    for i, ((pool, d), k) in enumerate(zip(parts, layers, strict=True)):
        used = k * need.layer_bytes + (need.rest_bytes if i == 0 else GPU_OVERHEAD_BYTES)
        out.append(ShardPart(pool, d.device, k, used, round(k / need.layers, 4)))
    main = parts[0][0]
    others = {p for p, _ in parts if p != main}
    rtt = max((_rtt(links, main, p) for p in others), default=None)
    return ShardPlan(tuple(out), need.layers, reason,
                     rtt_ms=rtt if rtt is not None and rtt < UNKNOWN_RTT_MS else None)


def _key(s: ShardPlan, free: int) -> tuple[Any, ...]:
    rtt = s.rtt_ms if s.rtt_ms is not None else (UNKNOWN_RTT_MS if len(s.pools) > 1 else 0)
    return (len(s.parts), len(s.pools), rtt, -free, s.pool_id, s.device)


def plan_shard(need: ModelNeed, hosts: Iterable[Host], *,
               lenders: Collection[str] | None = None,
               links: Mapping[frozenset[str], float] | None = None,
               sharding: bool = True) -> Plan | ShardPlan | NoFit:
    """The placement of a new worker: the placement planner's when one host can take the
    model (a :class:`rbees_core.planning.Plan`: whole, ``split``, ``partial``, or after
    stopping idle workers), else a :class:`ShardPlan` by the module's order, else a
    :class:`NoFit`. ``lenders``: the pools that lend devices over RPC (None: all);
    ``links``: measured round trip times (ms) by pair of pool ids; ``sharding`` False: no
    shard is planned (the placement planner's answer as it is)."""
    hosts = list(hosts)
    single = plan(need, hosts)
    if isinstance(single, Plan) or not sharding or not need.layered:
        return single
    links = links or {}
    devices = [(h.pool_id, d) for h in hosts for d in h.devices if d.available > 0]
    reason = (f"it needs {_gib(need.total_bytes)} and no single device holds it, "
              "even after stopping idle workers")
    best: tuple[tuple[Any, ...], ShardPlan] | None = None
    for n in range(2, min(MAX_PARTS, len(devices)) + 1):
        for combo in itertools.combinations(devices, n):
            for main in combo:  # the worker's part first; the others must be lent
                rest = [c for c in combo if c is not main]
                if lenders is not None and any(p != main[0] and p not in lenders
                                               for p, _ in rest):
                    continue
                s = shard_over(need, [main, *rest], reason, links)
                if s is not None:
                    free = sum(d.available for _, d in combo) - need.total_bytes
                    key = _key(s, free)
                    if best is None or key < best[0]:
                        best = (key, s)
        if best is not None:  # the fewest devices win before anything else
            return best[1]
    return _no_fit(need, hosts, single, lenders)


def _no_fit(need: ModelNeed, hosts: list[Host], single: NoFit,
            lenders: Collection[str] | None) -> NoFit:
    """The placement planner's :class:`NoFit` unless it was ``never``; then ``never`` only
    when not even every device of every lending pool, with every worker stopped, would hold
    the model together."""
    if not single.never:
        return single
    empty = [(h.pool_id, d.total_bytes) for h in hosts for d in h.devices]
    for i, (main, total) in enumerate(empty):
        lent = sorted((t for j, (p, t) in enumerate(empty) if j != i
                       and (lenders is None or p == main or p in lenders)),
                      reverse=True)[:MAX_PARTS - 1]
        room = [total - need.rest_bytes, *(t - GPU_OVERHEAD_BYTES for t in lent)]
        if lent and sum(max(0, r) // need.layer_bytes for r in room) >= need.layers:
            return NoFit(f"it needs {_gib(need.total_bytes)}; devices of several pools hold "
                         "it together only once workers on them stop: it waits for memory")
    return NoFit(f"it needs {_gib(need.total_bytes)}, more than every device of the pools "
                 "that lend theirs holds together, even with every worker stopped",
                 never=True)


__all__ = ["MAX_PARTS", "ShardPart", "ShardPlan", "local_bytes", "plan_shard", "shard_over",
           "split_layers"]
