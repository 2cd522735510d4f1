"""rbees plugin: placement policies written in Starlark (``[scheduler] policy = "script"``).

:class:`ScriptScheduler` runs a script's ``schedule(ctx)`` in a sandbox process with a time
and memory budget, checks what it returns against the snapshot, and lets the default policy
decide whenever the script fails. Its entry module stays cheap: the scheduler
(:mod:`rbees_scheduler_script.scheduler`) is imported when a program asks for schedulers,
``starlark`` when a scheduler is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl
from rbees_core.plugins import lazy_exports

if TYPE_CHECKING:
    from rbees_core.interfaces import Scheduler
    from rbees_scheduler_script.scheduler import FAILURE_REASONS, ScriptScheduler, check_syntax

__all__ = ["FAILURE_REASONS", "ScriptScheduler", "check_syntax"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "rbees_scheduler_script.scheduler"))


@hookimpl
def rbees_register_schedulers() -> list[type[Scheduler]]:
    from rbees_scheduler_script.scheduler import ScriptScheduler

    return [ScriptScheduler]
