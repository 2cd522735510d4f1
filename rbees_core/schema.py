"""Strict construction of attrs types from JSON-like mappings, and their JSON Schema.

The API types (:mod:`rbees_core.api`) and the config types are plain attrs classes whose
fields carry their limits as metadata (see :func:`field`). One description serves three
purposes: :func:`from_mapping` validates untrusted input against it, :func:`json_schema`
turns it into the OpenAPI components, and the code uses the resulting frozen objects.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import attrs

from rbees_core.errors import InvalidParamsError

T = TypeVar("T")

_KEY = "rbees"
_CONSTRAINTS = (
    "minimum", "maximum", "pattern", "min_length", "max_length", "max_items", "item_max_length",
    "forbid",
)


def field(
    *,
    default: Any = attrs.NOTHING,
    factory: Any = None,
    doc: str = "",
    minimum: float | None = None,
    maximum: float | None = None,
    pattern: str | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    max_items: int | None = None,
    item_max_length: int | None = None,
    forbid: str | None = None,
) -> Any:
    """An attrs field with validation limits and a description.

    ``forbid`` is a regular expression that must not match anywhere in a string (for
    example NUL characters or shell metacharacters).
    """
    meta = limits(
        doc=doc, minimum=minimum, maximum=maximum, pattern=pattern, min_length=min_length,
        max_length=max_length, max_items=max_items, item_max_length=item_max_length,
        forbid=forbid,
    )
    if factory is not None:
        return attrs.field(factory=factory, metadata=meta)
    return attrs.field(default=default, metadata=meta)


def limits(*, doc: str = "", **constraints: Any) -> dict[str, Any]:
    """Field metadata for a required field: ``attrs.field(metadata=limits(maximum=3))``.

    (Required fields use ``attrs.field`` directly so that type checkers see no default.)
    """
    unknown = set(constraints) - set(_CONSTRAINTS)
    if unknown:
        raise TypeError(f"unknown constraints {sorted(unknown)}")
    meta = {"doc": doc, **constraints}
    return {_KEY: {k: v for k, v in meta.items() if v is not None and v != ""}}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if attrs.has(tp):
        return "object"
    origin = get_origin(tp)
    if origin is list:
        return "array"
    if origin is dict:
        return "object"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str, meta: Mapping[str, Any]) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors: list[InvalidParamsError] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, meta)
            except InvalidParamsError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise InvalidParamsError(path, f"must be {_type_name(tp)}")
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool) != any(
            isinstance(a, bool) for a in get_args(tp)
        ):
            raise InvalidParamsError(path, f"must be {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise InvalidParamsError(path, "must be an array")
        if meta.get("max_items") is not None and len(value) > meta["max_items"]:
            raise InvalidParamsError(path, f"must have at most {meta['max_items']} items")
        (item_tp,) = get_args(tp)
        item_meta = {}
        if "item_max_length" in meta:
            item_meta["max_length"] = meta["item_max_length"]
        if "forbid" in meta:
            item_meta["forbid"] = meta["forbid"]
        return [_convert(item_tp, v, f"{path}[{i}]", item_meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidParamsError(path, "must be an object")
        return dict(value)
    if attrs.has(tp):
        return from_mapping(tp, value, path=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise InvalidParamsError(path, "must be a boolean")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParamsError(path, "must be an integer")
        if not -(2**63) <= value < 2**63:  # what SQLite, metrics and C code can hold
            raise InvalidParamsError(path, "must fit in a signed 64-bit integer")
        _check_range(value, path, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidParamsError(path, "must be a number")
        try:
            number = float(value)  # an integer of 400 digits is no double
        except OverflowError:
            number = float("inf")
        if number != number or number in (float("inf"), float("-inf")):
            raise InvalidParamsError(path, "must be a finite number")
        _check_range(number, path, meta)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise InvalidParamsError(path, "must be a string")
        check_string(value, path, meta)
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _check_range(value: float, path: str, meta: Mapping[str, Any]) -> None:
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if lo is not None and value < lo:
        raise InvalidParamsError(path, f"must be >= {lo}")
    if hi is not None and value > hi:
        raise InvalidParamsError(path, f"must be <= {hi}")


def check_string(value: str, path: str, meta: Mapping[str, Any]) -> None:
    if meta.get("min_length") is not None and len(value) < meta["min_length"]:
        raise InvalidParamsError(path, f"must be at least {meta['min_length']} characters")
    if meta.get("max_length") is not None and len(value) > meta["max_length"]:
        raise InvalidParamsError(path, f"must be at most {meta['max_length']} characters")
    if meta.get("pattern") is not None and not re.fullmatch(meta["pattern"], value):
        raise InvalidParamsError(path, f"must match {meta['pattern']}")
    if meta.get("forbid") is not None and re.search(meta["forbid"], value):
        raise InvalidParamsError(path, "contains forbidden characters")


def from_mapping(cls: type[T], data: Any, *, path: str = "") -> T:
    """Build ``cls`` from untrusted ``data``, strictly.

    Unknown keys, missing required keys, wrong types and broken limits raise
    :class:`InvalidParamsError` naming the dotted path of the field. After construction a
    ``check()`` method, when the class has one, validates rules across fields.
    """
    if not isinstance(data, Mapping):
        raise InvalidParamsError(path or "body", "must be an object")
    fields = attrs.fields_dict(cls)  # type: ignore[arg-type]
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            raise InvalidParamsError(f"{prefix}{key}", "unknown field")
    hints = _hints(cls)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in data:
            if fld.default is attrs.NOTHING:
                raise InvalidParamsError(f"{prefix}{name}", "is required")
            continue
        meta = fld.metadata.get(_KEY, {})
        kwargs[name] = _convert(hints[name], data[name], f"{prefix}{name}", meta)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of an attrs instance."""
    return attrs.asdict(obj, recurse=True)


