"""rbees transport ``http``: pool-managerd's API (CONTRACT section 4) with a bearer token.

It maps the ``rbees-pool`` commands that have an endpoint onto it, and prints what
``rbees-pool ... --format json`` prints, so ``rbees pool`` renders both the same way:

======================================  ==================================================
``--version``                           ``GET /health`` (and ``GET /v2/workers``, which
                                        proves the token)
``status``                              ``GET /v2/state``
``models list``                         ``GET /v2/models``
``models download MODEL [--force]``     ``POST /v2/models/download``; SSE progress becomes
                                        JSON lines as it arrives
``worker spawn KIND --model M ...``     ``POST /v2/workers/start``, then ``GET
                                        /v2/workers/{id}`` until ready
``worker list``                         ``GET /v2/workers``
``worker stop ID|--all``                ``POST /v2/workers/{id}/stop``, then until stopped
======================================  ==================================================

Any other command, or an option the API has no room for (``--port``, ``--grace``), raises
:class:`rbees_core.errors.UnsupportedCommandError` before a request is made. An error
envelope from the pool becomes exit 1 and ``rbees-pool: error: MESSAGE`` on stderr, as
rbees-pool itself reports it; a refused token is :class:`rbees_core.errors.HostAuthError`.
The transport (:mod:`rbees_transport_http.transport`) is imported when a program asks for
transports, httpx when a command runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl
from rbees_core.plugins import lazy_exports

if TYPE_CHECKING:
    from rbees_core.interfaces import Transport
    from rbees_transport_http.transport import HttpTransport, parse_argv

__all__ = ["HttpTransport", "parse_argv"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "rbees_transport_http.transport"))


@hookimpl
def rbees_register_transports() -> list[type[Transport]]:
    from rbees_transport_http.transport import HttpTransport

    return [HttpTransport]

