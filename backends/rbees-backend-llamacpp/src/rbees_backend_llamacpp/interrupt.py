"""Stopping a ``llama_decode`` part-way, from another thread, without the GIL.

The engine interrupts a forward pass that holds only batch-priority jobs' tokens when an
interactive job arrives (:mod:`rbees_core.engine`): the interactive prompt is then read
at once instead of after the pass (on two cores a pass of three batch sequences took
15-25 ms, which alone tripled an interactive job's time to first token).

llama.cpp's public ``llama_set_abort_callback`` asks a ``bool (*)(void *)`` between the
nodes of the graph (CPU backends; GPU backends never ask, and their passes just finish).
A Python callback there would take the GIL hundreds of times per pass, from ggml's
threads, against the worker's event loop; so the callback is libc's ``strlen`` over a
two-byte buffer: ``"\\0\\0"`` reads 0 (go on) and ``"\\1\\0"`` reads 1 (stop), and the
engine's thread flips the first byte. (``bool`` is returned in the low byte of the same
register as ``size_t`` on the x86-64 and AArch64 C ABIs.)

An aborted ``llama_decode`` returns 2 after removing the positions of the ubatch it was in
from every sequence's cache (``llama_context::decode`` of the vendored llama.cpp), but not
those of ubatches before it (llama.cpp splits a pass by size and, with a cache per
sequence, by sequence). On a real cluster positions of stopped passes did stay behind (its
worker then failed with "inconsistent sequence positions", tests/test_lanes.py), so the
backend cuts every sequence of a stopped pass back to where the pass found it
(``llama_memory_seq_rm``), and the engine feeds the whole pass again. Recurrent models,
whose state cannot be cut back, are never armed. Arming, disarming and firing share a
lock, so a stop asked for as one pass ends never reaches the next. A stop asked for
after the engine marked the coming pass interruptible but before the pass is armed (the
engine's thread still building it) is kept and fires as the pass starts: dropped, as it
was, that pass ran whole, and an interactive job arriving then waited 10-15 ms in 4 of 15
chats while a batch ran (the decode thread stopped 0.4-2 ms after the others).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

#: llama_decode's answer for an aborted pass
ABORTED = 2


class Interrupter:
    """The abort callback of one llama.cpp context, and its flag."""

    def __init__(self, binding: Any, ctx: Any, *, enabled: bool = True) -> None:
        self._flag = ctypes.create_string_buffer(2)
        libc = ctypes.CDLL(None)
        self._callback = ctypes.cast(libc.strlen, binding.ggml_abort_callback)
        binding.llama_set_abort_callback(ctx, self._callback,
                                         ctypes.cast(self._flag, ctypes.c_void_p))
        self.enabled = enabled
        self.armed = False
        #: a stop asked for before the pass was armed: it fires when it is
        self.requested = False
        self._lock = threading.Lock()
        #: passes stopped so far (the engine's tests and metrics read it)
        self.count = 0

    def arm(self, interruptible: bool) -> bool:
        """Before every pass: armed (True) when the pass is ``interruptible`` and the model
        may be; the flag set then only when a stop was asked for since the last pass (a
        pass no one may stop never sees it set)."""
        with self._lock:
            self.armed = interruptible and self.enabled
            self._flag[0] = b"\x01" if self.armed and self.requested else b"\x00"
            self.requested = False
            return self.armed

    def disarm(self) -> None:
        """After the pass: a stop asked for from now on is for the next pass."""
        with self._lock:
            self.armed = False
            self._flag[0] = b"\x00"

    def fire(self) -> None:
        """From any thread: stop the armed pass in flight at its next node, or, when none
        is armed, the next pass as it starts (if that one may be stopped). The engine
        fires only while the pass it is building or running holds batch jobs alone."""
        with self._lock:
            if self.armed:
                self._flag[0] = b"\x01"
            else:
                self.requested = True

    def stopped(self, rc: int, armed: bool) -> bool:
        """Whether ``llama_decode``'s answer ``rc`` was this interrupt."""
        if armed and rc == ABORTED:
            self.count += 1
            return True
        return False
