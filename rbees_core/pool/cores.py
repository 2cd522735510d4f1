"""CPU cores as a pool resource: the thread count and CPU set (affinity) of each worker.

A pool hands out its cores (the ones this process may run on) like memory: a CPU worker gets
the cores it asks for (``threads``; default every free one) from those no other worker
holds, a GPU worker one core for its host thread. A worker whose cores are its own keeps
the engine's own wait policy (its OpenMP threads spin a while between the steps of a graph,
then sleep: the fast path; passive waiting costs about 30% of one stream); one
started when no core was free shares every core and waits passively
(``OMP_WAIT_POLICY=PASSIVE``), so that it does not starve the others. ``ACTIVE`` is not set
for the owners: measured here, an idle 2-thread worker with it spins 0.7-1.0 core forever
with no job, and on this shared host it decoded no faster than the default.

When no core is free, pool-managerd halves the CPU worker holding the most cores (at least
two) before it starts the new one (:func:`rbees_core.placement.core_donor` picks it,
:func:`halve` splits its CPU set; the worker changes its threads and CPU set at run time,
``POST /v2/cores``), and gives the cores back when the new one stops
(:func:`regrow`): two busy models on one host each decode on cores of their own. rbees-orcd's
policies account the same rule and start no CPU
worker where no core is free or can be given; sharing only happens to workers started by
hand (``rbees-pool worker spawn``). Used by :func:`rbees_core.pool.workers.spawn` and
:mod:`rbees_core.pool.daemon`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import attrs

#: the variable of the OpenMP runtime (libgomp) that says how idle threads wait
WAIT_POLICY = "OMP_WAIT_POLICY"


@attrs.frozen
class CoreGrant:
    """What a new worker gets: ``threads`` threads pinned to ``cpus``; ``shared`` when
    those cores are not its own."""

    threads: int
    cpus: tuple[int, ...]
    shared: bool

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with the wait policy that fits the grant: the engine's default (spin,
        then sleep) on cores of its own, passive on shared ones. An operator's own
        ``OMP_WAIT_POLICY`` wins (``PASSIVE`` on a host whose cores other programs keep
        busy: spinning threads collapse when they are preempted)."""
        if WAIT_POLICY in base or not self.shared:
            return dict(base)
        return {**base, WAIT_POLICY: "PASSIVE"}


def host_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity), in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # pragma: no cover - not Linux


def held(grants: Iterable[tuple[Iterable[int] | None, bool]]) -> set[int]:
    """The cores held by workers, from their ``(cpus, shared)``: a shared worker holds none."""
    out: set[int] = set()
    for cpus, shared in grants:
        if cpus and not shared:
            out.update(cpus)
    return out


def grant(device: str, threads: int | None, taken: set[int],
          cpus: list[int] | None = None) -> CoreGrant:
    """The cores of a new worker on ``device`` asking for ``threads`` (None: every free core
    on the CPU, one on a GPU), given the cores ``taken`` by other workers and the host's
    ``cpus`` (default :func:`host_cpus`). Never fails: with no core free the worker shares.
    Pure but for reading the affinity."""
    every = cpus if cpus is not None else host_cpus()
    free = [c for c in every if c not in taken]
    gpu = device.partition(":")[0] != "cpu"
    want = 1 if gpu else threads
    if free:
        n = len(free) if want is None else max(1, min(want, len(free)))
        return CoreGrant(threads=n, cpus=tuple(free[:n]), shared=False)
    if gpu:  # its host thread shares one core with the others
        return CoreGrant(threads=1, cpus=tuple(every), shared=True)
    n = len(every) if want is None else max(1, min(want, len(every)))
    return CoreGrant(threads=n, cpus=tuple(every), shared=True)


@attrs.frozen
class Halving:
    """A worker that gives cores to a new one: it keeps ``keep``, the new one gets ``give``."""

    worker_id: str
    keep: tuple[int, ...]
    give: tuple[int, ...]


def halve(worker_id: str, cpus: Iterable[int], wanted: int | None = None) -> Halving:
    """The worker ``worker_id`` on ``cpus`` halved for a new one: the new worker gets the
    upper half (at most ``wanted`` cores), it keeps the rest. Which worker gives is
    :func:`rbees_core.placement.core_donor`'s choice, the scheduler's rule. Pure."""
    held = sorted(cpus)
    give = len(held) // 2 if wanted is None else max(1, min(wanted, len(held) // 2))
    keep = len(held) - give
    return Halving(worker_id=worker_id, keep=tuple(held[:keep]), give=tuple(held[keep:]))


def regrow(cpus: Iterable[int], full: int, free: Iterable[int]) -> tuple[int, ...] | None:
    """The CPU set of a worker halved earlier (``cpus``, started with ``full`` threads),
    grown back with the ``free`` cores it lacks; None when it is whole or nothing is free."""
    have = sorted(cpus)
    more = [c for c in sorted(free) if c not in have][:max(0, full - len(have))]
    return tuple(sorted([*have, *more])) if more else None


def pin_all(cpus: Iterable[int]) -> None:
    """Move every thread of this process onto ``cpus`` (a worker's new CPU set at run time;
    :func:`pin` only covers the calling thread and those it starts later). Raises OSError
    for CPUs this process may not use."""
    chosen = set(cpus)
    if not hasattr(os, "sched_setaffinity"):  # pragma: no cover - not Linux
        return
    os.sched_setaffinity(0, chosen)
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), chosen)


def parse_cpus(text: str) -> list[int]:
    """``0-2,5`` -> ``[0, 1, 2, 5]`` (the CPU list syntax of ``taskset -c`` and
    ``/proc/PID/status``). Raises ValueError for anything else."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if not out or min(out) < 0:
        raise ValueError(f"not a CPU list: {text!r}")
    return sorted(set(out))


def format_cpus(cpus: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0,1,2,5``."""
    return ",".join(str(c) for c in sorted(cpus))


def pin(cpus: str) -> None:
    """Run this process, and every thread it starts later, on the CPU list ``cpus``
    (``0-1,3``): the cores its pool gave it. Called before the model loads, so the engine's
    threads inherit the set. Raises :class:`InvalidParamsError` for a bad list or CPUs
    this process may not use."""
    from rbees_core.errors import InvalidParamsError

    chosen: set[int] = set()
    try:
        for part in cpus.split(","):
            lo, sep, hi = part.strip().partition("-")
            chosen.update(range(int(lo), int(hi) + 1) if sep else {int(lo)})
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, chosen)
    except (ValueError, OSError) as exc:
        raise InvalidParamsError("--cpus", f"cannot run on {cpus!r}: {exc}") from exc
