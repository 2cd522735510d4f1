"""bench/worker.py's case ``s`` (issue 27): one model sharded over two llama.cpp RPC servers
on loopback against the same model unsharded, in the same run, and the network round trips
a generated token costs.

  Wu   rbees-workerd, unsharded, one stream (the reference of this case)
  Wuk  the same, TTFT of a long prompt no cache holds
  S2   rbees-workerd --rpc A,B --tensor-split 1,1,1: a third of the layers here, a third on
       each RPC server (``python -m rbees_backend_llamacpp.rpc``), one stream
  S2k  the same, TTFT of a long prompt no cache holds

The two are alternated sample by sample so that a busy machine weighs on both alike. Round
trips: a second sharded worker reaches the same servers through a counting relay (a
thread per connection, TCP_NODELAY both ways) that counts each turn of the conversation from
the server's answer back to the worker's next request; the count over a stream of N tokens
less that over a stream of 1 token, divided by N - 1, is the round trips per generated token
(every server together). The relay is used for that count only, never for the timings.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from rbees_core.testing import find_free_port

RPC_MODULE = "rbees_backend_llamacpp.rpc"


@contextlib.contextmanager
def rpc_servers(n: int, threads: int) -> Iterator[list[str]]:
    """``n`` RPC servers of this host's CPU on loopback; their endpoints."""
    procs: list[subprocess.Popen[bytes]] = []
    endpoints: list[str] = []
    try:
        for _ in range(n):
            port = find_free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", RPC_MODULE, "--port", str(port), "--threads",
                 str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            endpoints.append(f"127.0.0.1:{port}")
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if procs[-1].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"RPC server on {port} did not start") from None
                    time.sleep(0.1)
        yield endpoints
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


class Relay:
    """A loopback TCP relay to ``target`` that counts round trips: how many times data
    flowed to the client and then the client spoke again."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.turns = 0
        self._answered = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                with self._lock:
                    if request and self._answered:
                        self.turns += 1
                        self._answered = False
                    elif not request:
                        self._answered = True
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def bench_shard(tokens: int, threads: int, runs: int, long_words: int) -> list[Any]:
    """The rows Wu, S2, S2k and the round trips per token (a row of its own, ``S2rt``)."""
    from sidebyside import MESSAGES, Stream, long_messages, median_of
    from worker import Result, Worker, from_stream, salt

    share = "1,1,1"
    with rpc_servers(2, threads) as endpoints:
        with Worker(threads, 1) as whole, Worker(
                threads, 1, extra=("--rpc", ",".join(endpoints), "--tensor-split",
                                   share)) as sharded:
            plain: list[Stream] = []
            shard: list[Stream] = []
            for _ in range(runs + 1):  # the first of each is median_of's warm-up
                plain.append(whole.stream(MESSAGES, tokens))
                shard.append(sharded.stream(MESSAGES, tokens))
            long = median_of(runs, lambda: sharded.stream(long_messages(long_words,
                                                                        salt()), 4))
            whole_long = median_of(runs, lambda: whole.stream(long_messages(long_words,
                                                                            salt()), 4))
        relays = [Relay(e) for e in endpoints]
        try:
            with Worker(threads, 1, extra=("--rpc", ",".join(r.endpoint for r in relays),
                                           "--tensor-split", share)) as counted:
                def turns(n: int) -> tuple[int, int]:
                    before = sum(r.turns for r in relays)
                    s = counted.stream(MESSAGES, n)
                    return sum(r.turns for r in relays) - before, s.tokens

                turns(tokens)  # warm-up: the prompt's cache is filled as in the timed runs
                one, _ = turns(1)
                many, n = turns(tokens)
        finally:
            for r in relays:
                r.close()
    per_token = (many - one) / max(1, n - 1)
    it, sit = iter(plain), iter(shard)
    label = f"--rpc (2 servers on loopback) --tensor-split {share}"
    return [from_stream("Wu", "rbees-workerd unsharded, 1 stream (case s's reference)",
                        median_of(runs, lambda: next(it))),
            Result("Wuk", f"the same, {long_words}-word prompt (TTFT)", None,
                   whole_long.ttft_ms, whole_long.tokens),
            from_stream("S2", f"rbees-workerd {label}, 1 stream",
                        median_of(runs, lambda: next(sit))),
            Result("S2k", f"the same, {long_words}-word prompt (TTFT)", None, long.ttft_ms,
                   long.tokens),
            Result("S2rt", f"network round trips per generated token: {per_token:.1f} "
                   f"(all servers; {many} over {n} tokens, {one} for 1)", None, None, n)]
