"""Pool daemon types (CONTRACT section 4)."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from rbees_core.api.common import (
    DEVICE_PATTERN,
    ID_PATTERN,
    MAX_ERROR_CHARS,
    MAX_MODEL_REF,
    SHELL_META,
)
from rbees_core.schema import field, limits

WorkerStateName = Literal["starting", "ready", "busy", "draining", "stopping", "stopped",
                          "failed"]
#: The states of a worker whose process is (or is about to be) running.
LIVE_WORKER_STATES = frozenset({"starting", "ready", "busy", "draining", "stopping"})


@attrs.frozen
class WorkerStartRequest:
    """Body of POST /v2/workers/start."""

    model_ref: str = attrs.field(metadata=limits(max_length=512, forbid=SHELL_META,
                                                 doc="catalog id or model reference"))
    backend: str = field(default="llamacpp", pattern=ID_PATTERN)
    device: str = field(default="cpu", pattern=r"(cpu|cuda|metal|mps)(:[0-9]{1,3})?")
    slots: int = field(default=1, minimum=1, maximum=64)
    ctx: int | None = field(default=None, minimum=16, maximum=1_048_576)
    threads: int | None = field(
        default=None, minimum=1, maximum=1024,
        doc="cores (and threads) the worker gets; default: on the CPU every core no other "
            "worker holds, on a GPU one")
    embedding: bool = field(default=False, doc="an embedding worker (rbees-workerd "
                            "--embedding): it serves embedding jobs and no other")
    n_gpu_layers: int | None = field(
        default=None, minimum=0, maximum=100_000,
        doc="repeating layers on the GPU, the rest in RAM (rbees-workerd --n-gpu-layers); "
            "default: all of them on a GPU")
    tensor_split: list[float] | None = field(
        default=None, max_items=16,
        doc="each GPU's share of the model, by index (rbees-workerd --tensor-split): a model "
            "split across the host's GPUs; default: all on the device's GPU")
    rpc: list[str] | None = field(
        default=None, max_items=16, item_max_length=512,
        doc="a sharded worker (rbees-workerd --rpc): llama.cpp RPC servers holding part of "
            "the model, loopback HOST:PORT or rbees-rpc[s]://HOST:PORT/SERVER_ID; "
            "tensor_split then gives this device's share first")
    rpc_token: str | None = field(
        default=None, max_length=512,
        doc="the lending pool's control token, for rpc tunnel URLs (kept in a 0600 file)")


@attrs.frozen
class WorkerStarted:
    """202 answer of POST /v2/workers/start."""

    worker_id: str
    state: str
    uri: str


@attrs.frozen
class WorkerEntry:
    """One worker as the pool knows it. Its limits hold for what rbees-orcd reads in a
    heartbeat: a pool cuts an error longer than ``MAX_ERROR_CHARS`` (``clip``)."""

    worker_id: str = attrs.field(metadata=limits(pattern=ID_PATTERN))
    model_ref: str = attrs.field(metadata=limits(max_length=MAX_MODEL_REF))
    backend: str = attrs.field(metadata=limits(pattern=ID_PATTERN))
    device: str = attrs.field(metadata=limits(pattern=DEVICE_PATTERN))
    uri: str = attrs.field(metadata=limits(max_length=512))
    pid: int = attrs.field(metadata=limits(minimum=0))
    state: WorkerStateName
    slots_total: int = attrs.field(metadata=limits(minimum=0))
    slots_free: int | None = attrs.field(metadata=limits(minimum=0))
    memory_bytes: int = attrs.field(metadata=limits(minimum=0))
    started_at: float
    last_health_at: float | None = None
    exit_code: int | None = None
    error: str | None = field(default=None, max_length=MAX_ERROR_CHARS)
    #: the worker's thread count and CPU set (its affinity), as its pool gave them
    threads: int | None = field(default=None, minimum=0)
    cpus: list[int] | None = field(default=None, max_items=4096)
    #: whether it shares its cores (none was free when it started: it waits passively)
    cpu_shared: bool = False
    #: an embedding worker (--embedding): embedding jobs only
    embedding: bool = False


@attrs.frozen
class GpuEntry:
    """One GPU of a pool host (CONTRACT section 4), as a GPU inventory probe reports it.

    Made by :meth:`rbees_core.interfaces.GpuInventory.collect` (``nvml``, ``metal``) with
    ``memory_reserved_bytes`` 0; pool-managerd fills that in with what its workers hold
    before it reports the GPU in ``/v2/state`` and its heartbeats.
    """

    index: int = attrs.field(metadata=limits(minimum=0))
    uuid: str = attrs.field(metadata=limits(max_length=128))
    name: str = attrs.field(metadata=limits(max_length=256))
    backend: str = attrs.field(metadata=limits(pattern=r"[a-z][a-z0-9_-]{0,31}",
                                               doc="cuda, metal: the device kind"))
    memory_total_bytes: int = attrs.field(metadata=limits(minimum=0))
    memory_free_bytes: int = attrs.field(metadata=limits(minimum=0))
    memory_reserved_bytes: int = field(default=0, minimum=0, doc="held by this pool's workers")
    utilization: float = field(default=0.0, minimum=0, maximum=1)
    temperature_c: int | float | None = None
    power_w: float | None = None

    @property
    def device(self) -> str:
        """``KIND:INDEX``, as workers and placements name it (``cuda:0``)."""
        return f"{self.backend}:{self.index}"


@attrs.frozen
class CpuEntry:
    """The host's CPU and RAM: made by the ``cpu`` inventory probe, with
    ``ram_reserved_bytes`` filled in by pool-managerd (what its CPU workers hold)."""

    cores: int = attrs.field(metadata=limits(minimum=0))
    ram_total_bytes: int = attrs.field(metadata=limits(minimum=0))
    ram_free_bytes: int = attrs.field(metadata=limits(minimum=0))
    ram_reserved_bytes: int = field(default=0, minimum=0)
    name: str | None = field(default=None, max_length=256)
    #: cores held by workers (their own CPU sets; filled in by pool-managerd)
    cores_reserved: int = field(default=0, minimum=0)


@attrs.frozen
class FailedModel:
    """A model marked failed on a pool: it failed to load ``attempts`` times in a row
    (:mod:`rbees_core.pool.load_marks`); ``reason`` is the last load error."""

    model_ref: str = attrs.field(metadata=limits(max_length=MAX_MODEL_REF))
    attempts: int = attrs.field(metadata=limits(minimum=0))
    reason: str = attrs.field(metadata=limits(max_length=MAX_ERROR_CHARS))
    marked_at: float = 0.0


@attrs.frozen
class RpcStartRequest:
    """Body of POST /v2/rpc/start: a llama.cpp RPC server for one device of this pool, that
    a sharded worker elsewhere loads part of a model onto (``[pool] rpc = true``)."""

    memory_bytes: int = attrs.field(metadata=limits(
        minimum=1, maximum=2**50,
        doc="what the shard will hold on the device: reserved in the pool's accounting while "
            "the server runs (refused with INSUFFICIENT_RAM/_VRAM when it does not fit)"))
    device: str = field(default="cpu", pattern=r"(cpu|cuda|metal)(:[0-9]{1,3})?")
    threads: int | None = field(default=None, minimum=1, maximum=1024,
                                doc="CPU threads of a cpu server (default: 1)")


@attrs.frozen
class RpcServerEntry:
    """One RPC server of a pool (``/v2/state``'s and heartbeats' ``rpc_servers``).

    ``endpoint`` is a loopback ``HOST:PORT``: the server never listens on another address
    (llama.cpp's RPC protocol has no authentication); a worker of another host reaches it
    through a tunnel (README, "Sharding")."""

    server_id: str = attrs.field(metadata=limits(pattern=ID_PATTERN))
    device: str = attrs.field(metadata=limits(pattern=DEVICE_PATTERN))
    endpoint: str = attrs.field(metadata=limits(max_length=512))
    state: Literal["starting", "ready", "stopping", "stopped", "failed"]
    memory_bytes: int = attrs.field(metadata=limits(minimum=0))
    pid: int = attrs.field(metadata=limits(minimum=0))
    started_at: float
    error: str | None = field(default=None, max_length=MAX_ERROR_CHARS)
    #: where a worker of another host reaches it: rbees-rpc[s]://HOST:PORT/SERVER_ID, the
    #: pool's authenticated gateway (rbees_core.rpc_tunnel; None: no gateway, no token)
    tunnel: str | None = field(default=None, max_length=512)


@attrs.frozen
class PoolState:
    """GET /v2/state: facts of this host, sent as the heartbeat body too."""

    pool_id: str = attrs.field(metadata=limits(pattern=ID_PATTERN))
    host: str = attrs.field(metadata=limits(max_length=255))
    gpus: list[GpuEntry] = attrs.field(metadata=limits(max_items=64))
    cpu: CpuEntry | None
    workers: list[WorkerEntry] = attrs.field(metadata=limits(
        max_items=2048, doc="live workers (at most one per port, 8001-8999) and the "
        "latest 32 that ended"))
    models: list[dict[str, Any]] = attrs.field(metadata=limits(max_items=4096))
    version: str = field(default="", max_length=64)
    url: str = field(default="", max_length=512, doc="where this pool's API answers")
    failed_models: list[FailedModel] = field(
        factory=list, max_items=4096,
        doc="models marked failed here: no worker is started for them until cleared")
    disk_free_bytes: int | None = field(
        default=None, minimum=0,
        doc="free space where this pool keeps downloaded models: pull on first use picks a "
        "pool with room for the file")
    rpc: bool = field(default=False, doc="whether this pool serves its devices over llama.cpp "
                      "RPC to sharded workers ([pool] rpc = true)")
    rpc_servers: list[RpcServerEntry] = field(
        factory=list, max_items=64,
        doc="its RPC servers; their memory is counted in gpus[]/cpu reserved bytes")


@attrs.frozen
class RetryRequest:
    """Body of pool-managerd's POST /v2/models/retry (and of rbees-orcd's, with ``pool``)."""

    model: str = attrs.field(metadata=limits(max_length=512, forbid=SHELL_META,
                                             doc="catalog id or model reference"))
    pool: str | None = field(default=None, pattern=ID_PATTERN,
                             doc="rbees-orcd only: this pool alone (default: every pool)")


@attrs.frozen
class RetryAnswer:
    """What POST /v2/models/retry cleared."""

    model: str
    cleared: list[FailedModel]


@attrs.frozen(kw_only=True)
class PoolHeartbeat(PoolState):
    """Body of POST /v2/pools/{pool_id}/heartbeat: the pool's state plus a sequence number."""

    seq: int = attrs.field(metadata=limits(minimum=0, doc="increases with every heartbeat"))
    sent_at: float = attrs.field(metadata=limits(doc="the pool's clock when it was sent"))


