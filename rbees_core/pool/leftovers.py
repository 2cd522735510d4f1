"""What rbees left running on this host (this ``$RBEES_HOME``), found and stopped.

A pool-managerd killed with SIGKILL (or a host whose ``rbees-pool worker spawn`` workers
nobody stopped) leaves ``rbees-workerd`` processes with no manager. They are found through
their records (``$RBEES_HOME/workers/*/state.json``, :mod:`rbees_core.pool.workers`) and
recognised by :func:`rbees_core.processes.find` (program, ``--worker-id``, start time), so
a pid that another process got since is never signalled.

- :func:`down` is ``rbees-pool down`` (and what ``rbees down`` runs on every host): stop
  this home's pool-managerd (it drains its workers), then every worker still recorded.
- :func:`previous_run` is pool-managerd's start: the workers a previous pool-managerd of
  this home started (their command line has ``--callback-url``) and that still run are
  stopped, never adopted (the reasons are in docs/contract.md, "Leftover workers"); records
  of processes that are gone are removed. Workers of ``rbees-pool worker spawn`` (no
  daemon) are left alone: they are not the daemon's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs

from rbees_core.errors import NotFoundError
from rbees_core.pool import workers
from rbees_core.processes import find, pid_file_process, terminate

POOL_PROGRAM = "pool-managerd"
POOL_MODULE = "rbees_core.programs.pool_managerd"


@attrs.frozen
class Leftover:
    """A recorded worker found at pool-managerd's start: its record and whether it runs and
    was started by a pool-managerd (``daemon``)."""

    record: workers.WorkerRecord
    running: bool
    daemon: bool


def _stop(worker_id: str, grace: float) -> workers.WorkerRecord | None:
    try:
        return workers.stop(worker_id, grace=grace)
    except NotFoundError:  # stopped and forgotten meanwhile (by its daemon, another stop)
        return None


def stop_workers(worker_ids: list[str], *, grace: float) -> list[workers.WorkerRecord]:
    """Stop the workers ``worker_ids`` all at once (:func:`rbees_core.pool.workers.stop`:
    drain, SIGKILL after ``grace``, records removed); their last records, ``dead`` for a
    record whose process was already gone. Blocks up to ``grace`` + a few seconds."""
    if not worker_ids:
        return []
    with ThreadPoolExecutor(max_workers=min(len(worker_ids), 32)) as pool:
        done = list(pool.map(lambda i: _stop(i, grace), worker_ids))
    return [r for r in done if r is not None]


def previous_run() -> list[Leftover]:
    """The recorded workers of this home, each with whether it runs and whether a
    pool-managerd started it; the records of processes that are gone are removed here.
    Called by pool-managerd before it starts any worker. Raises nothing."""
    found = []
    for record in workers.records():
        proc = find(record.pid, workers.expected(record))
        if proc is None:
            (workers.worker_dir(record.worker_id) / "state.json").unlink(missing_ok=True)
            found.append(Leftover(record, running=False, daemon=False))
            continue
        try:
            daemon = "--callback-url" in proc.cmdline()
        except Exception:  # it exited meanwhile
            daemon = False
        found.append(Leftover(record, running=True, daemon=daemon))
    return found


def pool_managerd() -> Any:
    """This home's pool-managerd process (:func:`rbees_core.processes.find` through its
    pid file), or None when none runs."""
    from rbees_core.pool.via_daemon import daemon_files

    return pid_file_process(daemon_files().pid, POOL_PROGRAM, POOL_MODULE)


def down(*, timeout: float = 45.0, grace: float = 10.0) -> dict[str, Any]:
    """Stop everything rbees runs from this home: pool-managerd (SIGTERM: it drains its
    workers; SIGKILL after ``timeout``), then every recorded worker that still runs (its
    pool died, or ``rbees-pool worker spawn`` started it): drain, SIGKILL after ``grace``.

    Called by ``rbees-pool down`` and, in-process, by ``rbees down`` for its own host.
    Returns ``{"pool_managerd": {"pid", "state"}, "workers": [record, ...]}`` with
    ``state`` ``stopped``, ``killed`` or ``not running``. Raises nothing of its own."""
    from rbees_core.pool.via_daemon import daemon_files

    pool: dict[str, Any] = {"pid": None, "state": "not running"}
    proc = pool_managerd()
    if proc is not None:
        ended = terminate(proc, grace=timeout)
        pool = {"pid": proc.pid, "state": "killed" if ended == "killed" else "stopped"}
    if pool["state"] != "not running" or daemon_files().url.exists():
        daemon_files().url.unlink(missing_ok=True)
    ids = [r.worker_id for r in workers.records()]
    stopped = stop_workers(ids, grace=grace)
    return {"pool_managerd": pool, "workers": [r.to_dict() for r in stopped]}
