"""A small pool of persistent processes, each running one Starlark policy (POSIX only).

Why processes: a Starlark loop can be cancelled cooperatively, but one huge allocation or a
runaway conversion cannot, and memory can only be capped per process. So each sandbox is a
child process that limits its own address space (``RLIMIT_AS``/``RLIMIT_DATA``) and cancels
its evaluation a little before the deadline; the parent waits for the answer until the
deadline and kills the child (SIGKILL) when it is late or dies. A replacement starts at once
(about 50 ms until it has loaded the script) while the other process of the pool serves the
next calls, so a failing call costs no more than its budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("_child.py")
#: A sandbox's answer larger than this is garbage (a decision is a few hundred bytes).
MAX_REPLY_BYTES = 1 << 20
# A Rust panic (an allocation over the memory cap) would spend 100+ ms printing a backtrace
# nobody reads before the process ends.
_CHILD_ENV = {**os.environ, "RUST_BACKTRACE": "0", "RUST_LIB_BACKTRACE": "0"}


class SandboxError(Exception):
    """A call did not produce a result; ``reason`` is one of ``timeout``, ``memory``,
    ``error``, ``garbage``, ``crash``, ``unavailable``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _Child:
    """One sandbox process and the two ends of its pipes."""

    def __init__(self, init: bytes, memory_bytes: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(CHILD), str(memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True, env=_CHILD_ENV,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.w = self.proc.stdin.fileno()
        self.r = self.proc.stdout.fileno()
        os.set_blocking(self.w, False)
        self.out = bytearray(_frame(init))
        self.buf = bytearray()
        self.ready = False
        self.error: str | None = None  # why the script did not load
        self.sent: list[dict[str, Any]] = []  # copies of the pools this child holds

    def flush(self, deadline: float) -> None:
        """Write what is pending, waiting for the pipe until ``deadline``."""
        while self.out:
            try:
                n = os.write(self.w, self.out)
                del self.out[:n]
                continue
            except BlockingIOError:
                pass
            except BrokenPipeError as exc:
                raise EOFError from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            select.select([], [self.w], [], remaining)

    def read_frame(self, deadline: float) -> bytes:
        """The next frame; TimeoutError at ``deadline``, EOFError when the child is gone."""
        while True:
            if len(self.buf) >= 4:
                (size,) = struct.unpack(">I", self.buf[:4])
                if size > MAX_REPLY_BYTES:
                    raise SandboxError("garbage", f"the script's answer is over {size} bytes")
                if len(self.buf) >= 4 + size:
                    body = bytes(self.buf[4:4 + size])
                    del self.buf[:4 + size]
                    return body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            readable, _, _ = select.select([self.r], [], [], remaining)
            if not readable:
                raise TimeoutError
            chunk = os.read(self.r, 65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def poll_ready(self, deadline: float) -> bool:
        """Whether the script has loaded (waiting until ``deadline``); sets :attr:`error`
        when it failed to."""
        if self.ready:
            return True
        if self.error is not None:
            return False
        try:
            self.flush(deadline)
            reply = json.loads(self.read_frame(deadline))
        except TimeoutError:
            return False
        except (EOFError, SandboxError, ValueError):
            self.error = f"the sandbox process exited ({self.returncode()})"
            return False
        if reply.get("ok"):
            self.ready = True
        else:
            self.error = str(reply.get("error"))
        return self.ready

    def returncode(self) -> str:
        try:
            code = self.proc.wait(timeout=0.005)
        except subprocess.TimeoutExpired:
            return "still running"
        if code == -signal.SIGABRT:
            return "aborted: out of memory"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def reap(self, timeout: float) -> bool:
        """Close the pipes and collect the exit status; False if it is still running."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return True


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Sandbox:
    """``processes`` children running ``source``; :meth:`call` asks one of them to decide.

    Thread-safe (calls are serialised). Call :meth:`close` to stop the children.
    """

    def __init__(self, source: str, filename: str, *, processes: int = 2,
                 memory_bytes: int = 256 << 20, load_timeout_s: float = 5.0) -> None:
        if os.name != "posix":  # select() on pipes and rlimits
            raise OSError("the script scheduler's sandbox needs a POSIX system")
        self.source = source
        self.filename = filename
        self.memory_bytes = memory_bytes
        self.load_timeout_s = load_timeout_s
        self._lock = threading.Lock()
        self._slots: list[_Child | None] = [None] * max(1, processes)
        self._dead: list[_Child] = []
        self._closed = False

    def _spawn(self) -> _Child:
        init = pickle.dumps({"source": self.source, "filename": self.filename,
                             "deadline": time.monotonic() + self.load_timeout_s})
        return _Child(init, self.memory_bytes)

    def start(self) -> None:
        """Start the missing children (returns at once; see :meth:`wait_ready`)."""
        with self._lock:
            self._fill()

    def _fill(self) -> None:
        for i, child in enumerate(self._slots):
            if child is None:
                self._slots[i] = self._spawn()

    def wait_ready(self, timeout: float) -> None:
        """Wait until every child has loaded the script.

        Raises :class:`SandboxError` (reason ``error``) with the script's load error, or
        (``unavailable``) when no child is ready in time.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._fill()
            for child in self._slots:
                assert child is not None
                if not child.poll_ready(deadline):
                    if child.error is not None:
                        raise SandboxError("error", child.error)
                    raise SandboxError("unavailable",
                                       f"the sandbox did not load the script in {timeout:g} s")

    def _retire(self, child: _Child) -> None:
        """Kill ``child`` and have a replacement started as soon as the current call has
        returned (on a thread: starting a process can take milliseconds on a busy machine,
        which the failing call cannot spare)."""
        child.kill()
        self._dead.append(child)
        self._slots = [None if c is child else c for c in self._slots]
        if not self._closed:
            threading.Thread(target=self._refill, name="rbees-sandbox-refill",
                             daemon=True).start()

    def _refill(self) -> None:
        with self._lock:
            if not self._closed:
                self._fill()

    def _reap(self) -> None:
        self._dead = [c for c in self._dead if not c.reap(0)]

    def _acquire(self, deadline: float) -> _Child:
        self._reap()
        self._fill()
        children = [c for c in self._slots if c is not None]
        for child in children:
            if child.ready or child.poll_ready(0):
                return child
        for child in children:
            if child.error is not None:
                self._retire(child)
        waiting = [c for c in children if c.error is None]
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select([c.r for c in waiting], [], [],
                                           max(0.0, deadline - time.monotonic()))
            for child in waiting:
                if child.r in readable and child.poll_ready(deadline):
                    return child
            waiting = [c for c in waiting if c.error is None]
        raise SandboxError("unavailable", "no sandbox process was ready in time")

    def call(self, request: dict[str, Any], deadline: float) -> Any:
        """Send ``request`` and return the script's result.

        ``request`` holds ``snapshot`` (its pools are sent as changes since the child last
        saw them, its queue never), ``queue`` (the queue, or None) and ``call``. Raises
        :class:`SandboxError`; a late or dead child is killed and replaced.
        """
        with self._lock:
            if self._closed:
                raise SandboxError("unavailable", "the sandbox is closed")
            child = self._acquire(deadline)
            pools = request["snapshot"].get("pools") or []
            sent = child.sent
            changed = {i: pool for i, pool in enumerate(pools)
                       if i >= len(sent) or sent[i] != pool}
            snapshot = {k: v for k, v in request["snapshot"].items()
                        if k not in ("pools", "queue")}
            # the child stops itself a little early so that its answer arrives in time
            body = pickle.dumps({**request, "snapshot": snapshot, "deadline": deadline - 0.004,
                                 "pools": {"count": len(pools), "changed": changed}},
                                protocol=pickle.HIGHEST_PROTOCOL)
            child.out += _frame(body)
            # what the child now holds; copied, since the caller may change its dicts later
            del sent[len(pools):]
            for i, pool in changed.items():
                copied = pickle.loads(pickle.dumps(pool, protocol=pickle.HIGHEST_PROTOCOL))
                if i < len(sent):
                    sent[i] = copied
                else:
                    sent.append(copied)
            try:
                child.flush(deadline)
                body = child.read_frame(deadline)
            except TimeoutError:
                self._retire(child)
                raise SandboxError("timeout", "the script ran past its time budget") from None
            except EOFError:
                status = child.returncode()
                self._retire(child)
                reason = "memory" if "out of memory" in status else "crash"
                raise SandboxError(reason, f"the sandbox process died ({status})") from None
            except SandboxError:
                self._retire(child)
                raise
            try:
                reply = json.loads(body)
            except ValueError:
                self._retire(child)
                raise SandboxError("garbage", "the sandbox answered something unreadable"
                                   ) from None
            if not reply.get("ok"):
                reason = str(reply.get("reason", "error"))
                if reason in ("memory", "crash"):
                    self._retire(child)
                raise SandboxError(reason, str(reply.get("error")))
            return reply.get("result")

    def close(self) -> None:
        """Stop every child; idempotent."""
        with self._lock:
            self._closed = True
            for child in self._slots:
                if child is not None:
                    self._retire(child)
            for child in self._dead:
                child.kill()
                child.reap(2.0)
            self._dead = []
