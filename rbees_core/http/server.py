"""Serving a daemon's app: the listening socket, the event loop, uvicorn, the bind policy.

:func:`serve` runs an ASGI app under uvicorn until a shutdown event is set; the process
around it (pid file, signals, errors) is :mod:`rbees_core.http.daemon`'s.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import socket
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbees_core.errors import ConfigError
from rbees_core.tls import ServerTLS

T = TypeVar("T")


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--bind {bind!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_policy(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token of at least 16 characters."""
    if not is_loopback(host) and (token is None or len(token) < 16):
        raise ConfigError(
            f"refusing to bind {host} without an API token of at least 16 characters "
            "(set RBEES_API_TOKEN or --api-token-file)"
        )


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (OSError when it cannot bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it a response written in two parts waits for the client's delayed ACK (40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def run_daemon(main: Coroutine[Any, Any, T]) -> T:
    """Run a daemon's ``main`` on uvloop's event loop where it is installed (Linux, macOS),
    else on asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def notify_ready() -> bool:
    """Tell systemd the daemon serves (``sd_notify(READY=1)``) when it runs as a
    ``Type=notify`` service: one datagram to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for
    an abstract socket), which is then removed from the environment so that the processes
    this one starts (a pool's workers) do not speak for it. Whether a message went; an
    unreachable socket is not an error (systemd then times the start out). Called by
    :class:`rbees_core.http.Daemon` once the app's start-up is complete."""
    import os

    address = os.environ.pop("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
            sock.sendall(f"READY=1\nSTATUS=serving\nMAINPID={os.getpid()}\n".encode())
    except OSError:
        return False
    return True


async def serve(app: ASGIApp, host: str, port: int, shutdown: asyncio.Event, *,
                on_ready: Callable[[], object] | None = None,
                tls: ServerTLS | None = None) -> None:
    """Serve ``app`` until ``shutdown`` is set, then finish the requests in flight (5 s at
    most). Raises OSError when ``host:port`` cannot be bound and re-raises what made the
    app's lifespan startup fail.

    uvicorn with httptools' HTTP/1.1 parser: an admission through it costs about half what
    it costs through a pure-Python parser (docs/benchmarks.md, rbees-orcd). The daemon owns
    its signals, so the server installs no handler of its own. ``on_ready`` is called once
    the app's start-up is complete (the socket listens already). ``tls``: serve HTTPS with
    that certificate (:func:`rbees_core.tls.server_tls` checked it).
    """
    import uvicorn

    failure: list[BaseException] = []

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def started(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                collector.start()
                if on_ready is not None:
                    on_ready()
            await send(message)

        try:
            await app(scope, receive, started)
        except BaseException as exc:
            failure.append(exc)
            raise

    collector = FullCollections()
    sock = listen(host, port)
    config = uvicorn.Config(
        guarded, lifespan="on", http="httptools", ws="none", loop="none",
        log_config=None, log_level="error", access_log=False, server_header=False,
        # the daemons' clients (rbees-orcd's pool and worker clients, SDKs) keep their
        # connections for a long time
        timeout_keep_alive=75, timeout_graceful_shutdown=5,
        ssl_certfile=tls.cert if tls is not None else None,
        ssl_keyfile=tls.key if tls is not None else None,
    )
    server = _server_class()(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopping = asyncio.create_task(shutdown.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        server.exit_now.set()
        await serving
    finally:
        stopping.cancel()
        collector.stop()
        sock.close()
    if failure and not server.started:
        raise failure[0]


class FullCollections:
    """A daemon's full garbage collections run once a minute, not when allocations say.

    CPython collects its oldest generation whenever the objects that survived into it
    have grown by a quarter; a daemon whose heap grows (rbees-orcd with thousands of
    queued jobs) then pauses for a walk of the whole heap again and again, 5-15 ms each
    with 5,000 jobs, which is what set p99 of its admissions (docs/benchmarks.md). Young
    generations are still collected as usual, so most cyclic garbage goes there; what
    reaches the oldest waits for the next minute. What exists at startup (modules,
    plugins, the app) lives as long as the daemon and is frozen out of every collection;
    reference counting still frees it.
    """

    INTERVAL_S = 60.0

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._threshold = gc.get_threshold()

    def start(self) -> None:
        gc.freeze()
        young, middle, _ = self._threshold
        gc.set_threshold(young, middle, 2**31 - 1)  # never by count
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL_S)
            gc.collect()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            gc.set_threshold(*self._threshold)
            gc.unfreeze()


#: How often an idle server wakes (uvicorn's own loop: every 0.1 s): to refresh the Date
#: header, which changes once a second. :func:`serve` wakes it at once to exit.
TICK_S = 1.0


def _server_class() -> Any:
    """uvicorn's server without its signal handlers, its failed start-up not a SystemExit,
    its idle loop woken once a second rather than ten times.

    The overrides are of undocumented methods: pyproject.toml pins uvicorn exactly, and
    tests/test_library_internals.py checks them against the installed version."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            #: set with ``should_exit`` by :func:`serve`: the main loop ends at once
            self.exit_now = asyncio.Event()

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the daemon's own handlers set ``shutdown``

        async def main_loop(self) -> None:
            # uvicorn's loop sleeps 0.1 s between ticks, and does its work (the Date
            # header, should_exit) on every tenth: ten wake-ups a second in every idle
            # daemon and worker. A tick whose count is a multiple of ten does all of it.
            counter = 0
            while not await self.on_tick(counter):
                counter = (counter + 10) % 864_000
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.exit_now.wait(), TICK_S)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().startup(sockets)
            except SystemExit:  # a failed lifespan startup: serve() raises its error
                self.should_exit = True

    return Server


