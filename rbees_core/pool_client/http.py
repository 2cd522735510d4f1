"""The pool client over pool-managerd's API (CONTRACT section 4): :class:`HttpPoolClient`.

======================================  ==================================================
:meth:`~HttpPoolClient.version`         ``GET /health`` (and ``GET /v2/workers``, which
                                        proves the token)
:meth:`~HttpPoolClient.status`          ``GET /v2/state``
:meth:`~HttpPoolClient.models_list`     ``GET /v2/models``
``models_download``                     ``POST /v2/models/download`` (SSE progress)
``worker_start``                        ``POST /v2/workers/start``, then ``GET
                                        /v2/workers/{id}`` until ready
``worker_get`` / ``worker_list``        ``GET /v2/workers/{id}`` / ``GET /v2/workers``
``worker_stop``                         ``POST /v2/workers/{id}/stop``, then until stopped
======================================  ==================================================

The rest (catalog, info, verify, rm, logs, git) and the options the API has no room for
(``port``, ``grace_s``) raise :class:`~rbees_core.errors.UnsupportedCommandError` before a
request is made.

rbees-orcd drives pools with the three API calls underneath, which answer the API's own
types and do not wait: :meth:`HttpPoolClient.start_worker`, :meth:`HttpPoolClient.get_worker`
and :meth:`HttpPoolClient.request_stop`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import attrs

from rbees_core.api.pool import (
    LIVE_WORKER_STATES,
    DownloadedModel,
    DownloadProgress,
    PoolModel,
    PoolStatus,
    PoolWorker,
    WorkerEntry,
    WorkerStarted,
    WorkerStartRequest,
)
from rbees_core.errors import (
    HostAuthError,
    HostUnreachableError,
    ModelLoadError,
    NotReadyError,
    PoolCommandError,
    RbeesError,
    TransportError,
    from_envelope,
)
from rbees_core.pool_client import (
    DEFAULT_START_TIMEOUT_S,
    PoolClient,
    ProgressCallback,
    check_ref,
    check_worker_id,
    parse,
)
from rbees_core.sse import aiter_events

if TYPE_CHECKING:
    import httpx

#: How often a start or a stop is polled (seconds).
POLL_S = 0.05
#: How long :meth:`HttpPoolClient.worker_stop` waits for the worker to be gone.
STOP_WAIT_S = 60.0
#: Read timeout of one API call (a download's stream has none).
READ_TIMEOUT_S = 60.0


class HttpPoolClient(PoolClient):
    """A pool's API at ``url`` (``http://gpu1:9200``), typed.

    Made by the ``http`` transport for a host of hosts.toml, and by rbees-orcd for each
    registered pool::

        pool = HttpPoolClient(entry.url, name=pool_id, client=shared_httpx_client,
                              headers=lambda: {"Authorization": f"Bearer {token}"})
        started = await pool.start_worker(WorkerStartRequest(model_ref=m, device="cuda:0"))
        entry = await pool.get_worker(started.worker_id)   # WorkerEntry: entry.state ...
        await pool.request_stop(started.worker_id)

    ``token`` is sent as a bearer token; ``headers`` (called for every request, so it can
    carry a correlation id) adds more. ``client`` shares an :class:`httpx.AsyncClient` (its
    connection pool and timeouts; :meth:`aclose` then leaves it open), else the client makes
    its own with ``connect_timeout_s``. ``auth_hint`` names where the token came from, for
    the message of a refused token. Construction does no I/O.

    Raises (every method): :class:`~rbees_core.errors.HostUnreachableError` (no
    connection), :class:`~rbees_core.errors.HostAuthError` (401),
    :class:`~rbees_core.errors.TransportError` (the connection broke, or an answer of an
    unexpected shape), and the error of the pool's envelope as its own class
    (:func:`~rbees_core.errors.from_envelope`: ``NOT_FOUND`` is
    :class:`~rbees_core.errors.NotFoundError` ...), the message starting with ``name``.
    """

    kind = "http"

    def __init__(self, url: str, *, name: str | None = None, token: str | None = None,
                 headers: Callable[[], Mapping[str, str]] | None = None,
                 client: httpx.AsyncClient | None = None, connect_timeout_s: float = 10.0,
                 auth_hint: str = "") -> None:
        super().__init__(name or url)
        self.url = url.rstrip("/")
        self._token = token
        self._headers = headers
        self._client = client
        self._owned = client is None
        self._connect_timeout_s = connect_timeout_s
        self._auth_hint = auth_hint

    # -- plumbing ------------------------------------------------------------------------

    def client(self) -> httpx.AsyncClient:
        """The httpx client (made on first use unless one was given)."""
        import httpx

        if self._client is None:
            from rbees_core.tls import client_context

            self._client = httpx.AsyncClient(timeout=httpx.Timeout(
                READ_TIMEOUT_S, connect=self._connect_timeout_s), verify=client_context())
            self._owned = True
        return self._client

    def _request_headers(self) -> dict[str, str]:
        out = dict(self._headers()) if self._headers is not None else {}
        if self._token:
            out["Authorization"] = f"Bearer {self._token}"
        return out

    def _refused(self, status: int, body: bytes) -> RbeesError:
        if status == 401:
            hint = f" ({self._auth_hint})" if self._auth_hint else ""
            return HostAuthError(f"{self.name}: {self.url} refused the API token{hint}")
        try:
            error = json.loads(body)["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            return PoolCommandError(f"{self.name}: {self.url} answered HTTP {status} "
                                    f"{body[:200]!r}")
        return from_envelope(code, f"{self.name}: {message}",
                             details=error.get("details") or None)

    def _broken(self, exc: Exception) -> TransportError:
        import httpx

        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            from rbees_core.tls import tls_failure

            reason = tls_failure(exc) or reason
            return HostUnreachableError(f"{self.name}: cannot reach {self.url}: {reason}")
        return TransportError(f"{self.name}: {self.url}: {reason}")

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One API call; the decoded JSON answer (None for an empty one)."""
        import httpx

        try:
            answer = await self.client().request(method, f"{self.url}{path}", json=body,
                                                 headers=self._request_headers())
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc
        if answer.status_code >= 400:
            raise self._refused(answer.status_code, answer.content)
        try:
            return answer.json() if answer.content else None
        except ValueError as exc:
            raise TransportError(f"{self.name}: {self.url}{path} answered no JSON") from exc

    async def _events(self, path: str, body: Any) -> AsyncIterator[tuple[str, Any]]:
        """The server-sent events of a streamed POST: (event, decoded data)."""
        import httpx

        timeout = httpx.Timeout(None, connect=self._connect_timeout_s)
        try:
            async with self.client().stream("POST", f"{self.url}{path}", json=body,
                                            headers=self._request_headers(),
                                            timeout=timeout) as answer:
                if answer.status_code >= 400:
                    raise self._refused(answer.status_code, await answer.aread())
                async for frame in aiter_events(answer.aiter_lines()):
                    yield frame.event or "message", frame.json()
        except httpx.HTTPError as exc:
            raise self._broken(exc) from exc
        except ValueError as exc:
            raise TransportError(f"{self.name}: {self.url}{path} sent an event that is not "
                                 "JSON") from exc

    # -- the API's own calls (rbees-orcd) ------------------------------------------------

    async def start_worker(self, request: WorkerStartRequest) -> WorkerStarted:
        """``POST /v2/workers/start``: the pool has accepted to start it (202); it is not
        ready yet (poll :meth:`get_worker`). Raises the pool's refusal
        (``INSUFFICIENT_VRAM``, ``MODEL_NOT_FOUND`` ...) as an RbeesError."""
        from rbees_core.schema import to_dict

        body = {k: v for k, v in to_dict(request).items() if v is not None}
        if not body.get("embedding"):  # the default: a body any pool of before it takes
            body.pop("embedding", None)
        return parse(self.name, WorkerStarted,  # type: ignore[no-any-return]
                     await self.call("POST", "/v2/workers/start", body))

    async def get_worker(self, worker_id: str) -> WorkerEntry:
        """``GET /v2/workers/{id}``: the pool's entry of the worker (its ``state``,
        ``error`` ...); :class:`~rbees_core.errors.NotFoundError` if it has none."""
        check_worker_id(worker_id)
        return parse(self.name, WorkerEntry,  # type: ignore[no-any-return]
                     await self.call("GET", f"/v2/workers/{quote(worker_id, safe='')}"))

    async def request_stop(self, worker_id: str) -> None:
        """``POST /v2/workers/{id}/stop``: drain, shut down, SIGKILL after the pool's
        grace; returns once the pool accepted it (the worker is still stopping)."""
        check_worker_id(worker_id)
        await self.call("POST", f"/v2/workers/{quote(worker_id, safe='')}/stop")

    # -- PoolClient ----------------------------------------------------------------------

    async def version(self) -> str:
        health = await self.call("GET", "/health")
        await self.call("GET", "/v2/workers")  # /health needs no token; this one does
        return str(health["version"])

    async def status(self) -> PoolStatus:
        state = await self.call("GET", "/v2/state")
        if not isinstance(state, dict):
            raise TransportError(f"{self.name}: /v2/state answered no object")
        workers = [PoolWorker.from_entry(parse(self.name, WorkerEntry, w))
                   for w in state.get("workers") or ()]
        status: PoolStatus = parse(self.name, PoolStatus, {**state, "workers": []})
        return attrs.evolve(status, workers=workers)

    async def models_list(self) -> list[PoolModel]:
        answer = await self.call("GET", "/v2/models")
        return [parse(self.name, PoolModel, m) for m in answer["models"]]

    async def models_download(self, model: str, *, force: bool = False,
                              progress: ProgressCallback | None = None) -> DownloadedModel:
        check_ref(model, "model")
        async for event, data in self._events("/v2/models/download",
                                              {"model": model, "force": force}):
            if event == "progress" and progress is not None:
                progress(DownloadProgress(
                    bytes_done=int(data["bytes_done"]), bytes_total=data.get("bytes_total"),
                    rate_bps=float(data.get("rate_bps") or 0),
                    stage=str(data.get("stage", "download"))))
            elif event == "end":
                return parse(self.name, DownloadedModel,  # type: ignore[no-any-return]
                             data)
            elif event == "error":
                raise from_envelope(str(data.get("code")),
                                    f"{self.name}: {data.get('message', 'download failed')}")
        raise TransportError(f"{self.name}: the download's stream ended before the download")

    async def models_remove(self, model: str, *, force: bool = False) -> list[PoolModel]:
        """``DELETE /v2/models/{model}`` (204, no body): the copies the pool listed before
        and lists no more. Raises the pool's refusal (``MODEL_NOT_FOUND``, ``CONFLICT`` for
        a model a worker has loaded unless ``force``) as an RbeesError."""
        check_ref(model, "model")
        before = await self.models_list()
        query = "?force=true" if force else ""
        await self.call("DELETE", f"/v2/models/{quote(model, safe=':')}{query}")
        after = {(m.ref, m.path) for m in await self.models_list()}
        return [m for m in before if (m.ref, m.path) not in after]

    async def worker_start(self, request: WorkerStartRequest, *, port: int | None = None,
                           timeout_s: float = DEFAULT_START_TIMEOUT_S) -> PoolWorker:
        import asyncio

        if port is not None:
            raise self.unsupported("worker spawn --port", "pool-managerd picks the port")
        check_ref(request.model_ref, "model")
        worker_id = (await self.start_worker(request)).worker_id
        deadline = time.monotonic() + timeout_s
        while True:
            entry = await self.get_worker(worker_id)
            if entry.state in ("ready", "busy"):
                return PoolWorker.from_entry(entry)
            if entry.state not in LIVE_WORKER_STATES:
                raise ModelLoadError(
                    f"{self.name}: worker {worker_id} {entry.state} while loading: "
                    f"{entry.error or f'exit {entry.exit_code}'}")
            if time.monotonic() > deadline:
                await self.request_stop(worker_id)
                raise NotReadyError(f"{self.name}: worker {worker_id} was not ready after "
                                    f"{timeout_s:.0f} s; stopped it")
            await asyncio.sleep(POLL_S)

    async def worker_get(self, worker_id: str) -> PoolWorker:
        self._known_id(worker_id)
        return PoolWorker.from_entry(await self.get_worker(worker_id))

    async def worker_list(self) -> list[PoolWorker]:
        answer = await self.call("GET", "/v2/workers")
        return [PoolWorker.from_entry(parse(self.name, WorkerEntry, w))
                for w in answer["workers"]]

    async def worker_stop(self, worker_id: str, *, grace_s: float | None = None
                          ) -> PoolWorker:
        import asyncio

        if grace_s is not None:
            raise self.unsupported("worker stop --grace",
                                   "pool-managerd applies its own stop grace")
        self._known_id(worker_id)
        await self.request_stop(worker_id)
        deadline = time.monotonic() + STOP_WAIT_S
        while True:
            entry = await self.get_worker(worker_id)
            if entry.state not in LIVE_WORKER_STATES or time.monotonic() > deadline:
                return PoolWorker.from_entry(entry)
            await asyncio.sleep(POLL_S)

    async def worker_stop_all(self, *, grace_s: float | None = None) -> list[PoolWorker]:
        if grace_s is not None:
            raise self.unsupported("worker stop --grace",
                                   "pool-managerd applies its own stop grace")
        return await super().worker_stop_all()

    async def aclose(self) -> None:
        if not self._owned:  # a shared client is its owner's to close; keep using it
            return
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

