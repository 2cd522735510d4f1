"""rbees transport ``local``: ``rbees-pool`` on this same host, as a subprocess.

The transport (:mod:`rbees_transport_local.transport`) is imported when a program asks for
transports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl
from rbees_core.plugins import lazy_exports

if TYPE_CHECKING:
    from rbees_core.transport import Transport
    from rbees_transport_local.transport import LINE_LIMIT, LocalTransport

__all__ = ["LINE_LIMIT", "LocalTransport"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "rbees_transport_local.transport"))


@hookimpl
def rbees_register_transports() -> list[type[Transport]]:
    from rbees_transport_local.transport import LocalTransport

    return [LocalTransport]
