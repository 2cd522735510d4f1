"""JSON schema to GBNF for llama.cpp's grammar sampler.

The conversion is llama-cpp-python's (``llama_cpp.llama_grammar.json_schema_to_gbnf``, the
Python port of llama.cpp's ``json_schema_to_grammar``), behind the version check of
``tests/test_library_internals.py``. That port ignores numeric bounds (``minimum``,
``maximum``...). Before converting, :func:`schema_to_gbnf` rewrites the bounds it can enforce
into rules of its own:

- an integer range of at most :data:`MAX_INT_ENUM` values becomes an enum of them, a wider
  one that holds 0 (``[-1000, 1000]``) a grammar of digits;
- an integer or a number with ``minimum >= 0`` (and no other bound) cannot be negative;
  ``minimum >= 1`` on an integer makes it positive;
- a number bounded to ``[0, 1]`` (a probability, a score), or to whole bounds at most
  ``2 * MAX_INT_ENUM`` apart (``[-90, 90]``), gets a grammar of its own;
- a list of types (``["string", "null"]``) becomes an ``anyOf``, so that each keeps its
  keywords (the converter drops ``maxLength`` and the bounds of a type list).

Other bounds (``exclusiveMinimum``, fractional bounds like ``[2.5, 7]``, wide ranges,
``multipleOf``) are not enforced; docs/openai.md says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rbees_core.errors import InvalidParamsError

#: Integer ranges up to this many values are enforced as enums.
MAX_INT_ENUM = 256
#: Most bytes of a schema's JSON (a grammar grows with it; so does its cost per token).
MAX_SCHEMA_BYTES = 64 * 1024
_RULES = {
    "nonneg-int": '("0" | [1-9] [0-9]{0,15})',
    "pos-int": "([1-9] [0-9]{0,15})",
    "nonneg-num": '("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,8})?',
    "unit-num": '("0" ("." [0-9]{1,8})? | "1" ("." "0"{1,8})?)',
}


def _bounded(node: dict[str, Any]) -> tuple[str, Any] | None:
    """What to put in place of a bounded numeric schema: ("enum", values), ("rule", name),
    or None (not enforceable: left to the converter, which ignores the bounds)."""
    kind = node.get("type")
    if kind not in ("integer", "number"):
        return None
    lo, hi = node.get("minimum"), node.get("maximum")
    if any(k in node for k in ("exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
        return None
    if lo is None and hi is None:
        return None
    if kind == "integer":
        if lo is not None and hi is not None and hi - lo < MAX_INT_ENUM:
            import math

            return "enum", list(range(math.ceil(lo), math.floor(hi) + 1))
        if (isinstance(lo, int) and isinstance(hi, int) and lo <= 0 <= hi
                and max(hi, -lo) < 10**15):
            negative = f' | "-" {_upto(-lo)}' if lo < 0 else ""
            return "gbnf", f"({_upto(hi)}{negative})"
        if hi is None and lo == 1:
            return "rule", "pos-int"
        if hi is None and lo == 0:
            return "rule", "nonneg-int"
        return None
    if lo == 0 and hi is None:
        return "rule", "nonneg-num"
    if lo == 0 and hi == 1:
        return "rule", "unit-num"
    if (isinstance(lo, int | float) and isinstance(hi, int | float) and float(lo).is_integer()
            and float(hi).is_integer() and 0 <= hi - lo <= 2 * MAX_INT_ENUM):
        return "gbnf", _number_range(int(lo), int(hi))
    return None


def _upto(n: int) -> str:
    """GBNF of the integers 0 to ``n`` (``n >= 0``) written without leading zeros."""
    digits = str(n)
    shorter = ["[0-9]"] if len(digits) > 1 else []
    shorter += ["[1-9]" + " [0-9]" * (d - 1) for d in range(2, len(digits))]
    return "(" + " | ".join([*shorter, _same_length_upto(digits, first=True)]) + ")"


def _same_length_upto(digits: str, *, first: bool) -> str:
    """GBNF of the numbers of ``len(digits)`` digits up to ``digits`` (no leading zero when
    ``first`` and longer than one digit)."""
    low = 1 if first and len(digits) > 1 else 0
    top = int(digits[0])
    if len(digits) == 1:
        return f"[{low}-{top}]"
    parts = []
    if top > low:
        parts.append(f"[{low}-{top - 1}]" + " [0-9]" * (len(digits) - 1))
    parts.append(f'"{top}" ' + _same_length_upto(digits[1:], first=False))
    return "(" + " | ".join(parts) + ")"


def _number_range(lo: int, hi: int) -> str:
    """GBNF of the JSON numbers in ``[lo, hi]`` (whole bounds): integer parts whose every
    fraction stays inside take one, the bounds themselves are written whole."""
    with_fraction = [str(p) for p in range(max(lo, 0), hi)]  # p.x in [p, p + 1)
    with_fraction += [f"-{p}" for p in range(max(-hi, 0), -lo)]  # -p.x in (-p - 1, -p]
    whole = [str(k) for k in range(lo, hi + 1) if str(k) not in with_fraction]

    def alternatives(items: list[str]) -> str:
        return " | ".join(f'"{item}"' for item in items)

    rules = []
    if with_fraction:
        rules.append(f'({alternatives(with_fraction)}) ("." [0-9]{{1,8}})?')
    if whole:
        rules.append(f"({alternatives(whole)})")
    return "(" + " | ".join(rules) + ")"


def _rewrite(node: Any, marks: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_rewrite(v, marks) for v in node]
    if not isinstance(node, dict):
        return node
    kinds = node.get("type")
    if isinstance(kinds, list) and len(kinds) > 1:
        # The converter reads a list of types as bare types, dropping maxLength, bounds...
        return {"anyOf": [_rewrite({**node, "type": kind}, marks) for kind in kinds]}
    bounded = _bounded(node)
    if bounded is not None:
        how, what = bounded
        if how == "enum":
            return {"enum": what}
        mark = f"rbees-mark-{len(marks)}"
        marks[mark] = _RULES[what] if how == "rule" else what
        return {"const": mark}
    return {k: (v if k in ("enum", "const", "required", "default", "examples")
                else _rewrite(v, marks)) for k, v in node.items()}


def schema_to_gbnf(schema: Mapping[str, Any]) -> str:
    """The GBNF grammar of the JSON documents valid under ``schema`` (bounds as the module
    says). Raises :class:`InvalidParamsError` (field ``json_schema``) for a schema the
    converter cannot read."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, Mapping):
        raise InvalidParamsError("json_schema", "the JSON schema must be an object")
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise InvalidParamsError("json_schema",
                                 f"the JSON schema is over {MAX_SCHEMA_BYTES} bytes")
    marks: dict[str, str] = {}
    rewritten = _rewrite(dict(schema), marks)
    try:
        gbnf = str(json_schema_to_gbnf(json.dumps(rewritten)))
    except Exception as exc:  # the converter asserts, indexes, recurses: all say "bad schema"
        raise InvalidParamsError(
            "json_schema", f"the JSON schema cannot be used: {exc}") from exc
    for mark, rule in marks.items():
        literal = '"\\"' + mark + '\\""'
        if literal not in gbnf:  # pragma: no cover - the converter changed its literals
            raise InvalidParamsError("json_schema", "a numeric bound cannot be enforced")
        gbnf = gbnf.replace(literal, f"{rule} space")
    return gbnf
