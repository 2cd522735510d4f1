"""rbees-api-anthropic: Anthropic's Messages API on rbees-orcd, a client-protocol plugin.

``POST /v1/messages`` (streamed and not) and ``POST /v1/messages/count_tokens`` over the
same queue, scheduler and workers as the OpenAI endpoints (:mod:`.messages`; the request
and answer shapes in :mod:`.request`, the event stream in :mod:`.stream`). Errors under
``/v1/messages`` are in Anthropic's shape, the middleware's and the router's included; the
token may come as ``x-api-key``, as Anthropic's SDKs send it. Field by field:
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
    """Called by rbees-orcd's app factory: the Messages routes (none for other daemons),
    with Anthropic's error shape registered for their paths."""
    if program != "rbees-orcd":
        return []
    from rbees_api_anthropic.messages import PREFIX, routes
    from rbees_api_anthropic.request import error_body
    from rbees_core.http import register_error_shape

    register_error_shape(PREFIX + "/", error_body)
    return routes()


__all__ = ["rbees_register_routes"]
