"""pool-managerd's downloads: one per model at a time, joined by every later request for it.

``POST /v2/models/download`` and rbees-orcd's pull on first use start (or join) the download
of a model; each caller gets a queue of its events: ``progress`` (stage, bytes done and
total, rate), then ``end`` (the local model, ``fetched``) or ``error``. A new copy clears the
model's failed-load marks (``on_fetched``): it may load where the last one did not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pluggy

from rbees_core.errors import RbeesError

Events = asyncio.Queue[tuple[str, dict[str, Any]]]


class Downloads:
    """The downloads under way on this pool (``len()``: how many)."""

    def __init__(self, pm: pluggy.PluginManager, on_fetched: Callable[[list[str]], Any]
                 ) -> None:
        self.pm = pm
        self.on_fetched = on_fetched
        self.running: dict[str, asyncio.Task[Any]] = {}
        self.listeners: dict[str, list[Events]] = {}

    def __len__(self) -> int:
        return len(self.running)

    def start(self, model: str, force: bool) -> Events:
        """Start (or join) the download of ``model``; its events arrive on the queue
        returned. Called from the event loop."""
        from rbees_core.pool import models as local_models

        queue: Events = asyncio.Queue()
        self.listeners.setdefault(model, []).append(queue)
        if model in self.running:
            return queue
        loop = asyncio.get_running_loop()
        started = time.monotonic()

        def publish(event: str, data: dict[str, Any]) -> None:
            for q in self.listeners.get(model, []):
                q.put_nowait((event, data))

        def progress(p: Any) -> None:
            elapsed = max(time.monotonic() - started, 1e-6)
            data = {"stage": p.stage, "bytes_done": p.bytes_done, "bytes_total": p.bytes_total,
                    "rate_bps": round(p.bytes_done / elapsed)}
            loop.call_soon_threadsafe(publish, "progress", data)

        async def run() -> None:
            try:
                local, fetched = await local_models.download(self.pm, model, force=force,
                                                             progress=progress)
                if fetched:  # a new copy: it may load where the last one did not
                    self.on_fetched([model, local.ref, local.path, f"file:{local.path}",
                                     *([local.id] if local.id else [])])
                # what `rbees-pool models download --format json` ends with, too
                publish("end", {**local.to_dict(), "fetched": fetched})
            except RbeesError as exc:
                publish("error", {"code": exc.code, "message": exc.message,
                                  "retriable": exc.retriable})
            except Exception as exc:
                publish("error", {"code": "DOWNLOAD_FAILED", "message": str(exc),
                                  "retriable": True})
            finally:
                self.running.pop(model, None)
                self.listeners.pop(model, None)

        self.running[model] = asyncio.create_task(run())
        return queue
