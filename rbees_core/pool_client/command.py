"""The pool client that runs ``rbees-pool ... --format json`` on the host:
:class:`CommandPoolClient`.

It is what a transport that can run a program (``ssh``, ``local``, a plugin's) gives its
host (:meth:`rbees_core.transport.Transport.pool_client`). Each operation is one rbees-pool
command line, built here, with every argument after ``--`` or an option name, and arguments
checked before anything is sent (no shell syntax in model references and paths, worker ids
of ``ID_PATTERN``). This module is the one place where rbees reads another program's output:
rbees-pool's JSON (one document, or one JSON object per line for a download).

A command that fails there (exit status not 0) raises: the remote JSON error event's class
for a download (:func:`rbees_core.errors.from_envelope`), else
:class:`rbees_core.errors.PoolCommandError` with rbees-pool's one error line as the message
and its exit code. The other lines rbees-pool prints on stderr (warnings) go to
:attr:`~rbees_core.pool_client.PoolClient.on_notice` as they arrive.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from rbees_core.api.pool import (
    DownloadedModel,
    DownloadProgress,
    PoolModel,
    PoolStatus,
    PoolWorker,
    WorkerStartRequest,
)
from rbees_core.errors import (
    InvalidParamsError,
    NotFoundError,
    PoolCommandError,
    RbeesError,
    TransportError,
    from_envelope,
)
from rbees_core.pool_client import (
    DEFAULT_START_TIMEOUT_S,
    JsonObject,
    LineCallback,
    PoolClient,
    ProgressCallback,
    check_ref,
    parse,
)


class Ran(Protocol):
    """What a command did: :class:`rbees_core.transport.TransportResult`."""

    @property
    def exit_code(self) -> int: ...
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...


class Runner(Protocol):
    """Runs ``rbees-pool argv...`` on the host: :meth:`rbees_core.transport.Transport.run`."""

    async def __call__(self, argv: Sequence[str], *, on_line: LineCallback | None = None,
                       on_stderr: LineCallback | None = None) -> Ran: ...

#: How rbees-pool starts its one error line on stderr.
ERROR_PREFIX = "rbees-pool: error: "


class CommandPoolClient(PoolClient):
    """A pool host's operations as ``rbees-pool`` commands, each run with ``run``.

    Made by :meth:`rbees_core.transport.Transport.pool_client` with the transport's
    :meth:`~rbees_core.transport.Transport.run`, the host's ``name`` and the transport's
    (``kind``); the transport owns the connection (close the transport). Raises what
    ``run`` raises, and what the module's docstring says.
    """

    def __init__(self, run: Runner, *, name: str, kind: str = "command") -> None:
        super().__init__(name)
        self.run = run
        self.kind = kind

    # -- running one command -------------------------------------------------------------

    async def _run(self, argv: list[str], *, on_line: LineCallback | None = None,
                   accept: tuple[int, ...] = (0,)) -> Ran:
        """``rbees-pool argv...``; raises unless it exits with one of ``accept``."""
        errors: list[str] = []

        def stderr(line: str) -> None:
            if line.startswith(ERROR_PREFIX):
                errors.append(line[len(ERROR_PREFIX):])
            elif self.on_notice is not None and line.strip():
                self.on_notice(line)

        result = await self.run(argv, on_line=on_line, on_stderr=stderr)
        if result.exit_code in accept:
            return result
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = errors or [line[len(ERROR_PREFIX):] for line in lines
                            if line.startswith(ERROR_PREFIX)]
        reason = errors[-1] if errors else (lines[-1].strip() if lines else
                                            f"rbees-pool exited {result.exit_code}")
        if result.exit_code == 130:
            reason = "interrupted"
        raise PoolCommandError(f"{self.name}: {reason}", exit_code=result.exit_code)

    def _json(self, stdout: str) -> Any:
        try:
            return json.loads(stdout)
        except ValueError as exc:
            raise TransportError(f"{self.name}: rbees-pool printed something that is not "
                                 f"JSON: {stdout.strip()[:200]!r}") from exc

    async def _data(self, *argv: str, accept: tuple[int, ...] = (0,)) -> Any:
        """The JSON that ``rbees-pool argv... --format json`` prints (options before ``--``
        in ``argv``: the ``--format json`` goes just before it)."""
        words = list(argv)
        cut = words.index("--") if "--" in words else len(words)
        result = await self._run([*words[:cut], "--format", "json", *words[cut:]],
                                 accept=accept)
        return self._json(result.stdout)

    # -- the host ------------------------------------------------------------------------

    async def version(self) -> str:
        try:
            result = await self._run(["--version"])
        except PoolCommandError as exc:
            raise PoolCommandError(f"{self.name}: rbees-pool --version failed: "
                                   f"{exc.message.removeprefix(self.name + ': ')}",
                                   exit_code=exc.exit_code) from exc
        words = result.stdout.split()
        if len(words) != 2 or words[0] != "rbees-pool":
            raise PoolCommandError(f"{self.name}: rbees-pool --version failed: "
                                   f"{result.stdout.strip()[:200]!r}")
        return words[1]

    async def status(self) -> PoolStatus:
        return parse(self.name, PoolStatus,  # type: ignore[no-any-return]
                     await self._data("status"))

    # -- models --------------------------------------------------------------------------

    async def models_list(self) -> list[PoolModel]:
        return [parse(self.name, PoolModel, m) for m in await self._data("models", "list")]

    async def models_catalog(self) -> list[JsonObject]:
        return list(await self._data("models", "catalog"))

    async def models_info(self, model: str) -> JsonObject:
        return dict(await self._data("models", "info", "--", check_ref(model, "model")))

    async def models_verify(self, model: str) -> list[JsonObject]:
        # rbees-pool prints the rows, then exits 1 when one differs: the rows are the answer
        return list(await self._data("models", "verify", "--", check_ref(model, "model"),
                                     accept=(0, 1)))

    async def models_remove(self, model: str, *, force: bool = False) -> list[PoolModel]:
        rows = await self._data("models", "rm", *(["--force"] if force else []), "--",
                                check_ref(model, "model"))
        return [parse(self.name, PoolModel, m) for m in rows]

    async def models_download(self, model: str, *, force: bool = False,
                              progress: ProgressCallback | None = None) -> DownloadedModel:
        check_ref(model, "model")
        end: list[dict[str, Any]] = []
        failed: list[RbeesError] = []

        def line(text: str) -> None:
            if not text.strip():
                return
            event = self._json(text)
            kind = event.pop("event", None) if isinstance(event, dict) else None
            if kind == "progress" and progress is not None:
                progress(DownloadProgress(
                    bytes_done=int(event["bytes_done"]), bytes_total=event.get("bytes_total"),
                    rate_bps=float(event.get("rate_bps") or 0),
                    stage=str(event.get("stage", "download"))))
            elif kind == "end":
                end.append(event)
            elif kind == "error":
                failed.append(from_envelope(str(event.get("code")),
                                            f"{self.name}: {event.get('message')}"))

        argv = ["models", "download", *(["--force"] if force else []), "--format", "json",
                "--", model]
        try:
            await self._run(argv, on_line=line)
        except PoolCommandError as exc:
            if failed:
                raise failed[-1] from exc
            raise
        if not end:
            raise TransportError(f"{self.name}: rbees-pool models download ended without "
                                 "its end line")
        return parse(self.name, DownloadedModel, end[-1])  # type: ignore[no-any-return]

    # -- workers -------------------------------------------------------------------------

    async def worker_start(self, request: WorkerStartRequest, *, port: int | None = None,
                           timeout_s: float = DEFAULT_START_TIMEOUT_S) -> PoolWorker:
        kind, _, index = request.device.partition(":")
        argv = ["worker", "spawn", "--model", check_ref(request.model_ref, "model"),
                "--backend", request.backend, "--slots", str(request.slots),
                "--timeout", f"{timeout_s:g}"]
        if index:
            argv += ["--device", index]
        if request.ctx is not None:
            argv += ["--ctx", str(request.ctx)]
        if request.threads is not None:
            argv += ["--threads", str(request.threads)]
        if request.embedding:
            argv += ["--embedding"]
        if request.n_gpu_layers is not None:
            argv += ["--n-gpu-layers", str(request.n_gpu_layers)]
        if request.tensor_split:
            argv += ["--tensor-split", ",".join(map(str, request.tensor_split))]
        if port is not None:
            argv += ["--port", str(port)]
        return parse(self.name, PoolWorker,  # type: ignore[no-any-return]
                     await self._data(*argv, "--", kind))

    async def worker_get(self, worker_id: str) -> PoolWorker:
        self._known_id(worker_id)
        for worker in await self.worker_list():
            if worker.worker_id == worker_id:
                return worker
        raise NotFoundError(f"{self.name}: no worker {worker_id!r} in this pool",
                            details={"worker_id": worker_id})

    async def worker_list(self) -> list[PoolWorker]:
        return [parse(self.name, PoolWorker, w) for w in await self._data("worker", "list")]

    def _grace(self, grace_s: float | None) -> list[str]:
        return [] if grace_s is None else ["--grace", f"{grace_s:g}"]

    async def worker_stop(self, worker_id: str, *, grace_s: float | None = None
                          ) -> PoolWorker:
        rows = await self._data("worker", "stop", *self._grace(grace_s), "--",
                                self._known_id(worker_id))
        return parse(self.name, PoolWorker, rows[0])  # type: ignore[no-any-return]

    async def worker_stop_all(self, *, grace_s: float | None = None) -> list[PoolWorker]:
        rows = await self._data("worker", "stop", "--all", *self._grace(grace_s))
        return [parse(self.name, PoolWorker, w) for w in rows]

    async def worker_logs(self, worker_id: str, *, lines: int = 50, follow: bool = False,
                          on_line: LineCallback | None = None) -> list[str]:
        if lines < 1:
            raise InvalidParamsError("lines", "must be >= 1")
        argv = ["worker", "logs", *(["--follow"] if follow else []), "--lines", str(lines),
                "--", self._known_id(worker_id)]
        result = await self._run(argv, on_line=on_line)
        return result.stdout.splitlines()

    async def down(self, *, timeout_s: float = 45.0, grace_s: float = 10.0) -> JsonObject:
        return dict(await self._data("down", "--timeout", f"{timeout_s:g}",
                                     "--grace", f"{grace_s:g}"))

    # -- the git checkout ----------------------------------------------------------------

    def _checkout(self, checkout: str | None) -> list[str]:
        return [] if checkout is None else ["--checkout", check_ref(checkout, "checkout")]

    async def git_status(self, *, checkout: str | None = None) -> JsonObject:
        return dict(await self._data("git", "status", *self._checkout(checkout)))

    async def git_pull(self, *, checkout: str | None = None) -> JsonObject:
        return dict(await self._data("git", "pull", *self._checkout(checkout)))

    async def git_submodules(self, *, checkout: str | None = None) -> list[JsonObject]:
        return list(await self._data("git", "submodules", "list", *self._checkout(checkout)))

    async def git_submodule_status(self, *, checkout: str | None = None
                                   ) -> list[JsonObject]:
        return list(await self._data("git", "submodules", "status",
                                     *self._checkout(checkout)))

    async def git_submodule_update(self, paths: list[str] | None = None, *,
                                   remote: bool = False, checkout: str | None = None
                                   ) -> list[JsonObject]:
        checked = [check_ref(p, "paths") for p in paths or ()]
        return list(await self._data("git", "submodules", "update",
                                     *(["--remote"] if remote else []),
                                     *self._checkout(checkout), "--", *checked))
