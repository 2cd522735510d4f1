"""rbees-workerd's settings and the state its routes and its lifecycle share
(:mod:`rbees_core.programs.workerd`, :mod:`rbees_core.programs.worker_lifecycle`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import attrs
import pluggy

from rbees_core.api.worker import ReadyState, WorkerStateName
from rbees_core.embedder import Embedder
from rbees_core.engine import Engine
from rbees_core.errors import RbeesError
from rbees_core.log import Logger
from rbees_core.programs.worker_metrics import WorkerMetrics
from rbees_core.tls import ServerTLS, scheme


@attrs.define
class WorkerSettings:
    worker_id: str
    model_ref: str
    backend: str
    device: str
    host: str
    port: int
    slots: int
    ctx: int | None
    threads: int | None
    callback_url: str | None
    token: str | None
    drain_timeout_s: float = 30.0
    callback_timeout_s: float = 10.0
    embedding: bool = False  # --embedding: serves POST /v2/embed (worker_embed)
    #: --control-token-file: its pool's control token (rbees_core.auth.control_token), what
    #: rbees-orcd and the pool send it; accepted beside ``token``
    control_token: str | None = None
    #: --callback-token-file: its own token from its pool, sent with its ready callback
    callback_token: str | None = None
    #: the text of --chat-template-file: replaces the model's own template
    chat_template: str | None = None
    #: --n-gpu-layers / --tensor-split: a model larger than one GPU (rbees_core.planning)
    n_gpu_layers: int | None = None
    tensor_split: tuple[float, ...] | None = None
    #: --tls-cert / --tls-key: serve HTTPS (its pool's certificate)
    tls: ServerTLS | None = None
    #: --rpc: llama.cpp RPC servers (HOST:PORT, loopback or a tunnel's local end) whose
    #: devices hold part of the model, after this host's (a sharded worker)
    rpc: tuple[str, ...] = ()
    #: --rpc-token-file: the lending pool's control token, for --rpc tunnel URLs
    #: (rbees-rpc[s]://HOST:PORT/SERVER_ID, rbees_core.rpc_tunnel)
    rpc_token: str | None = None


@attrs.define(eq=False)
class WorkerState:
    """Everything the worker's routes share. Mutated only on the event loop thread."""

    settings: WorkerSettings
    pm: pluggy.PluginManager
    log: Logger
    metrics: WorkerMetrics
    state: WorkerStateName = "loading"
    stage: str = "start"
    fraction: float = 0.0
    error: RbeesError | None = None
    engine: Engine | Embedder | None = None  # an Embedder in embedding mode
    started: float = attrs.field(factory=time.monotonic)
    shutdown: asyncio.Event = attrs.field(factory=asyncio.Event)
    exit_code: int = 0
    #: execute streams not yet over: a drain waits for their last frames, not only for
    #: the engine's slots (a slot is free before its job's end event is written)
    streams: int = 0
    #: the local ends of its --rpc tunnels (rbees_core.rpc_tunnel.LocalEnd), kept open
    tunnels: list[Any] = attrs.field(factory=list)

    @property
    def uri(self) -> str:
        host = self.settings.host
        where = f"{'[' + host + ']' if ':' in host else host}:{self.settings.port}"
        return f"{scheme(self.settings.tls)}://{where}"

    def set_state(self, state: WorkerStateName) -> None:
        self.state = state
        self.metrics.set_state(state)

    def ready_state(self) -> ReadyState:
        s = self.settings
        if self.engine is None:
            return ReadyState(ready=False, state=self.state, model=s.model_ref, backend=s.backend,
                              device=s.device, progress=round(self.fraction, 4),
                              embedding=s.embedding)
        free = self.engine.slots_free
        state = self.state
        if state in ("ready", "busy"):
            state = "ready" if free else "busy"
        return ReadyState(
            ready=state in ("ready", "busy"), state=state, model=s.model_ref,
            backend=s.backend, device=s.device, slots_total=self.engine.slots, slots_free=free,
            memory_bytes=self.engine.model.memory_bytes, embedding=s.embedding,
        )
