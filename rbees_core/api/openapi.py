"""OpenAPI 3.1 documents generated from the attrs wire types.

Each daemon describes its routes as :class:`Operation` values; :func:`document` turns them and
the types they name into the document served at ``GET /openapi.json``.
"""

from __future__ import annotations

from typing import Any

import attrs

from rbees_core.api.common import ErrorEnvelope, Health
from rbees_core.schema import json_schema

_ERROR_STATUSES = {
    "400": "invalid request (INVALID_PARAMS)",
    "401": "missing, wrong, expired or revoked credential",
    "413": "body over 1 MiB",
}


@attrs.frozen
class Operation:
    method: str
    path: str
    summary: str
    request: type | None = None
    response: type | None = None
    status: int = 200
    sse: bool = False
    errors: dict[str, str] = attrs.field(factory=dict)
    open: bool = False
    #: what the caller's credential must grant (:data:`rbees_core.auth.ROUTE_SCOPES`);
    #: admin unless said otherwise, so a new route is closed until someone opens it
    scope: str = "admin"


def document(title: str, version: str, operations: list[Operation]) -> dict[str, Any]:
    refs: dict[str, Any] = {}
    err = json_schema(ErrorEnvelope, refs)
    paths: dict[str, Any] = {}
    for op in operations:
        responses: dict[str, Any] = {}
        if op.sse:
            responses[str(op.status)] = {
                "description": "an SSE stream of job events (CONTRACT section 3)",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }
        elif op.response is not None:
            responses[str(op.status)] = {
                "description": op.summary,
                "content": {"application/json": {"schema": json_schema(op.response, refs)}},
            }
        else:
            responses[str(op.status)] = {"description": op.summary}
        statuses = dict(_ERROR_STATUSES) if op.request is not None else {}
        if op.open:
            statuses.pop("401", None)
        elif "401" not in statuses:
            statuses["401"] = _ERROR_STATUSES["401"]
        if not op.open:
            statuses.setdefault("403", f"the credential lacks the {op.scope} scope")
        statuses.update(op.errors)
        for status, text in statuses.items():
            responses[status] = {
                "description": text,
                "content": {"application/json": {"schema": err}},
            }
        entry: dict[str, Any] = {
            "summary": op.summary,
            "responses": responses,
            "operationId": f"{op.method}_{op.path}".replace("/", "_"),
        }
        if op.request is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": json_schema(op.request, refs)}},
            }
        if not op.open:
            entry["security"] = [{"bearer": []}]
            entry["x-rbees-scope"] = op.scope
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    json_schema(Health, refs)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": refs,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
