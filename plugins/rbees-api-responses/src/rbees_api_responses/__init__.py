"""rbees-api-responses: OpenAI's Responses API (stateless) on rbees-orcd, a client-protocol
plugin.

``POST /v1/responses``, streamed and not, over the same queue, scheduler and workers as
``/v1/chat/completions`` (:mod:`.responses`; the request and the answer's items in
:mod:`.request`, the event stream in :mod:`.stream`). Errors are OpenAI's (the path is
under ``/v1/``); the token is the bearer header, as OpenAI's SDKs send it. Field by field:
docs/protocols.md.

This module stays cheap to import (``rbees --help`` loads every plugin): the routes are
imported when rbees-orcd asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from starlette.routing import BaseRoute


@hookimpl
def rbees_register_routes(program: str) -> list[BaseRoute]:
    """Called by rbees-orcd's app factory: ``POST /v1/responses`` (none for other
    daemons)."""
    if program != "rbees-orcd":
        return []
    try:
        from rbees_core.protocols import openai_body  # noqa: F401 (the shared layer)
    except ImportError:  # an rbees older than the shared protocol layer: nothing to serve
        return []
    from rbees_api_responses.responses import routes

    return routes()


__all__ = ["rbees_register_routes"]
