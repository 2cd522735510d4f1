"""JSON-lines logging with the request's correlation id on every line (CONTRACT section 1).

rbees' own lines come from :class:`Logger`. Everything else a daemon's process logs through
the standard library (uvicorn, httpx, the script scheduler's fallback warning, NVML,
``warnings.warn``) is routed into the same lines by :func:`route_stdlib`, which
:func:`rbees_core.http.daemon.launch` installs: ``level``, ``component`` and
``correlation_id`` as rbees' lines, ``event`` ``"log"``, the record's ``logger`` and
``message``. The threshold of both is ``RBEES_LOG_LEVEL`` (the daemons' ``--log-level``).

Where the lines go (:func:`log_stream`): ``RBEES_LOG_TO`` (the daemons' ``--log-to``)
``stdout`` or ``stderr``; unset, stdout when it is systemd's journal (a service:
``JOURNAL_STREAM`` names the stream stdout is), else stderr. A line written to the journal
starts with its syslog priority (``<4>`` for a warning), which journald strips and keeps
as the entry's priority, so ``journalctl -p warning`` finds rbees' warnings.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id",
                                                                       default="-")
#: The name of the credential of the request being served (an API key's name, ``operator``,
#: ``pool:<id>``), set by the auth middleware; never the secret itself.
key_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("key_name", default=None)
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
#: The values ``--log-level`` and ``RBEES_LOG_LEVEL`` take.
LEVELS = tuple(_LEVELS)
#: The values ``--log-to`` and ``RBEES_LOG_TO`` take.
DESTINATIONS = ("stdout", "stderr")
#: syslog priorities of the levels: journald reads a ``<N>`` prefix as the entry's priority
_PRIORITY = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>"}


def threshold() -> int:
    """The level below which nothing is logged: ``RBEES_LOG_LEVEL`` (default info)."""
    return _LEVELS.get(os.environ.get("RBEES_LOG_LEVEL", "info").lower(), 20)


def level_name(levelno: int) -> str:
    """rbees' name of a stdlib level: ``debug``, ``info``, ``warning`` or ``error``
    (CRITICAL is ``error``)."""
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"


def is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd names in ``JOURNAL_STREAM``
    (``DEVICE:INODE`` of the socket it gave a service as stdout/stderr). Compared rather
    than trusted: the variable is inherited by whatever the service starts (a shell of a
    terminal that runs as a user service has it), whose streams are elsewhere."""
    named = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = named.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or no file behind it (a test's)
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def log_stream() -> TextIO:
    """Where a daemon's JSON lines go: ``RBEES_LOG_TO`` (``--log-to``) ``stdout`` or
    ``stderr``; unset (or another value), stdout when it is the journal, else stderr."""
    to = os.environ.get("RBEES_LOG_TO", "").lower()
    if to == "stdout":
        return sys.stdout
    if to == "stderr" or not is_journal(sys.stdout):
        return sys.stderr
    return sys.stdout


class Logger:
    """Writes one JSON object per line: ``ts, level, component, event, correlation_id, ...``,
    to ``stream`` (default: :func:`log_stream` when the logger is made)."""

    def __init__(self, component: str, stream: TextIO | None = None) -> None:
        self.component = component
        self.stream = stream or log_stream()
        self.threshold = threshold()
        self._journal = is_journal(self.stream)

    def log(self, level: str, event: str, **fields: Any) -> None:
        if _LEVELS[level] < self.threshold:
            return
        record = {
            "ts": round(time.time(), 6), "level": level, "component": self.component,
            "event": event, "correlation_id": correlation_id.get(), **fields,
        }
        key = key_name.get()
        if key is not None:
            record.setdefault("key", key)
        line = json.dumps(record, default=str) + "\n"
        self.stream.write(_PRIORITY[level] + line if self._journal else line)
        self.stream.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


def content_logging() -> bool:
    """Prompts and generated text are logged only when ``RBEES_LOG_CONTENT=1``."""
    return os.environ.get("RBEES_LOG_CONTENT") == "1"


def token_fingerprint(token: str) -> str:
    """How a token may appear in logs: the first 6 hex characters of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:6]


#: libraries that log every request at info: kept at warning unless the level is higher
CHATTY_LOGGERS = ("httpx", "httpcore")


class JsonLinesHandler(logging.Handler):
    """A stdlib handler that writes each record as one of rbees' JSON lines.

    ``component`` names the process (``rbees-orcd``); ``stream`` defaults to the
    :func:`log_stream` of the moment (a test's capture, a service's journal). A record logged
    with ``extra={"event": ..., "fields": {...}}`` keeps that event name and adds the fields
    (how :mod:`rbees_core.http.app` logs requests); an exception's traceback goes in
    ``exception``."""

    def __init__(self, component: str, stream: TextIO | None = None) -> None:
        super().__init__()
        self.component = component
        self.stream = stream
        self._last: tuple[TextIO, bool] | None = None  # a stream and whether it is the journal

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line: dict[str, Any] = {
                "ts": round(record.created, 6), "level": level_name(record.levelno),
                "component": self.component, "event": getattr(record, "event", "log"),
                "correlation_id": correlation_id.get(), "logger": record.name,
                "message": record.getMessage()}
            line.update(getattr(record, "fields", None) or {})
            if record.exc_info:
                line["exception"] = logging.Formatter().formatException(record.exc_info)
            stream = self.stream or log_stream()
            if self._last is None or self._last[0] is not stream:
                self._last = (stream, is_journal(stream))
            text = json.dumps(line, default=str) + "\n"
            stream.write(_PRIORITY[line["level"]] + text if self._last[1] else text)
            stream.flush()
        except Exception:
            self.handleError(record)


def route_stdlib(component: str) -> JsonLinesHandler:
    """Send every stdlib ``logging`` record (and ``warnings.warn``) of this process into
    JSON lines on :func:`log_stream` at :func:`threshold`; the handler it installed on the
    root logger (replacing any other handler there). Called by the daemons' :func:`launch`
    before they serve; a CLI leaves stdlib logging alone."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = JsonLinesHandler(component)
    root.addHandler(handler)
    root.setLevel(threshold())
    # a line per HTTP request the daemons make (heartbeats, polls of a starting worker
    # every 0.1 s) drowns the rest at info; their warnings and errors still come through
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(
            threshold() if threshold() <= logging.DEBUG else max(logging.WARNING, threshold()))
    logging.captureWarnings(True)
    return handler