@attrs.frozen
class WorkerList:
    workers: list[WorkerEntry]


@attrs.frozen
class ModelList:
    models: list[dict[str, Any]]


@attrs.frozen
class DownloadRequest:
    """Body of POST /v2/models/download."""

    model: str = attrs.field(metadata=limits(max_length=512, forbid=SHELL_META,
                                             doc="catalog id or hf:OWNER/REPO/FILE"))
    force: bool = False


@attrs.frozen
class DownloadProgress:
    """How far a download is, as told to the ``progress`` of
    :meth:`rbees_core.interfaces.ModelSource.download` and of a pool client's
    ``models_download``.

    ``stage`` is ``download`` while bytes arrive (``bytes_done`` counts bytes already on disk,
    resumed ones included) and ``verify`` while the finished file is hashed.
    """

    bytes_done: int
    bytes_total: int | None
    rate_bps: float
    stage: str = "download"


# -- what a pool client returns (rbees_core.pool_client): rbees-pool's JSON shapes ----------


@attrs.frozen
class PoolWorker:
    """One worker as ``rbees-pool worker list --format json`` prints it.

    The keys of :meth:`rbees_core.pool.workers.WorkerRecord.to_dict`, in that order, plus
    ``error`` for a worker that failed. Over pool-managerd's API (:class:`WorkerEntry`) the
    model's path is not known (``model_path`` None) and ``port``/``host`` come from ``uri``.
    ``state`` is a :data:`WorkerStateName` or, without a daemon, ``dead``/``killed``.
    """

    worker_id: str
    model_ref: str
    model_path: str | None
    backend: str
    device: str
    port: int | None
    pid: int
    slots_total: int
    memory_bytes: int
    started_at: float
    state: str
    slots_free: int | None = None
    last_health_at: float | None = None
    exit_code: int | None = None
    host: str | None = None
    threads: int | None = None
    cpus: list[int] | None = None
    cpu_shared: bool = False
    uri: str = ""
    error: str | None = None
    embedding: bool = False

    @classmethod
    def from_entry(cls, entry: WorkerEntry) -> PoolWorker:
        """pool-managerd's worker entry in rbees-pool's shape."""
        from urllib.parse import urlsplit

        where = urlsplit(entry.uri)
        return cls(worker_id=entry.worker_id, model_ref=entry.model_ref, model_path=None,
                   backend=entry.backend, device=entry.device, port=where.port, pid=entry.pid,
                   slots_total=entry.slots_total, memory_bytes=entry.memory_bytes,
                   started_at=entry.started_at, state=entry.state,
                   slots_free=entry.slots_free, last_health_at=entry.last_health_at,
                   exit_code=entry.exit_code, host=where.hostname, uri=entry.uri,
                   error=entry.error, threads=entry.threads, cpus=entry.cpus,
                   cpu_shared=entry.cpu_shared, embedding=entry.embedding)


@attrs.frozen
class PoolModel:
    """One model on a pool host, as ``rbees-pool models list --format json`` prints it."""

    id: str | None
    ref: str
    path: str
    size_bytes: int
    sha256: str | None
    source: str


@attrs.frozen(kw_only=True)
class DownloadedModel(PoolModel):
    """The end of ``models download``: the model in place, and whether it was fetched now
    (False: it was here already)."""

    fetched: bool


@attrs.frozen
class PoolStatus:
    """``rbees-pool status --format json``: the host's devices, models and workers.

    ``gpus`` and ``cpu`` are the inventory's entries (CONTRACT section 4) as the pool sent
    them. ``failed_models`` are the models pool-managerd marked failed there
    (:mod:`rbees_core.pool.load_marks`)."""

    pool_id: str
    host: str
    gpus: list[GpuEntry]
    cpu: dict[str, Any] | None
    workers: list[PoolWorker]
    models: list[PoolModel]
    failed_models: list[FailedModel] = attrs.field(factory=list)
