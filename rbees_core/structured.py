"""Structured output: OpenAI's ``response_format`` as the JSON schema a job is constrained to.

Used by rbees-orcd's ``/v1`` endpoints (and the native API through ``json_schema``) before a
job is admitted: :func:`response_format_schema` turns the request's ``response_format`` into
the schema the worker compiles into a grammar; :func:`check_schema` refuses, as a 400 before
a stream starts, the schemas that are not even shaped like JSON schemas. What the backend's
converter cannot use is refused later, by the worker (also a 400 when not streaming).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rbees_core.errors import InvalidParamsError

#: The schema of ``{"type": "json_object"}``: any JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
MAX_DEPTH = 32


def response_format_schema(fmt: Any, *, field: str = "response_format"
                           ) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` asks for: None for ``text`` (or no format),
    :data:`ANY_OBJECT` for ``json_object``, the ``json_schema.schema`` otherwise (``name``
    and ``strict`` are accepted: rbees always enforces the schema).

    Raises :class:`InvalidParamsError` naming ``field`` for any other value."""
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise InvalidParamsError(field, "must be an object with a type")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    if kind != "json_schema":
        raise InvalidParamsError(
            field, "type must be text, json_object or json_schema")
    spec = fmt.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidParamsError(f"{field}.json_schema", "must be an object with a schema")
    schema = spec.get("schema", ANY_OBJECT)
    check_schema(schema, field=f"{field}.json_schema.schema")
    if isinstance(schema, bool):  # true: any value; false: none (dict(True) was a 500)
        if not schema:
            raise InvalidParamsError(f"{field}.json_schema.schema",
                                     "false accepts no output at all")
        return {}
    return dict(schema)


def check_schema(schema: Any, *, field: str, _depth: int = 0) -> None:
    """Refuse what cannot be a JSON schema: not an object (``true`` and ``false`` aside),
    an unknown ``type``, ``properties`` that are not schemas, ``required`` or ``enum`` that
    are not arrays. A shape check only; the worker's converter reads the rest.

    Raises :class:`InvalidParamsError` naming ``field``."""
    if isinstance(schema, bool):
        return
    if _depth > MAX_DEPTH:
        raise InvalidParamsError(field, f"nests deeper than {MAX_DEPTH} levels")
    if not isinstance(schema, Mapping):
        raise InvalidParamsError(field, "a JSON schema must be an object")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if not isinstance(k, str) or k not in _TYPES:  # {} in a set: TypeError, a 500
            raise InvalidParamsError(field, f"unknown type {k!r}")
    for key in ("required", "enum"):
        if key in schema and not isinstance(schema[key], list):
            raise InvalidParamsError(field, f"{key} must be an array")
    if "required" in schema and not all(isinstance(r, str) for r in schema["required"]):
        raise InvalidParamsError(field, "required must list property names")
    for key in _SUBSCHEMA_KEYS:
        if key in schema:
            check_schema(schema[key], field=f"{field}.{key}", _depth=_depth + 1)
    for key in _SUBSCHEMA_LISTS:
        if key in schema:
            if not isinstance(schema[key], list):
                raise InvalidParamsError(field, f"{key} must be an array of schemas")
            for i, sub in enumerate(schema[key]):
                check_schema(sub, field=f"{field}.{key}[{i}]", _depth=_depth + 1)
    for key in _SUBSCHEMA_MAPS:
        if key in schema:
            if not isinstance(schema[key], Mapping):
                raise InvalidParamsError(field, f"{key} must map names to schemas")
            for name, sub in schema[key].items():
                check_schema(sub, field=f"{field}.{key}.{name}", _depth=_depth + 1)
