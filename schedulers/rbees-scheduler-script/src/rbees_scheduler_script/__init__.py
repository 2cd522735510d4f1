"""rbees plugin: placement policies written in Starlark (``[scheduler] policy = "script"``).

:class:`ScriptScheduler` runs a script's ``schedule(ctx)`` in a sandbox process with a time
and memory budget, checks what it returns against the snapshot, and lets the default policy
decide whenever the script fails. Its entry module stays cheap: ``starlark`` is imported
when a scheduler is built.
"""

from __future__ import annotations

from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import Scheduler
from rbees_scheduler_script.scheduler import FAILURE_REASONS, ScriptScheduler, check_syntax

__all__ = ["FAILURE_REASONS", "ScriptScheduler", "check_syntax"]


@hookimpl
def rbees_register_schedulers() -> list[type[Scheduler]]:
    return [ScriptScheduler]
