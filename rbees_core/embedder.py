"""An embedding worker's jobs: :meth:`LoadedModel.embed` calls, one at a time.

rbees-workerd started with ``--embedding`` serves ``POST /v2/embed`` with an
:class:`Embedder` in place of the decode loop (:class:`rbees_core.engine.Engine`): it holds
up to ``slots`` jobs (the orchestrator's slot accounting stays the same), runs them on the
model one after another in a thread (a model's context is not thread-safe), and drains
and stops like the engine.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Sequence
from typing import Any

from rbees_core.backend import Embeddings, LoadedModel
from rbees_core.engine import Observer, _NullObserver
from rbees_core.errors import AllSlotsBusyError, ConflictError, DrainingError


def pack(vector: Sequence[float]) -> str:
    """A vector as base64 of little-endian float32 (OpenAI's ``encoding_format: base64``)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def unpack(text: str) -> list[float]:
    """The floats of :func:`pack`'s text."""
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


class Embedder:
    """Runs embedding jobs on ``model`` (loaded for embedding). Its methods are called on
    the worker's event loop; :meth:`run` awaits the model in a thread."""

    def __init__(self, model: LoadedModel, *, slots: int, observer: Observer | None = None
                 ) -> None:
        self.model = model
        self.slots = slots
        self._obs: Observer = observer or _NullObserver()
        self._jobs: set[str] = set()
        self._lock = asyncio.Lock()
        self._draining = False

    def start(self) -> None:
        """Nothing to start (the engine's counterpart starts its thread)."""

    @property
    def slots_free(self) -> int:
        return self.slots - len(self._jobs)

    @property
    def idle(self) -> bool:
        return not self._jobs

    def drain(self) -> None:
        self._draining = True

    def stop(self, timeout: float = 5.0) -> None:
        self._draining = True

    def cancel(self, job_id: str) -> bool:
        """Embedding jobs run to their end (one forward pass); False."""
        return False

    async def run(self, job_id: str, texts: Sequence[str]) -> dict[str, Any]:
        """Embed ``texts`` as job ``job_id``; the data of its ``end`` event
        (:class:`rbees_core.api.worker.EmbedEndEvent`). Raises :class:`DrainingError`,
        :class:`ConflictError` (the id is running), :class:`AllSlotsBusyError` and what
        :meth:`LoadedModel.embed` raises."""
        if self._draining:
            raise DrainingError("worker is draining; it takes no new jobs")
        if job_id in self._jobs:
            raise ConflictError(f"job {job_id!r} is already running here",
                                details={"job_id": job_id})
        if len(self._jobs) >= self.slots:
            raise AllSlotsBusyError(f"all {self.slots} slots are busy",
                                    details={"slots_total": self.slots})
        self._jobs.add(job_id)
        received = time.perf_counter()
        outcome = "failed"
        try:
            async with self._lock:
                started = time.perf_counter()
                self._obs.job_started(started - received)
                result: Embeddings = await asyncio.to_thread(self.model.embed, list(texts))
            outcome = "completed"
        finally:
            self._jobs.discard(job_id)
            self._obs.job_finished(outcome, 0)
        done = time.perf_counter()
        return {"job_id": job_id, "embeddings": [pack(v) for v in result.vectors],
                "dimensions": result.dimensions, "tokens_in": sum(result.tokens),
                "tokens": result.tokens, "forward_passes": result.passes, "tokens_out": 0,
                "decode_ms": round((done - started) * 1000, 3),
                "ttft_ms": round((done - received) * 1000, 3)}
