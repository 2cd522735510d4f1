"""pool-managerd's llama.cpp RPC servers: one device of this host lent to a sharded worker
(issue 27, ``[pool] rpc = true``).

Each server is a supervised process, ``python -m rbees_backend_llamacpp.rpc`` (the llamacpp
backend's :mod:`rbees_backend_llamacpp.rpc`, run by module name: the kernel never imports a
backend), bound to ``127.0.0.1`` on a port of its own. llama.cpp's RPC protocol has no
authentication, so a server never listens on another address; a worker of another host
reaches it through a tunnel rbees authenticates (README, "Sharding").

The memory the shard will hold is held in the pool's accounting from the start until the
server stops or fails (:meth:`RpcServers.held`, added to what the workers hold), so the
preflight of a worker or of another server and ``/v2/state``'s free bytes count it.
Everything here runs on pool-managerd's loop, as :mod:`rbees_core.pool.daemon`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from rbees_core.api.common import clip
from rbees_core.api.pool import LIVE_WORKER_STATES, RpcServerEntry, RpcStartRequest
from rbees_core.errors import ConflictError, NotFoundError
from rbees_core.files import open_private
from rbees_core.log import Logger
from rbees_core.pool import memory, workers

#: the module pool-managerd runs for a server (the llamacpp backend's)
SERVER_MODULE = "rbees_backend_llamacpp.rpc"
#: where every server listens (never anything else)
LOOPBACK = "127.0.0.1"
#: states whose memory stays reserved
LIVE = frozenset({"starting", "ready", "stopping"})


class RpcDisabledError(ConflictError):
    code = "RPC_DISABLED"


#: stopped or failed servers a pool keeps listing
ENDED_KEPT = 8


def _spawn(argv: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start a server process, its output into its own log (0600, as workers' logs)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open_private(log_file, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@attrs.define(eq=False)
class RpcServer:
    """One server: its process and what it reserves."""

    server_id: str
    device: str
    port: int
    memory_bytes: int
    proc: subprocess.Popen[bytes]
    started_at: float = attrs.field(factory=time.time)
    state: str = "starting"
    error: str | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def entry(self) -> RpcServerEntry:
        return RpcServerEntry(server_id=self.server_id, device=self.device,
                              endpoint=self.endpoint, state=self.state,  # type: ignore[arg-type]
                              memory_bytes=self.memory_bytes, pid=self.proc.pid,
                              started_at=self.started_at, error=self.error)


def server_argv(device: str, port: int, threads: int | None) -> list[str]:
    """The server's command line (loopback, one device)."""
    return [sys.executable, "-m", SERVER_MODULE, "--host", LOOPBACK, "--port", str(port),
            "--device", device, "--threads", str(threads or 1)]


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` listens on ``LOOPBACK:port`` (its own socket: another
    program on that port does not count, and no connection is made to find out)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") \
            else proc.connections("tcp")
    except (psutil.Error, OSError):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in conns)


class RpcServers:
    """The RPC servers of ``pool`` (its :class:`rbees_core.pool.daemon.PoolService`).
    ``enabled``: ``[pool] rpc``; ``changed`` is called when a server's state changes on its
    own (the pool sends its next heartbeat at once)."""

    def __init__(self, pool: Any, *, enabled: bool, changed: Callable[[], None],
                 ready_timeout_s: float = 30.0) -> None:
        self.pool = pool
        self.enabled = enabled
        self.log: Logger = pool.log
        self.changed = changed
        self.ready_timeout_s = ready_timeout_s
        self.servers: dict[str, RpcServer] = {}
        #: the authenticated tunnel's pool end (rbees_core.rpc_tunnel), started with the
        #: first supervision pass; its URL is rbees-rpc[s]://HOST:PORT
        self.gateway: asyncio.Server | None = None
        self.gateway_url: str | None = None
        #: False once a pass found no control token to open the gateway with (tried again
        #: every pass, but no reason to pass every POLL_S for it: :meth:`polled`)
        self._gateway_possible = True

    def entries(self) -> list[RpcServerEntry]:
        return [attrs.evolve(s.entry(), tunnel=f"{self.gateway_url}/{s.server_id}"
                             if self.gateway_url else None) for s in self.servers.values()]

    def held(self) -> Iterable[tuple[str, str, int]]:
        """``(device, state, memory_bytes)`` of the live servers for
        :func:`rbees_core.pool.memory.held_on`: each as a loaded worker, from its start (the
        pool's capacity less what it holds, the view that counts memory a process has not
        touched yet: a shard's weights arrive only when its worker loads)."""
        return [(s.device, "ready", s.memory_bytes) for s in self.servers.values()
                if s.state in LIVE]

    def get(self, server_id: str) -> RpcServer:
        try:
            return self.servers[server_id]
        except KeyError:
            raise NotFoundError(f"no RPC server {server_id!r} in this pool",
                                details={"server_id": server_id}) from None

    async def start(self, req: RpcStartRequest) -> RpcServer:
        """``POST /v2/rpc/start``: a server for ``req.device``, reserving
        ``req.memory_bytes`` there. Under the pool's lock, as a worker's start: it must fit
        what the pool offers (:func:`memory.check_fits` under its limit with what its
        ``held`` says the device holds; 409 ``INSUFFICIENT_RAM``/``_VRAM``). Raises
        :class:`RpcDisabledError` without ``[pool] rpc``. Returns at once; the server turns
        ``ready`` once it listens (:meth:`supervise`)."""
        if not self.enabled:
            raise RpcDisabledError("this pool lends no device over RPC; set [pool] rpc = true",
                                   details={"device": req.device})
        async with self.pool._lock:
            return await self._start(req)

    async def _start(self, req: RpcStartRequest) -> RpcServer:
        pool, need = self.pool, req.memory_bytes
        # the fit check probes the devices (NVML on a GPU host) and the spawn forks: both
        # off the event loop, as a worker's start does them (heartbeats go on meanwhile)
        await asyncio.to_thread(
            memory.check_fits, pool.pm, f"an RPC server of {need / 2**20:.0f} MiB",
            {req.device: need}, req.device, pool.estimates.limit, pool.held)
        used = {s.port for s in self.servers.values() if s.state in LIVE} | {
            w.record.port for w in pool.workers.values() if w.state in LIVE_WORKER_STATES}
        port = await asyncio.to_thread(workers.pick_port, used, LOOPBACK)
        sid = self._new_id(req.device)
        log_file = workers.workers_dir() / f"{sid}.log"
        proc = await asyncio.to_thread(_spawn, server_argv(req.device, port, req.threads),
                                       log_file)
        server = RpcServer(server_id=sid, device=req.device, port=port,
                           memory_bytes=req.memory_bytes, proc=proc)
        self.servers[sid] = server
        self.pool.look_now.set()  # the supervision loop watches it come up from now on
        self.log.info("rpc_server_starting", server_id=sid, device=req.device, port=port,
                      pid=proc.pid, memory_bytes=req.memory_bytes)
        return server

    def _new_id(self, device: str) -> str:
        kind = device.partition(":")[0]
        n = 0
        while f"rpc-{kind}-{n}" in self.servers:
            n += 1
        return f"rpc-{kind}-{n}"

    async def open_gateway(self) -> None:
        """Start the gateway (:func:`rbees_core.rpc_tunnel.serve_gateway`) on the pool's
        address, with its certificate when it serves HTTPS, letting in who proves the pool's
        control token. Without a token (a pool with no credential at all) there is no
        gateway: its servers are reachable from this host alone."""
        from rbees_core.pool import credentials
        from rbees_core.rpc_tunnel import serve_gateway

        settings = self.pool.settings
        token = credentials.control_token(settings)
        self._gateway_possible = bool(token)
        if not self.enabled or self.gateway is not None or not token:
            return
        context = None
        if settings.tls is not None:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(settings.tls.cert, settings.tls.key)

        def target(server_id: str) -> int | None:
            s = self.servers.get(server_id)
            return s.port if s is not None and s.state == "ready" else None

        host = settings.worker_host
        self.gateway = await serve_gateway(host, 0, token=token, target=target,
                                           ssl_context=context)
        port = self.gateway.sockets[0].getsockname()[1]
        self.gateway_url = f"rbees-rpc{'s' if context else ''}://{workers.host_port(host, port)}"
        self.log.info("rpc_gateway", url=self.gateway_url)

    def polled(self) -> bool:
        """Whether :meth:`supervise` has something to look at every pass: a gateway to open,
        a server starting, running or stopping."""
        return (self.enabled and self.gateway is None and self._gateway_possible) or any(
            s.state in LIVE for s in self.servers.values())

    async def supervise(self) -> None:
        """One pass of the pool's supervision loop: a starting server that listens is
        ready (one that does not within ``ready_timeout_s`` is killed and failed), a server
        whose process exited is failed (its memory released in the same step)."""
        if self.enabled and self.gateway is None:
            await self.open_gateway()
        self._forget_ended()
        for s in list(self.servers.values()):
            if s.state not in LIVE:
                continue
            code = s.proc.poll()
            if code is not None:
                if s.state == "stopping":
                    s.state = "stopped"
                    self.log.info("rpc_server_stopped", server_id=s.server_id)
                else:
                    self._fail(s, f"RPC server exited with {code}")
                self.changed()
            elif s.state == "starting":
                if await asyncio.to_thread(listening, s.proc.pid, s.port):
                    s.state = "ready"
                    self.log.info("rpc_server_ready", server_id=s.server_id,
                                  endpoint=s.endpoint)
                    self.changed()
                elif time.time() - s.started_at > self.ready_timeout_s:
                    s.proc.kill()
                    self._fail(s, f"not listening after {self.ready_timeout_s:.0f} s; killed")
                    self.changed()

    def _forget_ended(self) -> None:
        """Keep the :data:`ENDED_KEPT` latest stopped or failed servers (for ``/v2/state``
        to show why), not every one since the pool started."""
        workers.forget_ended(self.servers, LIVE, ENDED_KEPT)

    def _fail(self, s: RpcServer, message: str) -> None:
        s.state, s.error = "failed", clip(message)
        self.log.error("rpc_server_failed", server_id=s.server_id, message=message)

    async def stop(self, server_id: str, grace: float = 5.0) -> RpcServer:
        """Stop a server (SIGTERM, SIGKILL after ``grace``); its memory is released once its
        process is gone. A server not running is returned as it is."""
        s = self.get(server_id)
        if s.state not in LIVE:
            return s
        s.state = "stopping"
        s.proc.terminate()
        deadline = time.monotonic() + grace
        while s.proc.poll() is None:
            if time.monotonic() > deadline:
                s.proc.kill()
            await asyncio.sleep(0.05)
        s.state = "stopped"
        self.log.info("rpc_server_stopped", server_id=server_id, exit_code=s.proc.returncode)
        return s

    async def stop_all(self) -> None:
        if self.gateway is not None:
            self.gateway.close()
        await asyncio.gather(*(self.stop(sid) for sid, s in list(self.servers.items())
                               if s.state in LIVE), return_exceptions=True)


def held_with(device: str, worker_held: Iterable[tuple[str, str, int]],
              servers: RpcServers) -> memory.Held:
    """What ``device`` holds for the pool: its live workers and its live RPC servers."""
    return memory.held_on(device, [*worker_held, *servers.held()])


__all__ = ["RpcDisabledError", "RpcServer", "RpcServers", "held_with"]
