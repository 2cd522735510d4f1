"""The authenticated tunnel a sharded worker reaches another pool's llama.cpp RPC server
through (issue 27). llama.cpp's RPC protocol has no authentication at all: whoever reaches a
server's port can read and write the device's memory. So servers bind loopback only
(:mod:`rbees_core.pool.rpc`), and a worker elsewhere reaches them through this:

- the pool's **gateway** (:func:`serve_gateway`, run by pool-managerd when ``[pool] rpc =
  true``) listens on the pool's address; it speaks TLS with the pool's certificate when the
  pool serves HTTPS. A connection must prove it holds the pool's control token: the gateway
  sends a fresh nonce, the client answers ``SERVER_ID HMAC-SHA256(token, nonce + server
  id)`` (the token never travels), and only then is it joined to that server's loopback
  port; anything else is closed after one ``NO`` line.
- the worker's **local end** (:class:`LocalEnd`) listens on ``127.0.0.1:0``; llama.cpp
  connects there as to any RPC server, and each connection is carried to the gateway. Its
  socket to the gateway has TCP keep-alive and a user timeout of
  :data:`DEAD_LINK_S`: when the link dies (a cut cable, a host gone) the tunnel closes
  llama.cpp's connection, ggml aborts the worker, and its pool reports it failed within a
  heartbeat or two, where TCP alone would wait for minutes.

Without TLS the link is authenticated when it opens but neither encrypted nor protected
against someone on the path taking it over afterwards (README, "Sharding", the threat model).
Pure asyncio; used by pool-managerd and rbees-workerd.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from rbees_core.errors import ModelLoadError

GREETING = b"RBEES-RPC/1 "
#: seconds of silence on a tunnel's link after which it counts as dead
#: (``RBEES_RPC_DEAD_LINK_S``: a lab whose heartbeats come every half second wants 0.5)
DEAD_LINK_S = 5.0


def dead_link_s() -> float:
    """:data:`DEAD_LINK_S`, or ``RBEES_RPC_DEAD_LINK_S`` (seconds, at least 0.2)."""
    import os

    try:
        return max(0.2, float(os.environ.get("RBEES_RPC_DEAD_LINK_S") or DEAD_LINK_S))
    except ValueError:
        return DEAD_LINK_S
#: the most a handshake may take
HANDSHAKE_S = 10.0


def proof(token: str, nonce: str, server_id: str) -> str:
    """What a client answers the gateway's nonce with."""
    return hmac.new(token.encode(), f"{nonce}{server_id}".encode(), hashlib.sha256).hexdigest()


def watch_link(sock: socket.socket | None) -> None:
    """TCP keep-alive and a user timeout on ``sock``: a dead link errors within about
    :data:`DEAD_LINK_S` seconds, busy or idle."""
    if sock is None:
        return
    dead = dead_link_s()
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, int(dead) - 1))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead * 1000))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                ended: list[int], side: int) -> None:
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        ended.append(side)  # which side ended first, before this close ends the other
        with contextlib.suppress(Exception):
            writer.close()


