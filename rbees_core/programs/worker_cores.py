"""rbees-workerd's ``POST /v2/cores``: its pool moves cores between its workers.

When a new worker finds no core free, pool-managerd halves the CPU worker holding the most
(:mod:`rbees_core.pool.cores`) and gives them back when the new one stops. This route moves
every thread of the worker onto the new CPU set at once and has the engine decode with the
new thread count from its next step (:meth:`rbees_core.engine.Engine.set_threads`). An
embedding worker, or a backend that cannot change its threads, refuses with a 400: its pool
then leaves it as it is.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from rbees_core.api import openapi
from rbees_core.api.worker import CoresRequest, CoresState
from rbees_core.engine import Engine
from rbees_core.errors import InvalidParamsError, NotReadyError
from rbees_core.http import json_response, read_json
from rbees_core.pool.cores import pin_all


async def set_cores(request: Request) -> Response:
    st: Any = request.app.state.worker
    req = await read_json(request, CoresRequest)
    if not req.cpus or req.threads > len(req.cpus):
        raise InvalidParamsError("threads", f"{req.threads} threads need at least as many "
                                 f"CPUs; got {len(req.cpus)}")
    engine = st.engine
    if engine is None:
        raise NotReadyError("the model is still loading", details={"progress": st.fraction})
    if not isinstance(engine, Engine):
        raise InvalidParamsError("cpus", "an embedding worker keeps the cores it started on")
    if not engine.model.supports_threads:
        raise InvalidParamsError("threads", f"backend {st.settings.backend!r} cannot change "
                                 "its thread count")
    try:
        pin_all(req.cpus)
    except (OSError, ValueError) as exc:
        raise InvalidParamsError("cpus", f"cannot run on {req.cpus}: {exc}") from exc
    engine.set_threads(req.threads)
    st.log.info("worker_cores", threads=req.threads, cpus=sorted(req.cpus))
    return json_response(CoresState(threads=req.threads, cpus=sorted(req.cpus)))


OPERATION = openapi.Operation(
    "POST", "/v2/cores", "decode with these threads on these CPUs from the next step on "
    "(its pool moves cores between workers)", request=CoresRequest, response=CoresState,
    errors={"400": "an embedding worker, a backend that cannot, or CPUs it may not use",
            "503": "NOT_READY"})
