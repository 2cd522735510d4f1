"""JSON-lines logging with the request's correlation id on every line (CONTRACT section 1)."""

from __future__ import annotations

import contextvars
import hashlib
import json
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


class Logger:
    """Writes one JSON object per line: ``ts, level, component, event, correlation_id, ...``."""

    def __init__(self, component: str, stream: TextIO | None = None) -> None:
        self.component = component
        self.stream = stream or sys.stderr
        self.threshold = _LEVELS.get(os.environ.get("RBEES_LOG_LEVEL", "info").lower(), 20)

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
        self.stream.write(json.dumps(record, default=str) + "\n")
        self.stream.flush()

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