def _schema_of(tp: Any, meta: Mapping[str, Any], refs: dict[str, Any]) -> dict[str, Any]:
    if tp is Any:
        return {}
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = [_schema_of(a, meta, refs) for a in args]
        schema: dict[str, Any] = inner[0] if len(inner) == 1 else {"anyOf": inner}
        if type(None) in get_args(tp):
            schema = {"anyOf": [schema, {"type": "null"}]}
        return schema
    origin = get_origin(tp)
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin is list:
        (item_tp,) = get_args(tp)
        item_meta = {"max_length": meta["item_max_length"]} if "item_max_length" in meta else {}
        s: dict[str, Any] = {"type": "array", "items": _schema_of(item_tp, item_meta, refs)}
        if "max_items" in meta:
            s["maxItems"] = meta["max_items"]
        return s
    if origin is dict:
        return {"type": "object"}
    if attrs.has(tp):
        _component(tp, refs)
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    base = {str: "string", int: "integer", float: "number", bool: "boolean"}[tp]
    s = {"type": base}
    for ours, theirs in (
        ("minimum", "minimum"), ("maximum", "maximum"), ("pattern", "pattern"),
        ("min_length", "minLength"), ("max_length", "maxLength"),
    ):
        if ours in meta:
            s[theirs] = meta[ours]
    if "forbid" in meta:
        s["not"] = {"pattern": meta["forbid"]}
    return s


def _component(cls: type, refs: dict[str, Any]) -> None:
    if cls.__name__ in refs:
        return
    refs[cls.__name__] = {}  # placeholder against recursion
    hints = _hints(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for fld in attrs.fields(cls):
        meta = fld.metadata.get(_KEY, {})
        prop = _schema_of(hints[fld.name], meta, refs)
        if meta.get("doc"):
            prop = {**prop, "description": meta["doc"]}
        if fld.default is attrs.NOTHING:
            required.append(fld.name)
        elif not isinstance(fld.default, attrs.Factory) and fld.default is not None:  # type: ignore[arg-type]
            prop = {**prop, "default": fld.default}
        props[fld.name] = prop
    schema: dict[str, Any] = {
        "type": "object", "properties": props, "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    if cls.__doc__:
        schema["description"] = cls.__doc__.strip().splitlines()[0]
    refs[cls.__name__] = schema


def json_schema(cls: type, refs: dict[str, Any]) -> dict[str, Any]:
    """Register ``cls`` (and what it references) in ``refs``; return a ``$ref`` to it."""
    _component(cls, refs)
    return {"$ref": f"#/components/schemas/{cls.__name__}"}
