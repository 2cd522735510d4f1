"""This host's pool-managerd, found through the files it leaves under ``$RBEES_HOME``, and
``rbees-pool worker ...`` through it when it runs.

The JSON is the same as the direct path's (:meth:`rbees_core.pool.workers.WorkerRecord.to_dict`
keys), so scripts and ``rbees pool ... --host`` cannot tell which path answered.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx

from rbees_core.errors import InvalidParamsError, RbeesError
from rbees_core.pool.workers import WorkerRecord, WorkerStartTimeoutError


@attrs.frozen
class DaemonFiles:
    """Where this ``$RBEES_HOME``'s pool-managerd (one per home) leaves its traces: pid and
    url in the runtime directory (:func:`rbees_core.config.runtime_dir`), log in the data one.

    ``pid`` is written by pool-managerd itself; ``url`` and ``log`` by ``rbees-pool daemon
    start``, which removes ``url`` again at ``stop``.
    """

    pid: Path
    url: Path
    log: Path


def daemon_files() -> DaemonFiles:
    """The files of this ``$RBEES_HOME``'s pool-managerd (they may not exist)."""
    from rbees_core.config import rbees_home, runtime_dir

    run = runtime_dir()
    return DaemonFiles(pid=run / "pool-managerd.pid", url=run / "pool-managerd.url",
                       log=rbees_home() / "logs" / "pool-managerd.log")


def running_pid() -> int | None:
    """The pid of this ``$RBEES_HOME``'s pool-managerd, if it still runs (the pid file's
    process, when it is pool-managerd started before the file was written: a pid reused
    by another program since is not taken for it)."""
    from rbees_core.processes import pid_file_process

    proc = pid_file_process(daemon_files().pid, "pool-managerd",
                            "rbees_core.programs.pool_managerd")
    return None if proc is None else proc.pid


def daemon_url() -> str | None:
    """The URL of this RBEES_HOME's pool-managerd if it is running, else None."""
    url_file = daemon_files().url
    if running_pid() is None or not url_file.exists():
        return None
    return url_file.read_text().strip() or None


def _client(url: str) -> httpx.Client:
    from rbees_core.config import auth_headers
    from rbees_core.tls import client_context

    return httpx.Client(base_url=url, headers=auth_headers(), timeout=30,
                        verify=client_context())


def _check(answer: httpx.Response) -> Any:
    if answer.status_code >= 400:
        try:
            error = answer.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise RbeesError(f"pool-managerd answered {answer.status_code}") from None
        from rbees_core.pool.file_roots import SETTING, OutsideRootsError

        if error.get("code") == "INVALID_PARAMS" and SETTING in str(error.get("message")):
            raise OutsideRootsError("", str(error["message"]))  # a usage error, as without it
        raise RbeesError(f"{error['message']} ({error['code']})")
    return answer.json() if answer.content else None


def as_record(entry: dict[str, Any]) -> dict[str, Any]:
    """A pool-managerd worker entry in the shape of the direct path's JSON."""
    out = {key: entry.get(key) for key in WorkerRecord.json_keys()}
    where = urlsplit(str(entry.get("uri")))
    out["port"], out["host"] = where.port, where.hostname
    out["tls"] = where.scheme == "https"
    out["model_path"] = None  # the daemon's API does not carry it
    return out


def list_workers(url: str) -> list[dict[str, Any]]:
    with _client(url) as client:
        return [as_record(w) for w in _check(client.get("/v2/workers"))["workers"]]


def spawn(url: str, body: dict[str, Any], *, port: int | None, timeout: float
          ) -> dict[str, Any]:
    if port is not None:
        raise InvalidParamsError("--port", "pool-managerd chooses the port of its workers")
    with _client(url) as client:
        started = _check(client.post("/v2/workers/start", json=body))
        worker_id = started["worker_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = _check(client.get(f"/v2/workers/{worker_id}"))
            if entry["state"] in ("ready", "busy"):
                return as_record(entry)
            if entry["state"] in ("failed", "stopped"):
                raise RbeesError(f"worker {worker_id} {entry['state']}: {entry.get('error')}")
            time.sleep(0.05)
    raise WorkerStartTimeoutError(f"worker {worker_id} was not ready after {timeout:.0f} s")


def stop(url: str, worker_id: str, *, grace: float) -> dict[str, Any]:
    with _client(url) as client:
        _check(client.post(f"/v2/workers/{worker_id}/stop"))
        deadline = time.monotonic() + grace + 5
        entry = _check(client.get(f"/v2/workers/{worker_id}"))
        while entry["state"] not in ("stopped", "failed") and time.monotonic() < deadline:
            time.sleep(0.05)
            entry = _check(client.get(f"/v2/workers/{worker_id}"))
        return as_record(entry)
