"""The http transport: rbees-pool commands as pool-managerd API calls (see the package doc)."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn
from urllib.parse import quote, urlsplit

import attrs

from rbees_core.api.common import ID_PATTERN
from rbees_core.api.pool import LIVE_WORKER_STATES as LIVE
from rbees_core.config import read_token_file
from rbees_core.errors import (
    HostAuthError,
    HostUnreachableError,
    TransportError,
    UnsupportedCommandError,
)
from rbees_core.hosts import HostConfig
from rbees_core.interfaces import LineCallback, Transport, TransportResult
from rbees_core.sse import aiter_events

if TYPE_CHECKING:
    import httpx

SUPPORTED = ("status", "models list", "models download", "worker spawn", "worker list",
             "worker stop")
STATUS_KEYS = ("pool_id", "host", "gpus", "cpu", "workers", "models")
POLL_S = 0.1
STOP_WAIT_S = 60.0


class _Failed(Exception):
    """The pool answered with an error: exit 1, as rbees-pool exits for the same error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UnsupportedCommandError(f"http transport: {message}")


@attrs.frozen
class Command:
    """A parsed rbees-pool command line: its path (``("worker", "spawn")``) and options."""

    path: tuple[str, ...]
    args: argparse.Namespace


def _parser() -> argparse.ArgumentParser:
    def command(group: Any, name: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, add_help=False)
        parser.add_argument("--format", dest="fmt", default="text", choices=("text", "json"))
        return parser

    root = _Parser(prog="rbees-pool", add_help=False)
    root.add_argument("--version", action="store_true")
    groups = root.add_subparsers(dest="group")
    command(groups, "status")
    models = groups.add_parser("models", add_help=False).add_subparsers(dest="command")
    command(models, "list")
    download = command(models, "download")
    download.add_argument("model")
    download.add_argument("--force", action="store_true")
    worker = groups.add_parser("worker", add_help=False).add_subparsers(dest="command")
    command(worker, "list")
    spawn = command(worker, "spawn")
    spawn.add_argument("kind")
    spawn.add_argument("--model", required=True)
    spawn.add_argument("--device", type=int)
    spawn.add_argument("--port", type=int)
    spawn.add_argument("--slots", type=int, default=1)
    spawn.add_argument("--ctx", type=int)
    spawn.add_argument("--backend", default="llamacpp")
    spawn.add_argument("--timeout", type=float, default=60.0)
    stop = command(worker, "stop")
    stop.add_argument("worker_id", nargs="?")
    stop.add_argument("--all", dest="all_", action="store_true")
    stop.add_argument("--grace", type=float)
    return root


def parse_argv(host: str, argv: Sequence[str]) -> Command:
    """The command ``argv`` asks for; :class:`UnsupportedCommandError` for a command or an
    option this transport cannot carry."""
    if list(argv) == ["--version"]:
        return Command(path=("--version",), args=argparse.Namespace())
    words = []
    for word in argv:
        if word.startswith("-"):
            break
        words.append(word)
    path = tuple(words[:1] if words[:1] == ["status"] else words[:2])
    if " ".join(path) not in SUPPORTED:
        asked = " ".join(path) or " ".join(argv[:1])
        raise UnsupportedCommandError(
            f"{host}: the http transport cannot run 'rbees-pool {asked}' (it carries "
            f"{', '.join(SUPPORTED)}); use an ssh host for it")
    args = _parser().parse_args(list(argv))
    if args.fmt != "json":
        raise UnsupportedCommandError(f"{host}: the http transport prints JSON only "
                                      "(--format json)")
    for option, why in (("port", "pool-managerd picks the port"),
                        ("grace", "pool-managerd applies its own stop grace")):
        if getattr(args, option, None) is not None:
            raise UnsupportedCommandError(f"{host}: --{option} is not available over http "
                                          f"({why})")
    return Command(path=path, args=args)


