"""rbees-workerd's life after it listens: pick the backend, load the model (progress for
``/v2/loading/progress``), build the engine (or the embedder), call the pool back, and drain
(``POST /v2/shutdown``, SIGTERM). Split from :mod:`rbees_core.programs.workerd`, which
composes the routes and the command; ``st`` is its ``WorkerState``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import pluggy

from rbees_core import plugins
from rbees_core.api.worker import ReadyCallback
from rbees_core.backend import Backend, offload_args
from rbees_core.embedder import Embedder
from rbees_core.engine import Engine
from rbees_core.errors import BackendUnavailableError, RbeesError, UnknownPluginError
from rbees_core.models import resolve_model
from rbees_core.programs import worker_embed, worker_prompt
from rbees_core.programs.worker_state import WorkerState
from rbees_core.tls import client_context


def pick_backend(pm: pluggy.PluginManager, name: str, device: str) -> Backend:
    try:
        cls = plugins.lookup(pm, plugins.BACKENDS, name)
    except UnknownPluginError as exc:  # the contract's code for it
        raise BackendUnavailableError(exc.message, details={"backend": name}) from exc
    kind = device.partition(":")[0]
    if kind not in cls.available_devices():
        raise BackendUnavailableError(
            f"backend {name!r} cannot use device {kind!r} here "
            f"(available: {', '.join(cls.available_devices())})",
            details={"backend": name, "device": device})
    backend: Backend = cls()
    return backend


async def load_model(st: WorkerState) -> None:
    s = st.settings
    loop = asyncio.get_running_loop()

    def progress(stage: str, fraction: float) -> None:
        def apply() -> None:
            st.stage, st.fraction = stage, fraction
        loop.call_soon_threadsafe(apply)

    t0 = time.perf_counter()
    try:
        backend = await asyncio.to_thread(pick_backend, st.pm, s.backend, s.device)
        path = resolve_model(st.pm, s.model_ref)
        load: Callable[..., Any] = \
            functools.partial(worker_embed.load, backend) if s.embedding else backend.load
        offload = offload_args(backend, s.device, s.n_gpu_layers, s.tensor_split,
                               await open_rpc(st))
        model = await asyncio.to_thread(load, path, device=s.device, slots=s.slots, ctx=s.ctx,
                                        threads=s.threads, progress=progress, **offload)
    except RbeesError as exc:
        st.error = exc
        st.set_state("failed")
        st.log.error("load_failed", code=exc.code, message=exc.message)
        st.exit_code = 1
        await asyncio.sleep(0.3)  # let progress listeners read the error
        st.shutdown.set()
        return
    if s.chat_template is not None and not s.embedding:
        worker_prompt.override_template(model, s.chat_template, s.model_ref)
    engine: Engine | Embedder = Embedder(model, slots=s.slots, observer=st.metrics) \
        if s.embedding else Engine(model, slots=s.slots, model_name=s.model_ref,
                                   worker_id=s.worker_id, observer=st.metrics)
    engine.start()
    st.metrics.loaded(slots=s.slots, memory_bytes=model.memory_bytes,
                      seconds=time.perf_counter() - t0)
    st.engine = engine
    st.stage, st.fraction = "ready", 1.0
    st.set_state("ready")
    st.log.info("ready", model=s.model_ref, backend=s.backend, device=s.device,
                slots=s.slots, embedding=s.embedding, memory_bytes=model.memory_bytes,
                load_s=round(time.perf_counter() - t0, 3))
    if s.callback_url:
        await call_back(st, model.memory_kind)


async def open_rpc(st: WorkerState) -> tuple[str, ...]:
    """``--rpc`` with each tunnel URL replaced by its local end (:mod:`rbees_core.rpc_tunnel`);
    a tunnel whose link dies ends the process (ggml would abort at its next use of the
    shard anyway), so that its pool reports it failed at once. Raises
    :class:`rbees_core.errors.ModelLoadError` for a gateway that refuses or is not there."""
    from rbees_core.rpc_tunnel import open_tunnels

    if not any("://" in e for e in st.settings.rpc):
        return st.settings.rpc
    from rbees_core.tls import client_context

    def dead(why: str) -> None:
        if st.state not in ("draining", "stopped"):
            st.log.error("rpc_link_lost", message=why)
            os._exit(70)

    endpoints, st.tunnels = await open_tunnels(st.settings.rpc, st.settings.rpc_token,
                                               client_context(), on_dead=dead)
    return endpoints


async def call_back(st: WorkerState, memory_kind: str) -> None:
    s = st.settings
    assert st.engine is not None
    body = ReadyCallback(worker_id=s.worker_id, model_ref=s.model_ref, backend=s.backend,
                         device=s.device, uri=st.uri, slots_total=s.slots,
                         memory_bytes=st.engine.model.memory_bytes,
                         memory_kind=memory_kind, pid=os.getpid(),  # type: ignore[arg-type]
                         embedding=s.embedding)
    credential = s.callback_token or s.token or s.control_token
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    try:
        async with httpx.AsyncClient(timeout=s.callback_timeout_s,
                                     verify=client_context()) as client:
            answer = await client.post(s.callback_url or "", json=attrs.asdict(body),
                                       headers=headers)
        if answer.status_code >= 300:
            raise RbeesError(f"ready callback refused with {answer.status_code}: "
                             f"{answer.text[:200]}")
    except (httpx.HTTPError, RbeesError) as exc:
        st.log.error("ready_callback_failed", url=s.callback_url, error=str(exc))
        st.exit_code = 3
        begin_drain(st)
        return
    st.log.info("ready_callback_sent", url=s.callback_url)


def begin_drain(st: WorkerState) -> None:
    """Refuse new work, let running jobs finish, then stop serving (idempotent)."""
    if st.state in ("draining", "stopped"):
        return
    st.set_state("draining")
    st.log.info("draining")
    if st.engine is not None:
        st.engine.drain()

    async def wait_idle() -> None:
        deadline = time.monotonic() + st.settings.drain_timeout_s
        while st.engine is not None and (not st.engine.idle or st.streams) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if st.engine is not None:
            await asyncio.to_thread(st.engine.stop)
        last = time.monotonic() + 2.0  # the stopped jobs' error frames, or a client gone
        while st.streams and time.monotonic() < last:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # let the last bytes leave
        st.set_state("stopped")
        st.shutdown.set()

    asyncio.get_running_loop().create_task(wait_idle())
