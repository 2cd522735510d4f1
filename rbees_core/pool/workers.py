"""Worker lifecycle on one host: preflight, spawn, readiness, listing, stopping, logs.

Shared by ``rbees-pool worker ...`` (direct, no daemon) and pool-managerd. A worker is a
detached ``rbees-workerd`` process; its record lives in
``$RBEES_HOME/workers/<worker_id>/state.json`` next to its ``worker.log``, so any later
``rbees-pool`` invocation (or the daemon) can find, query and stop it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import attrs
import pluggy

from rbees_core import plugins
from rbees_core.backend import MemoryEstimate
from rbees_core.config import auth_headers, rbees_home
from rbees_core.errors import (
    BackendUnavailableError,
    ConflictError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotOnHostError,
    NotFoundError,
    RbeesError,
    UnknownPluginError,
)
from rbees_core.files import open_private, write_private
from rbees_core.models import resolve_model
from rbees_core.planning import ModelNeed, device_bytes
from rbees_core.pool import cores, memory
from rbees_core.pool.file_roots import confine
from rbees_core.pool.memory import InsufficientMemoryError
from rbees_core.processes import Expected, find, pid_alive, terminate
from rbees_core.sharding import local_bytes
from rbees_core.tls import ServerTLS, client_context, scheme

PORT_RANGE = range(8001, 9000)


class WorkerStartTimeoutError(RbeesError):
    code = "WORKER_START_TIMEOUT"
    status = 504


class WorkerFailedError(RbeesError):
    code = "WORKER_FAILED"
    status = 502


@attrs.frozen
class SpawnRequest:
    model_ref: str
    backend: str = "llamacpp"
    device: str = "cpu"
    slots: int = 1
    ctx: int | None = None
    #: cores for the worker (None: every free core on the CPU, one on a GPU)
    threads: int | None = None
    port: int | None = None
    worker_id: str | None = None
    callback_url: str | None = None
    #: the address the worker listens on; a pool daemon bound to a host address spawns its
    #: workers there, so an orchestrator on another host reaches them
    host: str = "127.0.0.1"
    embedding: bool = False  # rbees-workerd --embedding
    n_gpu_layers: int | None = None  # --n-gpu-layers: a model larger than one GPU (planning)
    tensor_split: tuple[float, ...] | None = None  # --tensor-split: each GPU's share
    rpc: tuple[str, ...] = ()  # --rpc: a sharded worker, with its lender's token
    rpc_token: str | None = attrs.field(default=None, repr=False)
    #: serve HTTPS with its pool's certificate (a pool with TLS: the worker listens on the
    #: pool's address, which that certificate names)
    tls: ServerTLS | None = None


@attrs.frozen
class Preflight:
    path: str
    memory_bytes: int
    memory_kind: str
    free_bytes: int | None


@attrs.define
class WorkerRecord:
    """What is known of a worker, persisted as ``state.json``."""

    worker_id: str
    model_ref: str
    model_path: str
    backend: str
    device: str
    port: int
    pid: int
    slots_total: int
    memory_bytes: int
    started_at: float
    state: str = "starting"
    slots_free: int | None = None
    last_health_at: float | None = None
    exit_code: int | None = None
    host: str = "127.0.0.1"
    #: threads and CPU set (affinity) the worker was given (:mod:`rbees_core.pool.cores`);
    #: ``cpu_shared``: no core was free for it, it shares them and waits passively
    threads: int | None = None
    cpus: list[int] | None = None
    cpu_shared: bool = False
    embedding: bool = False  # serves embedding jobs only (--embedding)
    ctx: int | None = None  # context per slot asked for (None: the backend's default)
    tls: bool = False  # serves HTTPS (its pool's certificate)
    sharded: bool = False  # --rpc: holds its share only (calibrates no estimate)

    @property
    def uri(self) -> str:
        return f"{scheme(self.tls)}://{host_port(self.host, self.port)}"

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "uri": self.uri}

    @classmethod
    def json_keys(cls) -> tuple[str, ...]:
        """The keys of :meth:`to_dict`: a worker in rbees-pool's JSON."""
        return (*(f.name for f in attrs.fields(cls)), "uri")


def forget_ended(table: dict[str, Any], live: Collection[str], keep: int) -> None:
    """Drop from ``table`` (id -> a worker or an RPC server, anything with a ``state``) the
    entries whose state is not in ``live``, all but the ``keep`` latest (``keep`` > 0): a
    pool lists how its recent ones ended, not every one since it started."""
    ended = [key for key, item in table.items() if item.state not in live]
    for key in ended[:-keep]:
        del table[key]


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def workers_dir() -> Path:
    return rbees_home() / "workers"


def worker_dir(worker_id: str) -> Path:
    return workers_dir() / worker_id


