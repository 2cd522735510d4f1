"""The web UI of rbees-orcd: one page and its static files, served from the package.

``GET /`` is the page, ``GET /ui/{name}`` its scripts (plain JavaScript modules, no build
step) and styles, all read from ``rbees_core/web/`` once when the routes are built. Nothing
comes from elsewhere, so the UI works offline. Both paths are open without a token
(:data:`rbees_core.http.OPEN_PATHS`): the page loads first, then asks for the token when
the API answers 401. The Content-Security-Policy allows only this origin's scripts and no
inline ones, a second wall behind the UI rendering model output as text.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import PurePath

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from rbees_core.api import openapi
from rbees_core.errors import NotFoundError

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def assets() -> dict[str, bytes]:
    """The UI's files by name (``index.html``, ``app.js``, ...), read from the package."""
    root = resources.files("rbees_core") / "web"
    return {item.name: item.read_bytes() for item in root.iterdir()
            if item.is_file() and PurePath(item.name).suffix in TYPES}


def routes() -> list[BaseRoute]:
    files = assets()
    tags = {name: '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            for name, body in files.items()}

    def answer(request: Request, name: str) -> Response:
        headers = {"ETag": tags[name], "Cache-Control": "no-cache",
                   "X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP,
                   "Referrer-Policy": "no-referrer"}
        if request.headers.get("if-none-match") == tags[name]:
            return Response(status_code=304, headers=headers)
        return Response(files[name], media_type=TYPES[PurePath(name).suffix], headers=headers)

    async def page(request: Request) -> Response:
        return answer(request, "index.html")

    async def asset(request: Request) -> Response:
        name = str(request.path_params["name"])
        if name not in files:
            raise NotFoundError(f"no UI file {name!r}", details={"name": name[:128]})
        return answer(request, name)

    return [Route("/", page, methods=["GET"]), Route("/ui/{name}", asset, methods=["GET"])]


OPERATIONS = [
    openapi.Operation("GET", "/", "the web UI (chat, dashboard, models)", open=True),
    openapi.Operation("GET", "/ui/{name}", "the web UI's scripts and styles", open=True,
                      errors={"404": "no such file"}),
]
