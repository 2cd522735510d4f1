"""rbees plugin: the built-in placement policies.

``least-loaded`` (the default), ``most-free-memory``, ``round-robin``, ``binpack`` and
``spread``; see :mod:`rbees_scheduler_builtin.policies` for what each one ranks and
:mod:`rbees_scheduler_builtin.analysis` for the rules they share. Both are imported when a
program asks for schedulers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl
from rbees_core.plugins import lazy_exports

if TYPE_CHECKING:
    from rbees_core.interfaces import Scheduler
    from rbees_scheduler_builtin.analysis import Analysis
    from rbees_scheduler_builtin.policies import (
        DEFAULT_POLICY,
        POLICIES,
        Binpack,
        BuiltinPolicy,
        LeastLoaded,
        MostFreeMemory,
        RoundRobin,
        Spread,
    )

__all__ = ["DEFAULT_POLICY", "POLICIES", "Analysis", "Binpack", "BuiltinPolicy", "LeastLoaded",
           "MostFreeMemory", "RoundRobin", "Spread"]
__getattr__ = lazy_exports(__name__, {
    **dict.fromkeys(__all__, "rbees_scheduler_builtin.policies"),
    "Analysis": "rbees_scheduler_builtin.analysis",
})


@hookimpl
def rbees_register_schedulers() -> list[type[Scheduler]]:
    from rbees_scheduler_builtin.policies import POLICIES

    return list(POLICIES)
