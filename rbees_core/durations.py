"""Keep-alive durations in Ollama's forms (``keep_alive`` of a job, rbees-orcd's default).

Used by the job request's check (:class:`rbees_core.api.orchestrator.TaskRequest`), the
admission of rbees-orcd, its config and flags; what they mean for workers is in
:mod:`rbees_core.orchestrator.keepalive`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from rbees_core.errors import InvalidParamsError

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
#: the longest keep-alive given as a finite figure (a year); longer is "forever"
MAX_KEEP_S = 365 * 86400.0


def parse_keep_alive(value: Any, *, field: str = "keep_alive") -> float:
    """Seconds a worker stays loaded when idle, from Ollama's forms: a number of seconds,
    a Go duration string (``"5m"``, ``"1h30m"``, ``"-1"``), or a numeric string; negative
    is ``math.inf`` (forever). Called by admission and the config. Raises
    :class:`InvalidParamsError` naming ``field`` for anything else."""
    if isinstance(value, bool):
        raise InvalidParamsError(field, "must be a duration such as \"5m\" or a number of "
                                 "seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise InvalidParamsError(field, f"{value!r} is no duration (e.g. \"5m\", "
                                         "\"30s\", \"1h30m\", 0, -1)") from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise InvalidParamsError(field, "must be a duration such as \"5m\" or a number of "
                                 "seconds")
    if math.isnan(seconds):
        raise InvalidParamsError(field, "must be a number")
    if seconds < 0 or seconds > MAX_KEEP_S:
        return math.inf
    return seconds


def check_keep_alive(value: Any) -> None:
    """Refuse (:class:`InvalidParamsError`) a request's ``keep_alive`` that is not one;
    None (not given) is accepted."""
    if value is not None:
        parse_keep_alive(value)