def log_path(worker_id: str) -> Path:
    return worker_dir(worker_id) / "worker.log"


# -- preflight -----------------------------------------------------------------------------


def estimate_memory(pm: pluggy.PluginManager, req: SpawnRequest, path: str,
                    estimates: memory.Estimates | None = None) -> MemoryEstimate:
    """What the worker of ``req`` will hold once loaded: its backend's estimate
    (:meth:`rbees_core.backend.Backend.estimate_memory`, the size on disk plus overhead when
    the backend cannot tell), calibrated by what earlier workers of the file measured
    (:class:`rbees_core.pool.memory.Estimates`; a fresh one, knowing none, when not given).
    Raises what the backend raises; anything else that reading the file raised is the
    file's failure to load: :class:`ModelLoadError`."""
    estimates = estimates or memory.Estimates(pm)
    try:
        return estimates.estimate(path, backend=req.backend, device=req.device,
                                  slots=req.slots, ctx=req.ctx, embedding=req.embedding)
    except ModelLoadError as exc:
        raise ModelLoadError(exc.message, details={**exc.details, "model": req.model_ref}
                             ) from exc


def held_by_records(device: str) -> memory.Held:
    """What the running workers of this home's records hold on ``device`` (the preflight
    of ``rbees-pool worker spawn``, with no daemon to ask)."""
    return memory.held_on(device, ((r.device, r.state, r.memory_bytes) for r in records()
                                   if running(r)))


def preflight(pm: pluggy.PluginManager, req: SpawnRequest, held: memory.Held | None = None,
              *, estimates: memory.Estimates | None = None, limit: int | None = None
              ) -> Preflight:
    """Everything that can be checked before a process starts; raises the contract's 409s.

    ``held`` is what the pool's live workers on the device hold (default: this home's
    running workers, :func:`held_by_records`), ``limit`` ``[pool] memory_limit`` (default:
    the configuration's): the worker's estimate must fit what the pool offers
    (:func:`rbees_core.pool.memory.offer`), the rule its state reports to the scheduler.
    A ``file:`` reference or path outside the pool's roots is refused first (400,
    :class:`rbees_core.pool.file_roots.OutsideRootsError`)."""
    confine(pm, req.model_ref, "model_ref")
    try:
        path = resolve_model(pm, req.model_ref)
    except ModelNotFoundError as exc:  # a preflight failure like the others: 409
        raise ModelNotOnHostError(exc.message, details=exc.details) from exc
    try:
        backend = plugins.lookup(pm, plugins.BACKENDS, req.backend)
    except UnknownPluginError as exc:  # the contract's code for it
        raise BackendUnavailableError(exc.message, details={"backend": req.backend}) from exc
    kind = req.device.partition(":")[0]
    try:
        available = backend.available_devices()
    except RbeesError:
        raise
    except Exception as exc:
        raise BackendUnavailableError(f"backend {req.backend!r} cannot start here: {exc}",
                                      details={"backend": req.backend}) from exc
    if kind not in available:
        raise BackendUnavailableError(
            f"backend {req.backend!r} cannot use {kind!r} here (available: "
            f"{', '.join(available)})", details={"backend": req.backend, "device": req.device})
    estimate = estimate_memory(pm, req, path, estimates)
    if limit is None:
        from rbees_core.config import load_config

        limit = load_config().pool.memory_limit_bytes()
    # a split, a partial offload or a shard: each device its part (the planner's figures)
    parts = {req.device: local_bytes(ModelNeed.of(estimate), req.tensor_split)} if req.rpc \
        else device_bytes(ModelNeed.of(estimate), req.device, req.n_gpu_layers, req.tensor_split)
    free, memory_kind = memory.check_fits(
        pm, req.model_ref, parts, req.device, limit,
        lambda device: held if held is not None and device == req.device
        else held_by_records(device))
    need = parts[req.device] if req.rpc else estimate.total_bytes
    return Preflight(path=path, memory_bytes=need, memory_kind=memory_kind, free_bytes=free)


# -- records -------------------------------------------------------------------------------


def save(record: WorkerRecord) -> None:
    write_private(worker_dir(record.worker_id) / "state.json", json.dumps(attrs.asdict(record)))


def load(worker_id: str) -> WorkerRecord:
    path = worker_dir(worker_id) / "state.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NotFoundError(f"no worker {worker_id!r} on this host",
                            details={"worker_id": worker_id}) from exc
    return WorkerRecord(**data)


def records() -> Iterator[WorkerRecord]:
    root = workers_dir()
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if (folder / "state.json").exists():
            try:
                yield load(folder.name)
            except NotFoundError:
                continue


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def expected(record: WorkerRecord) -> Expected:
    """How :func:`rbees_core.processes.find` recognises the process of ``record``: an
    ``rbees-workerd`` with its ``--worker-id``, started when the record was made."""
    return Expected(program="rbees-workerd", module="rbees_core.programs.workerd",
                    args=("--worker-id", record.worker_id), started_by=record.started_at)


