"""rbees plugin: the ``echo`` backend, an example of a third-party backend.

rbees finds this module through the entry point ``backend-echo`` of group ``rbees`` and calls
its hook implementations.
"""

from __future__ import annotations

from rbees_backend_echo.backend import EchoBackend, EchoModel
from rbees_core.backend import Backend
from rbees_core.hookspecs import hookimpl

__all__ = ["EchoBackend", "EchoModel"]


@hookimpl
def rbees_register_backends() -> list[type[Backend]]:
    return [EchoBackend]
