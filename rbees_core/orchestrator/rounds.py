"""The pools of one dispatch round, and how a job that can never run ends.

The dispatcher (:mod:`rbees_core.orchestrator.dispatcher`) takes the pools' snapshot once
per round and again only after something changed them (a slot taken, a worker asked for):
:class:`RoundPools`.
"""

from __future__ import annotations

from typing import Any

import attrs

from rbees_core.feasibility import failed_loads
from rbees_core.orchestrator.downloads import Downloads
from rbees_core.orchestrator.queue import QueuedJob
from rbees_core.orchestrator.registry import PoolRegistry
from rbees_core.placement import hold_back


class RoundPools:
    """The pools' snapshot for a policy, taken on first use: with 1,000 pools it costs
    1-2 ms, and most jobs are answered by the verdict of one alike (:meth:`_decide`)."""

    def __init__(self, registry: PoolRegistry, downloads: Downloads | None = None) -> None:
        self.registry = registry
        self.downloads = downloads
        #: the snapshot's pools; None: take them again (a slot, a start changed them)
        self.taken: list[dict[str, Any]] | None = None
        self.for_batch: list[dict[str, Any]] | None = None
        self.marked: bool | None = None  # whether any pool has marked a model failed
        self.failed: dict[tuple[str, str | None], list[tuple[str, dict[str, Any]]]] = {}
        self.never: dict[tuple[str, str], Ending | None] = {}

    def get(self, *, batch: bool = False) -> list[dict[str, Any]]:
        """The pools, as a ``batch`` job sees them when it is one (workers keep
        ``[placement] interactive_slots`` free of batch jobs: :func:`hold_back`)."""
        if self.taken is None:
            self.taken = self.registry.snapshot_pools()
            if self.downloads is not None:
                self.taken = self.downloads.decorate(self.taken)
            self.for_batch = None
        if not batch:
            return self.taken
        if self.for_batch is None:
            self.for_batch = hold_back(self.taken, self.registry.interactive_slots)
        return self.for_batch

    def failed_loads(self, queued: QueuedJob) -> list[tuple[str, dict[str, Any]]]:
        """The marks that end the job (:func:`~rbees_core.feasibility.failed_loads`), once
        per model and pin in a round; no snapshot is taken while no pool marks anything."""
        if self.marked is None:
            self.marked = any(e.state.failed_models for e in self.registry)
        if not self.marked:
            return []
        pin = queued.placement.pool if queued.placement is not None else None
        key = (queued.model, pin)
        if key not in self.failed:
            self.failed[key] = failed_loads(self.get(), queued.model, pin_pool=pin)
        return self.failed[key]


@attrs.frozen
class Ending:
    """A queued job that can never run: the error it ends with (``kind``: the error event's
    ``reason``, :data:`rbees_core.feasibility.UNKNOWN_MODEL` or ``TOO_LARGE``)."""

    code: str
    message: str
    kind: str | None = None
