"""llama.cpp's log lines into Python's ``logging`` (logger ``llama.cpp``), at their level.

llama-cpp-python 0.3.36 maps ggml's log levels with the enum of an older ggml (``WARN`` read
as ``ERROR``), so at its default level every warning of the engine reached stderr as bare
text beside the daemons' JSON lines. This callback uses the vendored ggml's enum
(``ggml.h``: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5) and hands each line to
``logging``, which the daemons route into their JSON lines (:func:`rbees_core.log.
route_stdlib`) at the configured level. The lines llama.cpp writes when an interrupted
pass is undone (:mod:`rbees_backend_llamacpp.interrupt`) are routine: DEBUG.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

LOGGER = logging.getLogger("llama.cpp")
_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING,
           4: logging.ERROR}
#: what llama.cpp says of an aborted pass (GGML_STATUS_ABORTED is 1, llama_decode's answer
#: 2): routine for an interrupt, so DEBUG whatever level it came with
_ROUTINE = (b"decode: removing memory module entries", b"failed to decode, ret = 2",
            b"graph_compute_async failed with error 1", b"compute status: 1")
_state = {"level": logging.DEBUG}
_callback: Any = None


def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    if level != 5:  # CONT continues the line before, at its level
        _state["level"] = _LEVELS.get(level, logging.INFO)
        if any(routine in text for routine in _ROUTINE):
            _state["level"] = logging.DEBUG
    if LOGGER.isEnabledFor(_state["level"]):
        line = text.decode("utf-8", "replace").rstrip("\n")
        if line:
            LOGGER.log(_state["level"], line)


def route(binding: Any) -> None:
    """Install the callback (once per process; the reference is kept: ggml calls it
    until the process ends)."""
    global _callback
    if _callback is None:
        _callback = binding.llama_log_callback(_log)
        binding.llama_log_set(_callback, ctypes.c_void_p(0))
