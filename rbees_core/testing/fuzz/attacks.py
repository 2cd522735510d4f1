"""The attacks of :mod:`rbees_core.testing.fuzz`: route targets and hypothesis strategies.

:func:`route_table` turns a starlette route table (and the daemon's OpenAPI document, for the
body schemas) into :class:`Target` values; :func:`attacks` draws one :class:`Attack` on a
target, :func:`body_attacks` one hostile body, and :func:`sweep` lists the deterministic ones
(every field of every example given each wrong type).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import attrs
from hypothesis import strategies as st
from starlette.routing import BaseRoute, Mount, Route

#: Methods a fuzzed daemon might be sent; those a path does not allow must get 405.
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
#: Methods whose requests carry a body (body attacks go to these routes).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MARK = "\u2063fuzz\u2063"  # a placeholder string, replaced by raw bytes after json.dumps


@attrs.frozen
class Target:
    """One route to attack: ``method`` and the ``path`` template (``{name}`` parameters),
    ``allowed`` (every method the path answers), the request body's JSON ``schema`` (refs
    resolved) when the route documents one, and ``examples``, VALID bodies that body attacks
    mutate (keep them cheap: a small max_tokens, a model that is not there). ``excluded`` names
    why only wrong-method attacks go to this route (it would shut the daemon down...)."""

    method: str
    path: str
    allowed: frozenset[str]
    schema: Mapping[str, Any] | None = None
    examples: tuple[Any, ...] = ()
    excluded: str | None = None


@attrs.frozen
class Attack:
    """One request: ``kind`` says which attack it is (counted by :func:`fire`)."""

    kind: str
    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    headers: Mapping[str, bytes] = attrs.field(factory=dict)
    chunked: bool = False

    def describe(self) -> str:
        body = b"" if self.body is None else self.body
        shown = body[:200] + (b"..." if len(body) > 200 else b"")
        how = ", chunked" if self.chunked else ""
        return (f"{self.kind}: {self.method} {self.path[:300]} [{self.content_type}{how}] "
                f"{shown!r}")


def _walk(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        if isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    yield method, prefix + route.path
        elif isinstance(route, Mount):
            yield from _walk(route.routes, prefix + route.path)


def _resolve(schema: Any, doc: Mapping[str, Any], depth: int = 0) -> Any:
    """``schema`` with ``$ref`` to ``#/components/schemas/...`` inlined (8 levels at most)."""
    if depth > 8:
        return {}
    if isinstance(schema, dict):
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return _resolve(doc.get("components", {}).get("schemas", {}).get(name, {}), doc,
                            depth + 1)
        return {k: _resolve(v, doc, depth + 1) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_resolve(v, doc, depth + 1) for v in schema]
    return schema


def route_table(routes: Sequence[BaseRoute], openapi: Mapping[str, Any] | None = None, *,
                examples: Mapping[tuple[str, str], Sequence[Any]] | None = None,
                excluded: Mapping[tuple[str, str], str] | None = None) -> list[Target]:
    """Every route of a starlette route table as a :class:`Target` (HEAD left out: it has no
    body to check). ``openapi`` (the daemon's document) gives the body schemas; ``examples``
    (a list of valid bodies per route) and ``excluded`` (why a route only gets wrong methods)
    are keyed by ``(method, path template)``. A body route with no examples gets one built
    from its schema's required fields (:func:`skeleton`), else ``{}``.
    Raises ValueError when an example or exclusion names a route the table lacks."""
    pairs = list(dict.fromkeys(_walk(routes)))
    allowed: dict[str, set[str]] = {}
    for method, path in pairs:
        allowed.setdefault(path, set()).add(method)
    for key in {**(examples or {}), **(excluded or {})}:
        if key not in pairs:
            raise ValueError(f"{key} is not in the route table")
    paths = (openapi or {}).get("paths", {})
    targets = []
    for method, path in pairs:
        op = paths.get(path, {}).get(method.lower(), {})
        raw = op.get("requestBody", {}).get("content", {}).get("application/json", {})
        schema = _resolve(raw["schema"], openapi or {}) if "schema" in raw else None
        given = tuple((examples or {}).get((method, path), ()))
        if not given and method in BODY_METHODS:
            given = (skeleton(schema) if schema else {},)
        targets.append(Target(method, path, frozenset(allowed[path]), schema, given,
                              (excluded or {}).get((method, path))))
    return targets