def worker_json(entry: dict[str, Any]) -> dict[str, Any]:
    """A pool-managerd worker entry in rbees-pool's shape (the model's path is not in the
    API; a failed worker keeps its ``error``)."""
    from rbees_core.pool.workers import WorkerRecord

    out = {key: entry.get(key) for key in WorkerRecord.json_keys()}
    out["port"] = urlsplit(entry["uri"]).port
    if entry.get("error"):
        out["error"] = entry["error"]
    return out


class _Output:
    """What the command printed, passed on line by line as rbees-pool would print it."""

    def __init__(self, on_line: LineCallback | None, on_stderr: LineCallback | None) -> None:
        self.on_line, self.on_stderr = on_line, on_stderr
        self.stdout: list[str] = []
        self.stderr: list[str] = []

    def line(self, text: str) -> None:
        self.stdout.append(text + "\n")
        if self.on_line is not None:
            self.on_line(text)

    def json(self, data: Any) -> None:
        for text in json.dumps(data, indent=2, ensure_ascii=False).splitlines():
            self.line(text)

    def error(self, text: str) -> None:
        self.stderr.append(text + "\n")
        if self.on_stderr is not None:
            self.on_stderr(text)


Handler = Callable[["HttpTransport", argparse.Namespace, _Output], Awaitable[None]]


