"""rbees-workerd's embedding mode (``--embedding``): the model loaded for embeddings and
``POST /v2/embed`` (CONTRACT section 2).

An embedding worker serves embedding jobs only: ``/v2/execute`` refuses generation on it,
and ``/v2/embed`` refuses on a worker started without ``--embedding``. Its ready state, its
ready callback and its pool's worker entry say ``embedding: true``, so that the
orchestrator's scheduler routes embedding jobs to it and no other job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from rbees_core.api import openapi
from rbees_core.api.worker import EmbedEndEvent, EmbedRequest
from rbees_core.backend import Backend, LoadedModel
from rbees_core.embedder import Embedder
from rbees_core.errors import DrainingError, InvalidParamsError, NotReadyError
from rbees_core.http import EventStreamResponse, read_json


def load(backend: Backend, path: str, *, device: str, slots: int, ctx: int | None,
         threads: int | None, progress: Callable[[str, float], None],
         **offload: Any) -> LoadedModel:
    """The model loaded for embeddings: with ``embedding=True`` by a backend that
    :attr:`~rbees_core.backend.Backend.embeds`, else as for generation (its
    :meth:`~rbees_core.backend.LoadedModel.embed` then refuses each job with a 400 naming
    the backend that can). ``offload``: :func:`rbees_core.backend.offload_args`. Runs in a
    thread."""
    if type(backend).embeds:
        return backend.load(path, device=device, slots=slots, ctx=ctx,  # type: ignore[call-arg]
                            threads=threads, progress=progress, embedding=True, **offload)
    return backend.load(path, device=device, slots=slots, ctx=ctx, threads=threads,
                        progress=progress, **offload)


def refuse_generation(st: Any) -> None:
    """``/v2/execute`` on an embedding worker (``st``, its
    :class:`~rbees_core.programs.workerd.WorkerState`): a 400, a job routed here by
    mistake."""
    if st.settings.embedding:
        raise InvalidParamsError("prompt", f"worker {st.settings.worker_id} serves embeddings "
                                 "only (started with --embedding); send POST /v2/embed")


async def embed(request: Request) -> Response:
    """POST /v2/embed: the job's ``started`` event, then ``end`` with its vectors (or
    ``error``), as SSE; refusals before it starts are plain errors, as for /v2/execute."""
    st = request.app.state.worker  # rbees_core.programs.workerd.WorkerState
    if st.state == "draining" or st.shutdown.is_set():
        raise DrainingError("worker is draining; it takes no new jobs")
    embedder = st.engine
    if embedder is None:
        raise NotReadyError("the model is still loading", details={"progress": st.fraction})
    if not isinstance(embedder, Embedder):
        raise InvalidParamsError("input", f"worker {st.settings.worker_id} was not started "
                                 "with --embedding; embedding jobs go to an embedding worker")
    req = await read_json(request, EmbedRequest)
    end = await embedder.run(req.job_id, req.input)
    st.metrics.embedded(inputs=len(req.input), tokens=end["tokens_in"],
                        passes=end["forward_passes"])
    st.log.info("job_embedded", job_id=req.job_id, inputs=len(req.input),
                tokens_in=end["tokens_in"], forward_passes=end["forward_passes"],
                decode_ms=end["decode_ms"])
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    events.put_nowait(("started", {"job_id": req.job_id, "model": st.settings.model_ref,
                                   "worker_id": st.settings.worker_id,
                                   "queue_wait_ms": round(end["ttft_ms"] - end["decode_ms"],
                                                          3)}))
    events.put_nowait(("end", end))
    return EventStreamResponse(events, on_disconnect=lambda: None)  # type: ignore[return-value]


OPERATION = openapi.Operation(
    "POST", "/v2/embed", "embed texts (an embedding worker), answered as SSE: started, then "
    "end with the vectors", request=EmbedRequest, response=EmbedEndEvent, sse=True,
    errors={"400": "not an embedding worker, or an input it cannot embed",
            "503": "ALL_SLOTS_BUSY, DRAINING or NOT_READY"})