def skeleton(schema: Mapping[str, Any]) -> Any:
    """A small value of ``schema``'s type with its required properties (best effort: a
    starting point for mutations, not always valid)."""
    kind = schema.get("type")
    if "anyOf" in schema:
        return skeleton(schema["anyOf"][0])
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {name: skeleton(props.get(name, {})) for name in schema.get("required", [])}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    if "enum" in schema:
        return schema["enum"][0]
    return "x"


# ---- the values an attack puts into a body -------------------------------------------------

#: Raw JSON number text that no double or 64-bit integer holds, or that parsers disagree on.
HUGE_NUMBERS = ("1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 400, "-0", "-0.0", "NaN",
                "Infinity", "-Infinity", "1e-400", str(2**63), str(2**64), str(-(2**63) - 1),
                "0.5", "1E+2", "123456789012345678901234567890.5")
#: Escaped surrogates: each parses as JSON, none is UTF-8 text.
SURROGATES = ('"\\ud800"', '"\\udfff"', '"a\\ud800b"', '"\\udc00\\ud800"', '"\\ud83d"',
              '"\\ud800\\u0041"')
#: Byte sequences that are not UTF-8: a lone continuation, an overlong slash, a CESU-8
#: surrogate, a 5-byte form, a cut 3-byte character, the old BOM pair.
BAD_UTF8 = (b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
            b"\xe2\x82", b"\xfe\xff", b"a\xc3\x28b")
WRONG_TYPES: tuple[Any, ...] = (None, True, False, 0, -1, 1.5, "", "x", [], [1], {}, {"a": 1},
                                [[[]]], "\x00")
LONG = (70_000, 300_000, 1_100_000)  # the last is over the 1 MiB body limit
CONTENT_TYPES = ("text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/xml", "",
                 "application/json; charset=latin-1", "application/json; charset=utf-16")
PATH_SEGMENTS = ("x", "..", ".", "%2e%2e", "%2F", "%00", "%ff", "%ed%a0%80", "%F0%9F%90%9D",
                 "a" * 300, "a" * 5000, "%20", "-", "_", "x%0d%0aSet-Cookie:%20a=b", "%25",
                 "null", "0", "-1", "1e400", "%7B%7D")
#: Query parameter names the daemons read (and some they do not); each gets hostile values.
QUERY_NAMES = ("limit", "cursor", "status", "after", "force", "cancel_on_disconnect", "stream",
               "model", "state", "limit[]", "", "%ff", "%ed%a0%80")
#: Hostile query values: numbers no 64-bit integer holds, digits int() refuses ("\u00b2" is
#: a digit to str.isdigit), more digits than int() converts, bad UTF-8, NUL, repeats.
QUERY_VALUES = ("1e400", "-1", "-0", "0", "9" * 19, "9" * 400, "9" * 5000, "NaN", "%C2%B2",
                "%D9%A3", "1_000", "+1", " 1", "0x10", "%ff", "%ed%a0%80", "%00", "",
                "y" * 20_000, "true", "1&{name}=2", "queued,", ",,,")


