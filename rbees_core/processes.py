"""Process bookkeeping shared by the daemons, pool-core and the CLIs: is a pid alive, what a
pid file says, and whether a pid is still *our* process before anything signals it.

A pid file or a worker record outlives its process (a SIGKILL, a reboot); the kernel then
hands the pid to some other program. So nothing in rbees signals a pid it read from a file
without :func:`find` first: the process must run the expected program (and arguments, a
worker's ``--worker-id``) and must have existed when the file was written (its start time,
from psutil, no later than the file's time). :func:`terminate` is the one way rbees stops a
process it did not keep a handle on: SIGTERM (or a caller's polite request), then SIGKILL
after a grace. Used by ``rbees down``, ``rbees-pool down``, ``rbees-pool daemon stop``,
``rbees-pool worker stop`` and pool-managerd's start (:mod:`rbees_core.pool.leftovers`).

Cheap to import (the CLIs use it); psutil is imported when a pid is checked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import psutil

#: How much later than the recorded time a process may have started and still be the one
#: recorded (psutil's start time on Linux is boot time + ticks: about a second coarse).
START_SLACK_S = 2.0


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_pid(path: Path) -> int | None:
    """The pid written in ``path``, or None when it is missing or not a number."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@attrs.frozen
class Expected:
    """What a process rbees started looks like, to tell it from one that got its pid later.

    ``program``: the console script it runs (``rbees-workerd``), matched against the base
    name of the first arguments of its command line (``python /venv/bin/rbees-workerd``
    and ``python -m rbees_core.programs.workerd`` both count, through ``module``).
    ``args``: arguments that must follow each other in its command line
    (``("--worker-id", "worker-cpu-0")``). ``started_by``: a time (epoch seconds) at which
    the process already ran, such as when its pid file or record was written; a process
    started later (plus :data:`START_SLACK_S`) is another one.
    """

    program: str
    module: str | None = None
    args: tuple[str, ...] = ()
    started_by: float | None = None


def _runs(cmdline: list[str], expected: Expected) -> bool:
    names = {expected.program, *((expected.module,) if expected.module else ())}
    return any(Path(arg).name in names for arg in cmdline[:3])


def _has(cmdline: list[str], args: tuple[str, ...]) -> bool:
    n = len(args)
    return any(tuple(cmdline[i:i + n]) == args for i in range(len(cmdline) - n + 1))


def find(pid: int | None, expected: Expected) -> psutil.Process | None:
    """The live process ``pid`` if it is the one ``expected`` describes, else None (gone,
    a zombie, another program, started after ``started_by``, or not ours to inspect).

    Called before any signal to a pid read from a file. Raises nothing."""
    import psutil

    if pid is None or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = proc.cmdline()
        created = proc.create_time()
    except (psutil.Error, OSError):  # gone, a zombie, or another user's: not ours
        return None
    if not _runs(cmdline, expected) or (expected.args and not _has(cmdline, expected.args)):
        return None
    if expected.started_by is not None and created > expected.started_by + START_SLACK_S:
        return None
    return proc


def file_time(path: Path) -> float | None:
    """When ``path`` was last written (epoch seconds), None when it is missing."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def pid_file_process(path: Path, program: str, module: str | None = None
                     ) -> psutil.Process | None:
    """The daemon ``path`` (a pid file) names, if it still runs ``program`` and started
    before the file was written; None otherwise (a stale file, a recycled pid)."""
    return find(read_pid(path), Expected(program=program, module=module,
                                         started_by=file_time(path)))


def pid_file_holder(path: Path) -> int | None:
    """The pid ``path`` names if that process still runs and started no later than the file
    was written (any program: a daemon's own pid file, read before it claims it); None for
    a missing file, a dead pid, or a pid another process got after the file was written
    (a stale file, a reboot). A process whose start time cannot be read counts as the
    holder: refusing a start is safer than sharing a home. Raises nothing."""
    import psutil

    pid = read_pid(path)
    if pid is None or pid <= 0 or not pid_alive(pid):
        return None
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None
    except (psutil.Error, OSError):
        return pid
    started_by = file_time(path)
    if started_by is not None and created > started_by + START_SLACK_S:
        return None
    return pid


def terminate(proc: psutil.Process, *, grace: float,
              ask: Callable[[], bool] | None = None, poll: float = 0.05) -> str:
    """Stop ``proc`` (from :func:`find`): ``ask()`` first when given (a polite request,
    such as a worker's ``POST /v2/shutdown``; it returns False when it could not be made),
    else SIGTERM; SIGKILL when it still runs after ``grace`` seconds.

    Returns ``stopped`` (it exited within the grace), ``killed`` or ``gone`` (it had
    already exited). psutil refuses to signal a process whose start time changed, so a pid
    reused meanwhile is never signalled. Raises nothing; blocks up to ``grace`` + 5 s."""
    import psutil

    if not proc.is_running():
        return "gone"
    asked = False
    if ask is not None:
        with contextlib.suppress(Exception):
            asked = bool(ask())
    if not asked:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _running(proc):
            return "stopped"
        time.sleep(poll)
    with contextlib.suppress(psutil.Error):
        proc.kill()
    with contextlib.suppress(psutil.Error):
        proc.wait(5)
    return "killed"


def _running(proc: psutil.Process) -> bool:
    import psutil

    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
