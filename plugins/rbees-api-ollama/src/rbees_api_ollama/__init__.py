"""rbees plugin: Ollama's API on rbees-orcd, under ``/api/`` on the same port.

Apps that speak Ollama (Open WebUI, editor plugins, Home Assistant, the ``ollama`` Python
package) point at rbees-orcd's address and run their chats, generations and embeddings
through its queue, scheduler and workers. The routes (:func:`routes`) are added to
rbees-orcd only, through the ``rbees_register_routes`` hook; every error under ``/api/`` is
Ollama's ``{"error": "..."}``. Auth is rbees-orcd's own: with a token configured, every
``/api/`` request must carry ``Authorization: Bearer <token>`` (the ``ollama`` package sends
it from ``OLLAMA_API_KEY``, or ``headers=``); without one (a loopback bind only), Ollama's
clients need none. Field by field: docs/protocols.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

#: the path prefix of every route, and of the errors in Ollama's shape
PREFIX = "/api/"


def routes() -> list[BaseRoute]:
    """Ollama's endpoints, as rbees-orcd serves them."""
    from starlette.routing import Route

    from rbees_api_ollama import chat, embed, models

    return [
        Route("/api/chat", chat.chat, methods=["POST"]),
        Route("/api/generate", chat.generate, methods=["POST"]),
        Route("/api/version", models.version, methods=["GET"]),
        Route("/api/tags", models.tags, methods=["GET"]),
        Route("/api/show", models.show, methods=["POST"]),
        Route("/api/ps", models.ps, methods=["GET"]),
        Route("/api/pull", models.pull, methods=["POST"]),
        Route("/api/delete", models.delete, methods=["DELETE"]),
        Route("/api/embed", embed.embed, methods=["POST"]),
        Route("/api/embeddings", embed.embeddings, methods=["POST"]),
    ]


@hookimpl
def rbees_register_routes(program: str) -> list[BaseRoute]:
    """Ollama's routes on rbees-orcd (none on the other daemons); registers Ollama's error
    shape for ``/api/``. Installed beside an rbees kernel older than itself (a part of
    ``rbees_core`` it needs is missing), it serves nothing and logs why, rather than stop
    rbees-orcd from starting."""
    if program != "rbees-orcd":
        return []
    try:
        from rbees_api_ollama.common import error_body
        from rbees_core.http import register_error_shape

        found = routes()
    except ImportError as exc:
        if not (exc.name or "").startswith("rbees_core") and "rbees_core" not in str(exc):
            raise
        from rbees_core.log import Logger

        Logger(program).warning("plugin_disabled", plugin="rbees-api-ollama",
                                reason=f"the rbees kernel is older than it: {exc}")
        return []
    register_error_shape(PREFIX, error_body)
    return found


__all__ = ["PREFIX", "rbees_register_routes", "routes"]
