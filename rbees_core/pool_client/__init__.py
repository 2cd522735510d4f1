"""One typed interface to a pool host: :class:`PoolClient`.

Whatever carries it, a pool host offers the same operations: its status, its models (list,
download with progress, verify ...), its workers (start, get, list, stop, logs) and its git
checkout. ``rbees pool ... --host``, M0 (``rbees jobs submit`` without a daemon) and
rbees-orcd's pool control all call a :class:`PoolClient`; none builds a command line or
parses another program's output.

Two implementations, both in the kernel:

- :class:`rbees_core.pool_client.http.HttpPoolClient`: pool-managerd's API (CONTRACT
  section 4). The ``http`` transport returns one; rbees-orcd makes one per pool URL.
- :class:`rbees_core.pool_client.command.CommandPoolClient`: ``rbees-pool ... --format
  json`` run through a :class:`rbees_core.transport.Transport` (``ssh``, ``local`` and any
  transport that only implements :meth:`~rbees_core.transport.Transport.run`); the one
  place where rbees reads another program's JSON.

Get one from a host with :func:`rbees_core.hosts.open_pool_client` (``async with``), or
from an open transport with :meth:`rbees_core.transport.Transport.pool_client`.

Errors are the rbees error tree, the remote one's class when it is known
(:func:`rbees_core.errors.from_envelope`), with the host's name first in the message
(``"gpu1: no worker 'w9' in this pool"``): :class:`~rbees_core.errors.TransportError` and
its subclasses when the host cannot be driven, :class:`~rbees_core.errors.NotFoundError`,
:class:`~rbees_core.errors.ConflictError` ... when the pool refused, and
:class:`~rbees_core.errors.PoolCommandError` (with the remote exit code) when the pool
failed with an error of unknown class. An operation a transport cannot carry raises
:class:`~rbees_core.errors.UnsupportedCommandError` before anything is sent.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rbees_core.api.common import ID_PATTERN
from rbees_core.api.pool import (
    DownloadedModel,
    DownloadProgress,
    PoolModel,
    PoolStatus,
    PoolWorker,
    WorkerStartRequest,
)
from rbees_core.errors import InvalidParamsError, TransportError, UnsupportedCommandError

if TYPE_CHECKING:
    from typing import Self

__all__ = ["DownloadProgress", "DownloadedModel", "LineCallback", "PoolClient", "PoolModel",
           "PoolStatus", "PoolWorker", "ProgressCallback", "WorkerStartRequest", "parse",
           "to_json"]

#: Called with each line as it arrives (worker logs, the pool's warnings).
LineCallback = Callable[[str], None]
#: Called with a download's progress as it arrives, on the event loop: keep it quick.
ProgressCallback = Callable[[DownloadProgress], None]
#: rbees-pool's default ready wait for ``worker spawn`` (seconds).
DEFAULT_START_TIMEOUT_S = 60.0
#: JSON objects: what the less structured commands answer (``models catalog|info|verify``,
#: ``git ...``), as rbees-pool prints them.
JsonObject = dict[str, Any]


def check_ref(value: str, field: str) -> str:
    """A model reference or path that may be sent: no shell syntax, no ``..``, no NUL."""
    from rbees_core.refs import validate_ref

    if "\x00" in value or "\n" in value:
        raise InvalidParamsError(field, "must not contain NUL or newlines")
    return validate_ref(value, field)


def check_worker_id(worker_id: str) -> str:
    """A worker id that may be sent (``ID_PATTERN``); InvalidParamsError otherwise."""
    if not re.fullmatch(ID_PATTERN, worker_id) or worker_id in (".", ".."):
        raise InvalidParamsError("worker_id", f"{worker_id!r} is not a worker id")
    return worker_id


def parse(host: str, cls: type[Any], data: Any) -> Any:
    """``cls`` (an attrs type of :mod:`rbees_core.api.pool`) from a pool's JSON ``data``;
    keys this version does not know are ignored (a newer pool may send more). A shape that
    does not fit is a :class:`TransportError` naming the host."""
    from rbees_core.schema import from_mapping

    try:
        return from_mapping(cls, _known(cls, data))
    except InvalidParamsError as exc:
        raise TransportError(f"{host}: the pool answered an unexpected {cls.__name__}: "
                             f"{exc.message}") from exc


def to_json(value: Any) -> Any:
    """A pool client's answer as rbees-pool prints it in JSON: attrs types become objects
    (a worker's ``error`` only when it has one), lists and dicts recursively."""
    import attrs

    if attrs.has(type(value)):
        return {f.name: to_json(getattr(value, f.name)) for f in attrs.fields(type(value))
                if not (f.name == "error" and getattr(value, f.name) is None)}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def _known(cls: type[Any], data: Any) -> Any:
    """``data`` without the keys ``cls`` (and the attrs types inside it) does not have."""
    import typing

    import attrs

    if not (isinstance(data, dict) and attrs.has(cls)):
        return data
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for name in attrs.fields_dict(cls):
        if name not in data:
            continue
        value = data[name]
        inner = next((t for t in (hints[name], *typing.get_args(hints[name]))
                      if attrs.has(t)), None)
        if inner is not None:
            value = [_known(inner, v) for v in value] if isinstance(value, list) \
                else _known(inner, value)
        out[name] = value
    return out


class PoolClient(ABC):
    """The operations of one pool host, typed (see the module's docstring).

    ``name`` is the host's name (``rbees hosts``) or, in rbees-orcd, the pool id; it starts
    every error message. Set :attr:`on_notice` to see the pool's warnings (a device probe
    that failed) as they arrive. A client is used by one task at a time per operation but
    operations may run concurrently; :meth:`aclose` releases its connections.

    Subclasses implement the abstract methods; the others raise
    :class:`~rbees_core.errors.UnsupportedCommandError` unless overridden.
    """

    #: Which transport carries this client (``http``, ``ssh``, ``local`` ...), for messages.
    kind: str = "pool"

    def __init__(self, name: str) -> None:
        self.name = name
        #: Called with each warning line the pool prints while a command runs.
        self.on_notice: LineCallback | None = None

    def unsupported(self, what: str, why: str = "") -> UnsupportedCommandError:
        """The error for an operation this client cannot carry (raised before sending)."""
        return UnsupportedCommandError(
            f"{self.name}: the {self.kind} transport cannot run {what}"
            + (f" ({why})" if why else "; use an ssh or local host for it"))

    def _known_id(self, worker_id: str) -> str:
        """``worker_id`` if it can name a worker, else the pool's own answer for it:
        :class:`~rbees_core.errors.NotFoundError` (checked before anything is sent)."""
        from rbees_core.errors import NotFoundError

        try:
            return check_worker_id(worker_id)
        except InvalidParamsError:
            raise NotFoundError(f"{self.name}: no worker {worker_id!r} in this pool",
                                details={"worker_id": worker_id}) from None

    # -- the host ------------------------------------------------------------------------

    @abstractmethod
    async def version(self) -> str:
        """The pool's rbees version (``0.4.0``); proves the credentials too.
        Called by ``rbees hosts check``."""

    @abstractmethod
    async def status(self) -> PoolStatus:
        """The host's devices, models on disk and workers (``rbees-pool status``).
        Called by ``rbees pool status`` and by M0 to build its snapshot."""

    # -- models --------------------------------------------------------------------------

    @abstractmethod
    async def models_list(self) -> list[PoolModel]:
        """The models on the host (downloaded, and provided by installed packages)."""

    @abstractmethod
    async def models_download(self, model: str, *, force: bool = False,
                              progress: ProgressCallback | None = None) -> DownloadedModel:
        """Download ``model`` (catalog id or ``hf:`` reference) on the host and verify it.

        ``progress`` is called on the event loop as the pool reports progress (as it
        arrives, not at the end). Raises what the source raises there
        (:class:`~rbees_core.errors.ModelNotFoundError`,
        :class:`~rbees_core.errors.DownloadError`,
        :class:`~rbees_core.errors.ChecksumMismatchError` ...)."""

    async def models_catalog(self) -> list[JsonObject]:
        """The catalog rows, each with ``present`` (``rbees-pool models catalog``)."""
        raise self.unsupported("models catalog")

    async def models_info(self, model: str) -> JsonObject:
        """A model's catalog entry and its copies on the host (``models info``)."""
        raise self.unsupported("models info")

    async def models_verify(self, model: str) -> list[JsonObject]:
        """Hash the model's copies on the host: one row per copy with ``ok`` (True, False
        on a mismatch, None without a known sha256). A mismatch is a row, not an error."""
        raise self.unsupported("models verify")

    async def models_remove(self, model: str, *, force: bool = False) -> list[PoolModel]:
        """Delete the downloaded copies of ``model``; returns what went (``models rm``)."""
        raise self.unsupported("models rm")

    # -- workers -------------------------------------------------------------------------

    @abstractmethod
    async def worker_start(self, request: WorkerStartRequest, *, port: int | None = None,
                           timeout_s: float = DEFAULT_START_TIMEOUT_S) -> PoolWorker:
        """Preflight and start a worker, and wait until it is ready (``worker spawn``).

        ``port`` asks for a port (only without a pool daemon). A worker not ready within
        ``timeout_s`` is stopped and :class:`~rbees_core.pool.workers.
        WorkerStartTimeoutError`-like errors are raised; one that fails while loading
        raises with its error."""

    @abstractmethod
    async def worker_get(self, worker_id: str) -> PoolWorker:
        """One worker; :class:`~rbees_core.errors.NotFoundError` if the pool has none
        with that id."""

    @abstractmethod
    async def worker_list(self) -> list[PoolWorker]:
        """The workers the pool knows, with their live state."""

    @abstractmethod
    async def worker_stop(self, worker_id: str, *, grace_s: float | None = None
                          ) -> PoolWorker:
        """Drain and stop a worker (SIGKILL after ``grace_s``, None: the pool's default)
        and wait until it is gone; returns its last entry."""

    async def worker_stop_all(self, *, grace_s: float | None = None) -> list[PoolWorker]:
        """Stop every live worker of the pool at once (``worker stop --all``)."""
        import asyncio

        from rbees_core.api.pool import LIVE_WORKER_STATES

        live = [w.worker_id for w in await self.worker_list() if w.state in
                LIVE_WORKER_STATES]
        return list(await asyncio.gather(*(self.worker_stop(i, grace_s=grace_s)
                                           for i in live)))

    async def worker_logs(self, worker_id: str, *, lines: int = 50, follow: bool = False,
                          on_line: LineCallback | None = None) -> list[str]:
        """A worker's log lines (JSON lines, the last ``lines``); with ``follow`` it keeps
        reading until cancelled. Each line goes to ``on_line`` as it arrives."""
        raise self.unsupported("worker logs")

    async def down(self, *, timeout_s: float = 45.0, grace_s: float = 10.0) -> JsonObject:
        """Stop everything rbees runs on the host (``rbees-pool down``): its pool-managerd
        (SIGKILL after ``timeout_s``) and every worker still recorded there, one whose
        pool died included (SIGKILL after ``grace_s``); a recorded pid that another
        program got since is left alone. Returns ``{"pool_managerd": {"pid", "state"},
        "workers": [...]}``. Called by ``rbees down``."""
        raise self.unsupported("down", "it cannot reach a host whose pool daemon is gone; "
                               "use an ssh or local host for it")

    # -- the git checkout ----------------------------------------------------------------

    async def git_status(self, *, checkout: str | None = None) -> JsonObject:
        """The checkout's branch, commit, upstream and changes (``git status``)."""
        raise self.unsupported("git status")

    async def git_pull(self, *, checkout: str | None = None) -> JsonObject:
        """Fast-forward the checkout and update its submodules (``git pull``)."""
        raise self.unsupported("git pull")

    async def git_submodules(self, *, checkout: str | None = None) -> list[JsonObject]:
        """The submodules declared in .gitmodules (``git submodules list``)."""
        raise self.unsupported("git submodules list")

    async def git_submodule_status(self, *, checkout: str | None = None
                                   ) -> list[JsonObject]:
        """Each submodule's state and commit (``git submodules status``)."""
        raise self.unsupported("git submodules status")

    async def git_submodule_update(self, paths: list[str] | None = None, *,
                                   remote: bool = False, checkout: str | None = None
                                   ) -> list[JsonObject]:
        """Initialise and check out submodules (all when ``paths`` is empty)."""
        raise self.unsupported("git submodules update")

    # -- lifetime ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Release the client's connections; calling it twice is fine."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