async def relay(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bool:
    """Copy both ways until either side ends; then close both. True when ``b`` ended
    first (or failed)."""
    ended: list[int] = []
    one = asyncio.ensure_future(_pipe(a[0], b[1], ended, 0))
    two = asyncio.ensure_future(_pipe(b[0], a[1], ended, 1))
    await asyncio.wait([one, two], return_when=asyncio.FIRST_COMPLETED)
    for w in (a[1], b[1]):
        with contextlib.suppress(Exception):
            w.close()
    for task in (one, two):
        task.cancel()
    return ended[:1] == [1]


async def serve_gateway(host: str, port: int, *, token: str,
                        target: Callable[[str], int | None],
                        ssl_context: ssl.SSLContext | None = None) -> asyncio.Server:
    """The pool's gateway on ``host:port`` (0: any free port): ``target(server_id)`` is the
    loopback port of a running RPC server (None: no such server). Returns the listening
    server (its port: ``server.sockets[0].getsockname()[1]``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = secrets.token_hex(16)
        try:
            writer.write(GREETING + nonce.encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), HANDSHAKE_S)
            server_id, _, answer = line.decode("ascii", "replace").strip().partition(" ")
            port = target(server_id)
            if not hmac.compare_digest(answer, proof(token, nonce, server_id)):
                raise PermissionError("bad proof")
            if port is None:
                raise LookupError(f"no RPC server {server_id}")
            inner = await asyncio.open_connection("127.0.0.1", port)
        except (OSError, ValueError, PermissionError, LookupError, asyncio.TimeoutError,
                ssl.SSLError) as exc:
            with contextlib.suppress(Exception):
                writer.write(b"NO " + str(exc).encode()[:200] + b"\n")
                await writer.drain()
                writer.close()
            return
        watch_link(writer.get_extra_info("socket"))
        writer.write(b"OK\n")
        await writer.drain()
        await relay((reader, writer), inner)

    return await asyncio.start_server(handle, host, port, ssl=ssl_context)


def parse_url(url: str) -> tuple[str, int, str, bool]:
    """``rbees-rpc://HOST:PORT/SERVER_ID`` (``rbees-rpcs://``: TLS) -> ``(host, port,
    server_id, tls)``; :class:`ModelLoadError` for anything else."""
    parts = urlsplit(url)
    server_id = parts.path.strip("/")
    if parts.scheme not in ("rbees-rpc", "rbees-rpcs") or not parts.hostname \
            or not parts.port or not server_id:
        raise ModelLoadError(f"bad RPC tunnel {url!r}: expected "
                             "rbees-rpc[s]://HOST:PORT/SERVER_ID", details={"rpc": url})
    return parts.hostname, parts.port, server_id, parts.scheme == "rbees-rpcs"


class LocalEnd:
    """A worker's end of a tunnel to ``url`` (:func:`parse_url`) with ``token``: listens
    on loopback; :attr:`endpoint` is what llama.cpp connects to."""

    def __init__(self, url: str, token: str, ssl_context: ssl.SSLContext | None = None,
                 on_dead: Callable[[str], None] | None = None) -> None:
        self.host, self.port, self.server_id, tls = parse_url(url)
        self.url = url
        self.token = token
        self.ssl_context = (ssl_context or ssl.create_default_context()) if tls else None
        self.on_dead = on_dead
        self.server: asyncio.Server | None = None
        self.endpoint = ""

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """One authenticated connection to the gateway; :class:`ModelLoadError` when it
        cannot be had."""
        opened: list[asyncio.StreamWriter] = []
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, ssl=self.ssl_context,
                server_hostname=self.host if self.ssl_context else None), HANDSHAKE_S)
            opened.append(writer)
            watch_link(writer.get_extra_info("socket"))
            greeting = await asyncio.wait_for(reader.readline(), HANDSHAKE_S)
            if not greeting.startswith(GREETING):
                raise OSError("not an rbees RPC gateway")
            nonce = greeting[len(GREETING):].decode().strip()
            writer.write(f"{self.server_id} {proof(self.token, nonce, self.server_id)}\n"
                         .encode())
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), HANDSHAKE_S)
        except (OSError, asyncio.TimeoutError, ssl.SSLError, UnicodeDecodeError) as exc:
            for w in opened:
                w.close()
            raise ModelLoadError(f"RPC tunnel {self.url}: {exc or type(exc).__name__}",
                                 details={"rpc": self.url}) from exc
        if answer != b"OK\n":
            writer.close()
            raise ModelLoadError(f"RPC tunnel {self.url} refused: "
                                 f"{answer.decode('utf-8', 'replace').strip() or 'closed'}",
                                 details={"rpc": self.url})
        return reader, writer

    async def start(self) -> str:
        """Check the gateway lets this worker in (raises :class:`ModelLoadError`), then
        listen; returns :attr:`endpoint`."""
        _, probe = await self.connect()
        probe.close()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                outer = await self.connect()
            except ModelLoadError as exc:
                writer.close()
                self._dead(exc.message)
                return
            with contextlib.suppress(Exception):
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                           socket.TCP_NODELAY, 1)
            if await relay((reader, writer), outer):
                self._dead("the link to the RPC server ended")

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.endpoint = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self.endpoint

    def _dead(self, why: str) -> None:
        if self.on_dead is not None:
            self.on_dead(why)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def open_tunnels(rpc: tuple[str, ...], token: str | None,
                       ssl_context: Any = None,
                       on_dead: Callable[[str], None] | None = None
                       ) -> tuple[tuple[str, ...], list[LocalEnd]]:
    """rbees-workerd's ``--rpc``: plain ``HOST:PORT`` entries as they are, tunnel URLs
    replaced by the loopback endpoint of a :class:`LocalEnd` each (started). Raises
    :class:`ModelLoadError` for a tunnel without ``token`` or one the gateway refuses."""
    endpoints: list[str] = []
    ends: list[LocalEnd] = []
    for entry in rpc:
        if "://" not in entry:
            endpoints.append(entry)
            continue
        if not token:
            raise ModelLoadError(f"RPC tunnel {entry} needs the pool's token "
                                 "(--rpc-token-file)", details={"rpc": entry})
        end = LocalEnd(entry, token, ssl_context, on_dead)
        endpoints.append(await end.start())
        ends.append(end)
    return tuple(endpoints), ends


__all__ = ["DEAD_LINK_S", "LocalEnd", "open_tunnels", "parse_url", "proof", "relay",
           "serve_gateway", "watch_link"]
