"""rbees plugin: the built-in placement policies.

``least-loaded`` (the default), ``most-free-memory``, ``round-robin``, ``binpack`` and
``spread``; see :mod:`rbees_scheduler_builtin.policies` for what each one ranks and
:mod:`rbees_scheduler_builtin.analysis` for the rules they share.
"""

from __future__ import annotations

from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import Scheduler
from rbees_scheduler_builtin.analysis import Analysis
from rbees_scheduler_builtin.policies import (
    POLICIES,
    Binpack,
    BuiltinPolicy,
    LeastLoaded,
    MostFreeMemory,
    RoundRobin,
    Spread,
)

#: The policy rbees uses when the configuration names none.
DEFAULT_POLICY = LeastLoaded.name

__all__ = ["DEFAULT_POLICY", "POLICIES", "Analysis", "Binpack", "BuiltinPolicy", "LeastLoaded",
           "MostFreeMemory", "RoundRobin", "Spread"]


@hookimpl
def rbees_register_schedulers() -> list[type[Scheduler]]:
    return list(POLICIES)
