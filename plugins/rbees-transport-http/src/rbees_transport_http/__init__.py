"""rbees transport ``http``: pool-managerd's API (CONTRACT section 4) with a bearer token.

The host's pool client is the kernel's :class:`rbees_core.pool_client.http.HttpPoolClient`
(the API is the kernel's own wire contract, which rbees-orcd speaks too): status, models
list and download (SSE progress as it arrives), worker start (until ready), get, list and
stop (until stopped). What the API has no endpoint or no room for (models catalog, info,
verify, rm; worker logs; git; ``--port``, ``--grace``) raises
:class:`rbees_core.errors.UnsupportedCommandError` before a request is made. An error
envelope from the pool raises its own class of the rbees error tree; a refused token is
:class:`rbees_core.errors.HostAuthError`. The transport (:mod:`rbees_transport_http.transport`)
is imported when a program asks for transports, httpx when a request is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl
from rbees_core.plugins import lazy_exports

if TYPE_CHECKING:
    from rbees_core.transport import Transport
    from rbees_transport_http.transport import HttpTransport

__all__ = ["HttpTransport"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "rbees_transport_http.transport"))


@hookimpl
def rbees_register_transports() -> list[type[Transport]]:
    from rbees_transport_http.transport import HttpTransport

    return [HttpTransport]
