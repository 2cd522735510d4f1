"""rbees-orcd's credential routes (CONTRACT section 5, "Keys"): API keys, usage, join tokens.

Every route here needs ``admin``. ``POST /v2/keys`` and ``POST /v2/keys/{name}/rotate``
answer the key itself, once; nothing answers it again (the store keeps only its hash:
:class:`~rbees_core.orchestrator.keys.KeyRing`). ``POST /v2/pools/{pool_id}/join-token``
answers the token a pool heartbeats with (``rbees pools join-token``).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from rbees_core.api import openapi
from rbees_core.errors import ConflictError, InvalidParamsError
from rbees_core.http import json_response, parse_json, read_body
from rbees_core.programs.orcd_common import path_id, service

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(value: Any) -> float | None:
    """Seconds from now a key lives: ``"30d"``, ``"12h"``, ``"90m"``, ``"3600s"``, a number
    of seconds; None (or absent) never expires. Raises InvalidParamsError (``expires_in``)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise InvalidParamsError("expires_in", "a duration such as 30d, 12h, 90m, 3600s")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


async def _body(request: Request) -> dict[str, Any]:
    data = parse_json(await read_body(request))
    if not isinstance(data, dict):
        raise InvalidParamsError("body", "must be a JSON object")
    return data


async def create_key(request: Request) -> Response:
    body = await _body(request)
    unknown = set(body) - {"name", "scopes", "models", "expires_in", "rpm", "max_jobs",
                           "tpm"}
    if unknown:
        raise InvalidParamsError(sorted(unknown)[0], "unknown field")
    ttl = parse_expiry(body.get("expires_in"))
    keys = service(request).keys
    entry, key = await asyncio.to_thread(
        keys.create, body.get("name", ""), body.get("scopes") or [],
        models=body.get("models"), rpm=body.get("rpm"), max_jobs=body.get("max_jobs"),
        tpm=body.get("tpm"),
        expires_at=None if ttl is None else time.time() + ttl)
    service(request).log.info("key_created", name=entry.name, scopes=list(entry.scopes))
    return json_response({**entry.public(), "key": key}, 201)


async def list_keys(request: Request) -> Response:
    entries = await asyncio.to_thread(service(request).keys.entries)
    return json_response({"keys": [e.public() for e in entries]})


async def revoke_key(request: Request) -> Response:
    name = str(request.path_params["name"])
    entry = await asyncio.to_thread(service(request).keys.revoke, name)
    service(request).log.info("key_revoked", name=name)
    return json_response(entry.public())


async def rotate_key(request: Request) -> Response:
    name = str(request.path_params["name"])
    entry, key = await asyncio.to_thread(service(request).keys.rotate, name)
    service(request).log.info("key_rotated", name=name)
    return json_response({**entry.public(), "key": key})


async def usage(request: Request) -> Response:
    since = request.query_params.get("since")
    rows = await asyncio.to_thread(service(request).keys.usage, since)
    return json_response({"usage": rows})


async def make_join_token(request: Request) -> Response:
    pool_id = path_id(request, "pool_id")
    token = service(request).settings.token
    if token is None:
        raise ConflictError("rbees-orcd runs without credentials (no --api-token-file): a "
                            "pool needs no join token")
    return json_response({"pool_id": pool_id,
                          "join_token": service(request).keys.join_token(pool_id)})


async def revoke_join_token(request: Request) -> Response:
    pool_id = path_id(request, "pool_id")
    if service(request).settings.token is None:
        raise ConflictError("rbees-orcd runs without credentials (no --api-token-file): a "
                            "pool has no join token")
    new = await asyncio.to_thread(service(request).keys.revoke_join_token, pool_id)
    return json_response({"pool_id": pool_id, "join_token": new, "revoked": True})


OPERATIONS = [
    openapi.Operation("POST", "/v2/keys", "make an API key {name, scopes, models?, "
                      "expires_in?, rpm?, max_jobs?, tpm?}; the answer holds the key, "
                      "shown only here",
                      status=201, errors={"400": "bad field", "409": "the name is taken"}),
    openapi.Operation("GET", "/v2/keys", "API keys (never the keys themselves)"),
    openapi.Operation("POST", "/v2/keys/{name}/revoke", "revoke a key at once",
                      errors={"404": "no such live key"}),
    openapi.Operation("POST", "/v2/keys/{name}/rotate",
                      "a new secret for a key (same scopes); the old one stops working",
                      errors={"404": "no such live key"}),
    openapi.Operation("GET", "/v2/usage", "requests and tokens per key, model and day "
                      "(?since=YYYY-MM-DD)"),
    openapi.Operation("POST", "/v2/pools/{pool_id}/join-token",
                      "the join token of a pool: heartbeats for that pool id only",
                      errors={"409": "the daemon runs without credentials"}),
    openapi.Operation("POST", "/v2/pools/{pool_id}/join-token/revoke",
                      "revoke the pool's join token at once; the answer holds its new one "
                      "(the old one, and the control token derived from it, stop working)",
                      errors={"409": "the daemon runs without credentials"}),
]


def routes() -> list[BaseRoute]:
    return [
        Route("/v2/keys", create_key, methods=["POST"]),
        Route("/v2/keys", list_keys, methods=["GET"]),
        Route("/v2/keys/{name}/revoke", revoke_key, methods=["POST"]),
        Route("/v2/keys/{name}/rotate", rotate_key, methods=["POST"]),
        Route("/v2/usage", usage, methods=["GET"]),
        Route("/v2/pools/{pool_id}/join-token", make_join_token, methods=["POST"]),
        Route("/v2/pools/{pool_id}/join-token/revoke", revoke_join_token, methods=["POST"]),
    ]