class HttpTransport(Transport):
    """rbees-pool commands over pool-managerd's API at ``url``, with the token of
    ``token_file``."""

    name: ClassVar[str] = "http"

    def __init__(self, host: HostConfig) -> None:
        super().__init__(host)
        self.url = (host.url or "").rstrip("/")
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:
            token = read_token_file(self.host.token_file) if self.host.token_file else None
            self._client = httpx.AsyncClient(
                base_url=self.url, headers={"Authorization": f"Bearer {token}"} if token else {},
                timeout=httpx.Timeout(60.0, connect=self.host.connect_timeout_s))
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _check(self, answer: httpx.Response, body: bytes) -> None:
        if answer.status_code == 401:
            raise HostAuthError(f"{self.host.name}: {self.url} refused the API token "
                                f"({self.host.token_file or 'no --token-file set'})")
        if answer.status_code >= 400:
            try:
                message = json.loads(body)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {answer.status_code} {body[:200]!r}"
            raise _Failed(message)

    def _broken(self, exc: Exception) -> TransportError:
        import httpx

        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return HostUnreachableError(f"{self.host.name}: cannot reach {self.url}: "
                                        f"{exc or type(exc).__name__}")
        return TransportError(f"{self.host.name}: {self.url}: {exc or type(exc).__name__}")

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One API call; the decoded JSON answer (None for an empty one)."""
        import httpx

        try:
            answer = await self.client().request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise self._broken(exc) from None
        self._check(answer, answer.content)
        return answer.json() if answer.content else None

    async def run(self, argv: Sequence[str], *, on_line: LineCallback | None = None,
                  on_stderr: LineCallback | None = None) -> TransportResult:
        command = parse_argv(self.host.name, argv)
        out = _Output(on_line, on_stderr)
        try:
            await HANDLERS[command.path](self, command.args, out)
            code = 0
        except _Failed as exc:
            out.error(f"rbees-pool: error: {exc}")
            code = 1
        return TransportResult(exit_code=code, stdout="".join(out.stdout),
                               stderr="".join(out.stderr))

    # -- the commands ------------------------------------------------------------------------

    async def version(self, args: argparse.Namespace, out: _Output) -> None:
        health = await self.call("GET", "/health")
        await self.call("GET", "/v2/workers")  # /health needs no token; this one does
        out.line(f"rbees-pool {health['version']}")

    async def status(self, args: argparse.Namespace, out: _Output) -> None:
        state = await self.call("GET", "/v2/state")
        out.json({**{key: state[key] for key in STATUS_KEYS},
                  "workers": [worker_json(w) for w in state["workers"]]})

    async def models_list(self, args: argparse.Namespace, out: _Output) -> None:
        out.json((await self.call("GET", "/v2/models"))["models"])

    async def models_download(self, args: argparse.Namespace, out: _Output) -> None:
        import httpx

        body = {"model": args.model, "force": args.force}
        try:
            async with self.client().stream("POST", "/v2/models/download", json=body,
                                            timeout=httpx.Timeout(
                                                None, connect=self.host.connect_timeout_s)
                                            ) as answer:
                if answer.status_code >= 400:
                    self._check(answer, await answer.aread())
                async for frame in aiter_events(answer.aiter_lines()):
                    if frame.event:
                        self._download_event(frame.event, frame.json(), out)
        except httpx.HTTPError as exc:
            raise self._broken(exc) from None

    def _download_event(self, event: str, data: dict[str, Any], out: _Output) -> None:
        if event == "progress":
            out.line(json.dumps({"event": "progress", "stage": data.get("stage", "download"),
                                 "bytes_done": data["bytes_done"],
                                 "bytes_total": data["bytes_total"],
                                 "rate_bps": data.get("rate_bps", 0)}))
        elif event == "end":
            out.line(json.dumps({"event": "end", **data}))
        elif event == "error":
            out.line(json.dumps({"event": "error", **data}))
            raise _Failed(data.get("message", "download failed"))

    async def worker_spawn(self, args: argparse.Namespace, out: _Output) -> None:
        device = args.kind if args.device is None else f"{args.kind}:{args.device}"
        body: dict[str, Any] = {"model_ref": args.model, "backend": args.backend,
                                "device": device, "slots": args.slots}
        if args.ctx is not None:
            body["ctx"] = args.ctx
        import asyncio

        worker_id = (await self.call("POST", "/v2/workers/start", body))["worker_id"]
        deadline = time.monotonic() + args.timeout
        while True:
            entry = await self.call("GET", f"/v2/workers/{quote(worker_id, safe='')}")
            if entry["state"] in ("ready", "busy"):
                out.json(worker_json(entry))
                return
            if entry["state"] not in LIVE:
                raise _Failed(f"worker {worker_id} {entry['state']} while loading: "
                              f"{entry.get('error') or 'exit ' + str(entry.get('exit_code'))}")
            if time.monotonic() > deadline:
                await self.call("POST", f"/v2/workers/{quote(worker_id, safe='')}/stop")
                raise _Failed(f"worker {worker_id} was not ready after {args.timeout:.0f} s; "
                              "stopped it")
            await asyncio.sleep(POLL_S)

    async def worker_list(self, args: argparse.Namespace, out: _Output) -> None:
        out.json([worker_json(w) for w in (await self.call("GET", "/v2/workers"))["workers"]])

    async def worker_stop(self, args: argparse.Namespace, out: _Output) -> None:
        import asyncio

        if args.all_ == (args.worker_id is not None):
            raise _Failed("worker_id: give a worker id or --all")
        if args.all_:
            ids = [w["worker_id"] for w in (await self.call("GET", "/v2/workers"))["workers"]
                   if w["state"] in LIVE]
        elif not re.fullmatch(ID_PATTERN, args.worker_id) or args.worker_id in (".", ".."):
            raise _Failed(f"no worker {args.worker_id!r} in this pool")
        else:
            ids = [args.worker_id]
        stopped = await asyncio.gather(*(self._stop(worker_id) for worker_id in ids))
        out.json([worker_json(entry) for entry in stopped])

    async def _stop(self, worker_id: str) -> dict[str, Any]:
        import asyncio

        path = f"/v2/workers/{quote(worker_id, safe='')}"
        await self.call("POST", f"{path}/stop")
        deadline = time.monotonic() + STOP_WAIT_S
        while True:
            entry: dict[str, Any] = await self.call("GET", path)
            if entry["state"] not in LIVE or time.monotonic() > deadline:
                return entry
            await asyncio.sleep(POLL_S)


HANDLERS: dict[tuple[str, ...], Handler] = {
    ("--version",): HttpTransport.version,
    ("status",): HttpTransport.status,
    ("models", "list"): HttpTransport.models_list,
    ("models", "download"): HttpTransport.models_download,
    ("worker", "spawn"): HttpTransport.worker_spawn,
    ("worker", "list"): HttpTransport.worker_list,
    ("worker", "stop"): HttpTransport.worker_stop,
}