def running(record: WorkerRecord) -> bool:
    """Whether the worker of ``record`` still runs (its pid, not a process that got the pid
    after it died)."""
    return find(record.pid, expected(record)) is not None


def pick_port(taken: set[int] | None = None, host: str = "127.0.0.1") -> int:
    taken = taken if taken is not None else {r.port for r in records() if running(r)}
    for port in PORT_RANGE:
        if port not in taken and port_free(port, host):
            return port
    raise ConflictError("no free port in 8001-8999 for a new worker")


def new_worker_id(kind: str) -> str:
    used = {r.worker_id for r in records()}
    n = 0
    while f"worker-{kind}-{n}" in used:
        n += 1
    return f"worker-{kind}-{n}"


# -- spawn, wait, live state ---------------------------------------------------------------


def workerd_executable() -> str:
    beside = Path(sys.executable).with_name("rbees-workerd")
    return str(beside) if beside.exists() else "rbees-workerd"


def spawn(pm: pluggy.PluginManager, req: SpawnRequest, *, checked: Preflight | None = None,
          token_file: str | None = None) -> WorkerRecord:
    """Preflight, then start a detached rbees-workerd; returns at once (state starting)."""
    record, _ = spawn_process(pm, req, checked=checked, token_file=token_file)
    return record


def fit_slots(pm: pluggy.PluginManager, req: SpawnRequest, held: memory.Held | None = None,
              *, estimates: memory.Estimates | None = None, limit: int | None = None
              ) -> tuple[SpawnRequest, Preflight]:
    """:func:`preflight` of ``req``, with its slots halved until the model and the KV cache
    of every slot fit the device (never below one: a model that does not fit alone is
    refused as :func:`preflight` refuses it). pool-managerd's start of a worker: the
    scheduler asks for its configured slots, memory bounds them."""
    while True:
        try:
            return req, preflight(pm, req, held, estimates=estimates, limit=limit)
        except InsufficientMemoryError:
            if req.slots <= 1:
                raise
            req = attrs.evolve(req, slots=req.slots // 2)


def cores_held() -> set[int]:
    """The cores held by the running workers of this home (``rbees-pool worker spawn``)."""
    return cores.held((r.cpus, r.cpu_shared) for r in records() if running(r))


def spawn_process(pm: pluggy.PluginManager, req: SpawnRequest, *,
                  checked: Preflight | None = None, token_file: str | None = None,
                  taken: set[int] | None = None, control_token_file: str | None = None,
                  callback_token_file: str | None = None,
                  ) -> tuple[WorkerRecord, subprocess.Popen[bytes]]:
    """:func:`spawn`, also returning the process handle (a supervisor keeps it to read the
    exit code; the worker runs in its own session, so it outlives its parent). The worker
    gets its threads and CPU set from the cores not ``taken`` by other workers (default:
    :func:`cores_held`; :mod:`rbees_core.pool.cores`)."""
    checked = checked or preflight(pm, req)
    kind = req.device.partition(":")[0]
    worker_id = req.worker_id or new_worker_id(kind)
    if (worker_dir(worker_id) / "state.json").exists() and running(load(worker_id)):
        raise ConflictError(f"worker {worker_id!r} is already running",
                            details={"worker_id": worker_id})
    port = req.port if req.port is not None else pick_port(host=req.host)
    if not port_free(port, req.host):
        raise ConflictError(f"port {port} is in use", details={"port": port})
    argv = [workerd_executable(), "--worker-id", worker_id, "--model", req.model_ref,
            "--backend", req.backend, "--device", req.device,
            "--bind", host_port(req.host, port),
            "--slots", str(req.slots)]
    given = cores.grant(req.device, req.threads, cores_held() if taken is None else taken)
    argv += ["--threads", str(given.threads), "--cpus", cores.format_cpus(given.cpus)]
    if req.ctx:
        argv += ["--ctx", str(req.ctx)]
    if req.callback_url:
        argv += ["--callback-url", req.callback_url]
    argv += ["--embedding"] if req.embedding else []
    argv += ["--n-gpu-layers", str(req.n_gpu_layers)] if req.n_gpu_layers is not None else []
    argv += ["--tensor-split", ",".join(map(str, req.tensor_split))] if req.tensor_split else []
    if token_file:
        argv += ["--api-token-file", token_file]
    if control_token_file:  # what rbees-orcd sends it (rbees_core.auth.control_token)
        argv += ["--control-token-file", control_token_file]
    if callback_token_file:  # its own token, for its ready callback only
        argv += ["--callback-token-file", callback_token_file]
    argv += req.tls.argv() if req.tls is not None else []
    if req.rpc:  # a shard; its lender's token in a file of its own
        argv += ["--rpc", ",".join(req.rpc)] + (["--rpc-token-file", str(write_private(
            log_path(worker_id).with_name("rpc"), req.rpc_token))] if req.rpc_token else [])
    with open_private(log_path(worker_id), "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=given.environment(dict(os.environ)))
    record = WorkerRecord(
        worker_id=worker_id, model_ref=req.model_ref, model_path=checked.path,
        backend=req.backend, device=req.device, port=port, pid=proc.pid, slots_total=req.slots,
        memory_bytes=checked.memory_bytes, started_at=time.time(), host=req.host,
        threads=given.threads, cpus=list(given.cpus), cpu_shared=given.shared,
        embedding=req.embedding, ctx=req.ctx, tls=req.tls is not None, sharded=bool(req.rpc))
    save(record)
    return record, proc


def probe(record: WorkerRecord, timeout: float = 1.0) -> WorkerRecord:
    """Fill ``state``, ``slots_free`` and ``last_health_at`` from the live worker."""
    import httpx

    if not running(record):
        record.state = "dead"
        return record
    try:
        answer = httpx.get(f"{record.uri}/v2/ready", timeout=timeout, headers=auth_headers(),
                           verify=client_context())
        body = answer.json()
    except (httpx.HTTPError, ValueError):
        record.state = "unreachable"
        return record
    record.state = body.get("state", "unknown")
    record.slots_free = body.get("slots_free")
    if body.get("memory_bytes"):
        record.memory_bytes = int(body["memory_bytes"])
    record.last_health_at = time.time()
    return record


def wait_ready(record: WorkerRecord, *, timeout: float = 60.0,
               on_progress: Callable[[float], None] | None = None) -> WorkerRecord:
    """Poll until the worker is ready; SIGKILL it and raise after ``timeout``."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0, headers=auth_headers(), verify=client_context()) as client:
        while time.monotonic() < deadline:
            if not pid_alive(record.pid):
                raise WorkerFailedError(
                    f"worker {record.worker_id} exited while loading:\n{tail(record.worker_id)}",
                    details={"worker_id": record.worker_id})
            try:
                body = client.get(f"{record.uri}/v2/ready").json()
            except (httpx.HTTPError, ValueError):
                body = {}
            if body.get("ready"):
                record.state = "ready"
                record.slots_free = body.get("slots_free")
                record.memory_bytes = int(body.get("memory_bytes") or record.memory_bytes)
                save(record)
                if on_progress:
                    on_progress(1.0)
                return record
            if on_progress and body.get("progress") is not None:
                on_progress(float(body["progress"]))
            time.sleep(0.05)
    kill(record.pid)
    raise WorkerStartTimeoutError(
        f"worker {record.worker_id} was not ready after {timeout:.0f} s; killed it",
        details={"worker_id": record.worker_id})


def list_workers() -> list[dict[str, Any]]:
    """Every recorded worker with its live state (dead pids shown as ``dead``)."""
    return [probe(record).to_dict() for record in records()]


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop(worker_id: str, *, grace: float = 30.0) -> WorkerRecord:
    """Graceful shutdown (drain), SIGKILL after ``grace``; forget the worker, keep its log.

    Only the worker's own process is signalled (:func:`running`): a record whose pid now
    belongs to another process is forgotten as ``dead`` and that process left alone.
    Called by ``rbees-pool worker stop``, ``rbees-pool down`` and pool-managerd's start.
    Raises :class:`NotFoundError` for an unknown worker."""
    import httpx

    record = load(worker_id)
    proc = find(record.pid, expected(record))

    def shutdown() -> bool:
        try:
            httpx.post(f"{record.uri}/v2/shutdown", timeout=2.0, headers=auth_headers(),
                       verify=client_context())
        except httpx.HTTPError:
            return False
        return True

    if proc is None:
        record.state = "dead"
    else:
        ended = terminate(proc, grace=grace, ask=shutdown)
        record.state = "killed" if ended == "killed" else "stopped"
    (worker_dir(worker_id) / "state.json").unlink(missing_ok=True)
    return record


def tail(worker_id: str, lines: int = 20) -> str:
    try:
        return "\n".join(log_path(worker_id).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def follow(worker_id: str, *, poll: float = 0.2) -> Iterator[str]:
    """Yield the log's lines, then new ones as they are written (until interrupted)."""
    path = log_path(worker_id)
    if not path.exists():
        raise NotFoundError(f"no log for worker {worker_id!r}", details={"worker_id": worker_id})
    with open(path, errors="replace") as log:
        while True:
            line = log.readline()
            if line:
                yield line.rstrip("\n")
            else:
                time.sleep(poll)