def _fields(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``value`` (keys and indexes), the root included."""
    out = [prefix]
    if isinstance(value, dict):
        for key, sub in value.items():
            out += _fields(sub, (*prefix, key))
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            out += _fields(sub, (*prefix, index))
    return out


def _replace(value: Any, where: tuple[Any, ...], new: Any) -> Any:
    if not where:
        return new
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[where[0]] = _replace(copy[where[0]], where[1:], new)
    return copy


def _encode(value: Any, raw: bytes = b"") -> bytes:
    """``value`` as JSON (UTF-8, not ASCII-escaped), the placeholder string replaced by
    ``raw`` (JSON text or bytes that json.dumps would refuse to write)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    return text.encode("utf-8", "surrogatepass").replace(
        json.dumps(_MARK, ensure_ascii=False).encode(), raw)


def _deep(kind: str, depth: int, closed: bool) -> bytes:
    if kind == "array":
        return b"[" * depth + (b"1" + b"]" * depth if closed else b"")
    return b'{"a":' * depth + (b"1" + b"}" * depth if closed else b"")


@st.composite
def body_attacks(draw: st.DrawFn, example: Any,
                 schema: Mapping[str, Any] | None = None) -> tuple[str, bytes, str | None]:
    """``(kind, body, content type)``: a structural attack on a body, most of them a
    mutation of ``example`` at one of its fields, so that the rest stays valid and the
    attack reaches the validation of that field."""
    where = draw(st.sampled_from(_fields(example)))
    kind = draw(st.sampled_from((
        "deep", "deep-field", "surrogate", "bad-utf8", "huge-number", "wrong-type",
        "duplicate-key", "empty", "content-type", "truncated", "long-string", "top-level",
        "missing-field", "unknown-field", "random-json", "garbage", "nul")))
    ct: str | None = "application/json"
    if kind == "deep":
        body = _deep(draw(st.sampled_from(("array", "object"))),
                     draw(st.sampled_from((65, 200, 1000, 100_000))), draw(st.booleans()))
    elif kind == "deep-field":
        depth = draw(st.sampled_from((65, 500, 5000)))
        body = _encode(_replace(example, where, _MARK), _deep("array", depth, True))
    elif kind == "surrogate":
        body = _encode(_replace(example, where, _MARK),
                       draw(st.sampled_from(SURROGATES)).encode())
    elif kind == "bad-utf8":
        body = _encode(_replace(example, where, _MARK),
                       b'"' + draw(st.sampled_from(BAD_UTF8)) + b'"')
    elif kind == "huge-number":
        body = _encode(_replace(example, where, _MARK),
                       draw(st.sampled_from(HUGE_NUMBERS)).encode())
    elif kind == "wrong-type":
        body = _encode(_replace(example, where, draw(st.sampled_from(WRONG_TYPES))))
    elif kind == "duplicate-key":
        body = _duplicate(draw, example)
    elif kind == "empty":
        body = b""
    elif kind == "content-type":
        ct = draw(st.sampled_from(CONTENT_TYPES))
        body = (json.dumps(example).encode("utf-16") if ct.endswith("utf-16")
                else draw(st.sampled_from((_encode(example), b"a=1&b=2", b"<a>1</a>",
                                           b"--x\r\n\r\n--x--"))))
    elif kind == "truncated":
        whole = _encode(example)
        body = whole[:draw(st.integers(0, max(len(whole) - 1, 0)))]
    elif kind == "long-string":
        size = draw(st.sampled_from(LONG))
        long = draw(st.sampled_from(("x", "\u00e9", "\U0001f41d", " "))) * size
        body = (_encode({**example, long[:size // 2]: 1}) if isinstance(example, dict)
                and draw(st.booleans()) else _encode(_replace(example, where, long)))
    elif kind == "top-level":
        body = draw(st.sampled_from((b"[]", b'"x"', b"1", b"null", b"true", b"{}", b"[{}]",
                                     b" ", b"\xef\xbb\xbf{}")))
    elif kind == "missing-field":
        required = list((schema or {}).get("required", [])) or list(
            example if isinstance(example, dict) else [])
        gone = draw(st.sampled_from(required)) if required else None
        body = _encode({k: v for k, v in example.items() if k != gone}
                       if isinstance(example, dict) else example)
    elif kind == "unknown-field":
        name = draw(st.text(min_size=1, max_size=20))
        body = _encode({**example, name: draw(json_values())} if isinstance(example, dict)
                       else {name: 1})
    elif kind == "random-json":
        body = _encode(_replace(example, where, draw(json_values())))
    elif kind == "garbage":
        body = draw(st.binary(min_size=1, max_size=300))
        ct = draw(st.sampled_from(("application/json", None)))
    else:  # nul
        body = _encode(_replace(example, where, "a\x00b"))
    return kind, body, ct


def _duplicate(draw: st.DrawFn, example: Any) -> bytes:
    """``example`` with one key written twice: the second copy holds a wrong value, or the
    first does (parsers differ on which wins)."""
    if not isinstance(example, dict) or not example:
        return b'{"a": 1, "a": [], "a": {"a": 1, "a": 2}}'
    key = draw(st.sampled_from(sorted(example)))
    other = json.dumps(draw(st.sampled_from(WRONG_TYPES)))
    first = draw(st.booleans())
    text = json.dumps(example)[:-1]
    extra = f', {json.dumps(key)}: {other}'
    if first:
        return ("{" + f"{json.dumps(key)}: {other}, " + text[1:] + "}").encode()
    return (text + extra + "}").encode()


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value, small: a strategy for unknown fields and replaced ones."""
    leaves = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
              | st.text(max_size=40))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                        max_leaves=12)


def _segment(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(st.sampled_from(PATH_SEGMENTS))
    return quote(draw(st.text(min_size=1, max_size=30)).encode("utf-8", "surrogatepass"),
                 safe="")


#: Authorization values no token matches; a daemon with a token must answer each with 401.
BAD_AUTH = (b"", b"Bearer", b"bearer x", b"Bearer fuzz-token", b"Basic eDp5", b"Bearer \xff\xfe",
            b"Bearer " + b"x" * 8000, b"Bearer a\tb")


@st.composite
def attacks(draw: st.DrawFn, target: Target) -> Attack:
    """One :class:`Attack` on ``target``: hostile path parameters, a hostile query, a body
    attack (:func:`body_attacks`, for POST/PUT/PATCH) or a method the path does not allow.
    An excluded target only gets the last. One in twelve replaces the Authorization header
    that :func:`fire` sends with a wrong one (:data:`BAD_AUTH`): a daemon with a token
    refuses it with 401 before anything else, one without ignores it."""
    attack = draw(_attack(target))
    if draw(st.integers(0, 11)) == 0:
        headers = {**attack.headers, "Authorization": draw(st.sampled_from(BAD_AUTH))}
        return attrs.evolve(attack, kind=f"{attack.kind}+bad-auth", headers=headers)
    return attack


@st.composite
def _attack(draw: st.DrawFn, target: Target) -> Attack:
    wrong = [m for m in METHODS if m not in target.allowed]
    path = target.path
    valid_path = "{" not in path
    # a body attack mostly goes with a well-formed id, so that it reaches the body's checks
    hostile = target.method not in BODY_METHODS or draw(st.integers(0, 3)) == 0
    while "{" in path:
        head, rest = path.split("{", 1)
        path = head + (_segment(draw) if hostile else "fz") + rest.split("}", 1)[1]
    if target.excluded is not None or (wrong and draw(st.integers(0, 9)) == 0):
        if not wrong or (target.excluded is not None and not valid_path
                         and draw(st.booleans())):
            # a path that names nothing is safe to send even to an excluded route
            return Attack("bad-path", target.method, _bad_path(target.path), None)
        return Attack("wrong-method", draw(st.sampled_from(wrong)), path, b"{}")
    if target.method not in BODY_METHODS or draw(st.integers(0, 9)) == 0:
        name = draw(st.sampled_from(QUERY_NAMES))
        if draw(st.integers(0, 3)):
            value = draw(st.sampled_from(QUERY_VALUES)).replace("{name}", name)
        else:
            value = quote(draw(st.text(max_size=30)).encode("utf-8", "surrogatepass"), safe="")
        query = f"{name}={value}"
        body = (_encode(draw(st.sampled_from(target.examples)))
                if target.method in BODY_METHODS and target.examples else None)
        resume = {} if draw(st.integers(0, 3)) else {"Last-Event-ID": draw(st.sampled_from(
            (b"-1", b"9" * 19, b"9" * 5000, b"\xc2\xb2", b"1e400", b"", b"\xff")))}
        return Attack("query", target.method, f"{path}?{query}", body, headers=resume)
    example = draw(st.sampled_from(target.examples)) if target.examples else {}
    kind, body, ct = draw(body_attacks(example, target.schema))
    headers = {}
    if draw(st.integers(0, 9)) == 0:
        headers["X-Correlation-Id"] = draw(st.sampled_from((b"x" * 5000, b"a b", b"",
                                                            b"\xe9", b"\xff\xfe")))
    # without Content-Length, in pieces: the size limit and the parser must hold all the same
    chunked = draw(st.integers(0, 7)) == 0
    return Attack(kind, target.method, path, body, ct, headers, chunked)


def _bad_path(template: str) -> str:
    return template.split("{", 1)[0] + "%ff/%00/" + "a" * 300 + "/nowhere"


#: Raw values :func:`sweep` puts in every field besides :data:`WRONG_TYPES`.
SWEEP_LITERALS = (b"1e400", b"1" + b"0" * 400, b"NaN", b"-0", b'"\\ud800"', b'"\xed\xa0\x80"')


def sweep(target: Target) -> list[Attack]:
    """The deterministic attacks on ``target``: each field of each of its examples (the
    whole body included) replaced by each of :data:`WRONG_TYPES` and :data:`SWEEP_LITERALS`,
    with ``fz`` for every path parameter. None for an excluded target or one without a body.
    """
    if target.excluded is not None or target.method not in BODY_METHODS:
        return []
    path = target.path
    while "{" in path:
        head, rest = path.split("{", 1)
        path = head + "fz" + rest.split("}", 1)[1]
    out = []
    for example in target.examples:
        for where in _fields(example):
            for value in WRONG_TYPES:
                out.append(Attack("sweep", target.method, path,
                                  _encode(_replace(example, where, value))))
            for raw in SWEEP_LITERALS:
                out.append(Attack("sweep", target.method, path,
                                  _encode(_replace(example, where, _MARK), raw)))
    return out
