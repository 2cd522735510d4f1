"""Reading SSE bodies in tests (a module of its own: the test kit's package and its cluster
helper both use it)."""

from __future__ import annotations

from typing import Any

from rbees_core import sse


def parse_sse(text: str) -> list[tuple[int | None, str, dict[str, Any]]]:
    """``(id, event, data)`` of every frame in an SSE body (``event`` is ``message`` when
    the frame names none, ``data`` decoded JSON)."""
    return [(int(f.id) if f.id else None, f.event or "message", f.json())
            for f in sse.parse(text)]
