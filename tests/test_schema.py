"""Strict construction from mappings, the JSON Schema derived from the same fields, and the
text stream that turns token bytes into safe pieces."""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbees_core.api.worker import ExecuteRequest
from rbees_core.errors import InvalidParamsError
from rbees_core.schema import field, from_mapping, json_schema, to_dict
from rbees_core.textstream import TextStream


@attrs.frozen
class Inner:
    """A nested object."""

    name: str = field(pattern=r"[a-z]+", doc="lower-case name")


@attrs.frozen
class Sample:
    """A type using every kind of field.

    Only the first line becomes the schema's description.
    """

    count: int = field(minimum=1, maximum=10, doc="how many")
    ratio: float = field(default=0.5, minimum=0, maximum=1)
    flag: bool = False
    label: str | None = field(default=None, min_length=2, max_length=5, forbid="\x00")
    tags: list[str] = field(factory=list, max_items=2, item_max_length=3)
    mode: Literal["a", "b"] = "a"
    inner: Inner | None = None
    items: list[Inner] = field(factory=list)
    extra: dict[str, Any] = field(factory=dict)


def invalid(data: Any, cls: type = Sample) -> InvalidParamsError:
    with pytest.raises(InvalidParamsError) as caught:
        from_mapping(cls, data)
    return caught.value


# -- from_mapping ---------------------------------------------------------------------------


def test_minimal_and_full() -> None:
    assert from_mapping(Sample, {"count": 3}) == Sample(count=3)
    full = {"count": 10, "ratio": 1, "flag": True, "label": "ab", "tags": ["x", "yyy"],
            "mode": "b", "inner": {"name": "q"}, "items": [{"name": "a"}, {"name": "b"}],
            "extra": {"any": ["thing"]}}
    sample = from_mapping(Sample, full)
    assert sample.inner == Inner(name="q")
    assert isinstance(sample.ratio, float)
    assert to_dict(sample) == {**full, "ratio": 1.0}


@pytest.mark.parametrize(("data", "path", "message"), [
    ({"count": 1, "colour": "red"}, "colour", "unknown field"),
    ({"count": 1, "inner": {"name": "a", "age": 3}}, "inner.age", "unknown field"),
    ({"count": 1, "items": [{"name": "a"}, {"nme": "b"}]}, "items[1].nme", "unknown field"),
    ({}, "count", "is required"),
    ({"count": 1, "inner": {}}, "inner.name", "is required"),
])
def test_unknown_and_missing_fields(data: dict[str, Any], path: str, message: str) -> None:
    error = invalid(data)
    assert (error.field, error.message) == (path, f"{path}: {message}")
    assert error.details == {"field": path}
    assert error.code == "INVALID_PARAMS" and error.status == 400


@pytest.mark.parametrize("data", [[1, 2], "count=1", None, 3])
def test_the_body_must_be_an_object(data: Any) -> None:
    assert invalid(data).field == "body"


@pytest.mark.parametrize(("key", "value"), [
    ("count", "3"), ("count", 3.0), ("count", True), ("count", False), ("count", None),
    ("ratio", "0.5"), ("ratio", True), ("ratio", None), ("ratio", math.nan), ("ratio", math.inf),
    ("flag", 1), ("flag", "true"), ("flag", None),
    ("label", 5), ("label", ["ab"]),
    ("tags", "abc"), ("tags", [1]), ("tags", {"a": 1}),
    ("mode", "c"), ("mode", 1), ("mode", None),
    ("inner", "q"), ("inner", ["q"]), ("items", {"name": "a"}), ("extra", []),
])
def test_wrong_types_are_rejected(key: str, value: Any) -> None:
    error = invalid({"count": 1, key: value})
    assert error.field.startswith(key)
    assert "must be" in error.message


@pytest.mark.parametrize(("key", "value", "message"), [
    ("ratio", 10**400, "must be a finite number"),
    ("ratio", -(10**400), "must be a finite number"),
    ("count", 2**63, "must fit in a signed 64-bit integer"),
    ("count", -(10**400), "must fit in a signed 64-bit integer"),
])
def test_numbers_no_double_or_int64_holds_are_400s(key: str, value: int, message: str) -> None:
    """Found by the structural fuzz: a heartbeat's sent_at of 10**400 was a 500
    OverflowError in float(); integers past 64 bits reach SQLite and the metrics."""
    error = invalid({"count": 1, key: value})
    assert (error.field, error.message) == (key, f"{key}: {message}")


def test_bool_is_not_a_number_but_int_is_a_float() -> None:
    assert invalid({"count": True}).message == "count: must be an integer"
    assert invalid({"count": 1, "ratio": False}).message == "ratio: must be a number"
    assert from_mapping(Sample, {"count": 1, "ratio": 0}).ratio == 0.0


@pytest.mark.parametrize(("key", "value", "message"), [
    ("count", 0, "must be >= 1"),
    ("count", 11, "must be <= 10"),
    ("ratio", -0.01, "must be >= 0"),
    ("ratio", 1.5, "must be <= 1"),
    ("label", "a", "must be at least 2 characters"),
    ("label", "toolong", "must be at most 5 characters"),
    ("label", "a\x00b", "contains forbidden characters"),
    ("tags", ["a", "b", "c"], "must have at most 2 items"),
])
def test_limits(key: str, value: Any, message: str) -> None:
    assert invalid({"count": 1, key: value}).message == f"{key}: {message}"


def test_limits_on_items_and_nested_fields() -> None:
    assert invalid({"count": 1, "tags": ["ok", "long"]}).field == "tags[1]"
    nested = invalid({"count": 1, "inner": {"name": "ABC"}})
    assert nested.message == "inner.name: must match [a-z]+"
    assert invalid({"count": 1, "items": [{"name": "a"}, {"name": "b2"}]}).field == \
        "items[1].name"


def test_boundaries_are_inclusive() -> None:
    for count in (1, 10):
        assert from_mapping(Sample, {"count": count}).count == count
    for ratio in (0, 1):
        assert from_mapping(Sample, {"count": 1, "ratio": ratio}).ratio == ratio
    assert from_mapping(Sample, {"count": 1, "label": "abcde"}).label == "abcde"


def test_cross_field_check_runs_after_construction() -> None:
    both = {"job_id": "j", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    assert invalid(both, ExecuteRequest).field == "prompt"
    assert invalid({"job_id": "j"}, ExecuteRequest).field == "prompt"
    assert invalid({"job_id": "j", "prompt": "x", "stop": [""]}, ExecuteRequest).field == "stop"
    assert invalid({"job_id": "j", "messages": []}, ExecuteRequest).field == "messages"


@pytest.mark.parametrize(("key", "value"), [
    ("job_id", "has space"), ("job_id", "x" * 129), ("job_id", ""),
    ("prompt", "nul\x00"), ("prompt", "x" * 32_769),
    ("max_tokens", 0), ("max_tokens", 2**31), ("temperature", -0.1), ("temperature", 2.01),
    ("top_p", 1.01), ("top_k", -1), ("seed", -1), ("seed", 2**63),
    ("presence_penalty", 2.01), ("frequency_penalty", -2.01), ("min_p", 1.01), ("min_p", -0.1),
    ("top_logprobs", 21), ("logprobs", 1), ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}),
    ("logit_bias", {"5": True}), ("logit_bias", {"-5": 1}), ("logit_bias", []),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", ["x" * 101]),
    ("messages", [{"role": "robot", "content": "hi"}]),
])
def test_execute_request_enforces_the_contract(key: str, value: Any) -> None:
    body = {"job_id": "j1", "prompt": "hi", key: value}
    if key == "messages":
        del body["prompt"]
    assert invalid(body, ExecuteRequest).field.startswith(key)


# -- json_schema ----------------------------------------------------------------------------


def test_json_schema_matches_the_fields() -> None:
    refs: dict[str, Any] = {}
    assert json_schema(Sample, refs) == {"$ref": "#/components/schemas/Sample"}
    schema = refs["Sample"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["count"]
    assert schema["description"] == "A type using every kind of field."
    props = schema["properties"]
    assert props["count"] == {"type": "integer", "minimum": 1, "maximum": 10,
                              "description": "how many"}
    assert props["ratio"] == {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5}
    assert props["flag"] == {"type": "boolean", "default": False}
    assert props["label"] == {"anyOf": [
        {"type": "string", "minLength": 2, "maxLength": 5, "not": {"pattern": "\x00"}},
        {"type": "null"}]}
    assert props["tags"] == {"type": "array", "items": {"type": "string", "maxLength": 3},
                             "maxItems": 2}
    assert props["mode"] == {"enum": ["a", "b"], "default": "a"}
    assert props["inner"] == {"anyOf": [{"$ref": "#/components/schemas/Inner"},
                                        {"type": "null"}]}
    assert props["items"] == {"type": "array", "items": {"$ref": "#/components/schemas/Inner"}}
    assert props["extra"] == {"type": "object"}
    assert refs["Inner"]["properties"]["name"] == {
        "type": "string", "pattern": "[a-z]+", "description": "lower-case name"}
    assert refs["Inner"]["required"] == ["name"]


def numeric(prop: dict[str, Any]) -> dict[str, Any] | None:
    options: list[dict[str, Any]] = [prop, *prop.get("anyOf", [])]
    for option in options:
        if option.get("type") in ("integer", "number"):
            return option
    return None


def test_execute_request_schema_states_the_limits_that_are_enforced() -> None:
    refs: dict[str, Any] = {}
    json_schema(ExecuteRequest, refs)
    props = refs["ExecuteRequest"]["properties"]
    assert set(props) == {f.name for f in attrs.fields(ExecuteRequest)}
    assert refs["ExecuteRequest"]["additionalProperties"] is False
    expected = {"max_tokens": (1, 2**31 - 1), "temperature": (0, 2), "top_p": (0, 1),
                "seed": (0, 2**63 - 1), "presence_penalty": (-2, 2),
                "frequency_penalty": (-2, 2), "min_p": (0, 1), "top_logprobs": (0, 20)}
    for key, (low, high) in expected.items():
        found = numeric(props[key])
        assert found is not None and (found["minimum"], found["maximum"]) == (low, high), key
    base = {"job_id": "j1", "prompt": "hi"}
    for key, prop in props.items():
        limits = numeric(prop)
        if limits is None:
            continue
        step = 1 if limits["type"] == "integer" else 0.001
        for bound in ("minimum", "maximum"):
            if bound not in limits:
                continue
            edge = limits[bound]
            assert getattr(from_mapping(ExecuteRequest, {**base, key: edge}), key) == edge
            beyond = edge - step if bound == "minimum" else edge + step
            assert invalid({**base, key: beyond}, ExecuteRequest).field == key
    stop = props["stop"]
    assert (stop["maxItems"], stop["items"]["maxLength"]) == (4, 100)
    from_mapping(ExecuteRequest, {**base, "stop": ["x" * 100] * 4})
    prompt = props["prompt"]["anyOf"][0]
    assert prompt["maxLength"] == 32_768
    from_mapping(ExecuteRequest, {**base, "prompt": "x" * prompt["maxLength"]})


# -- TextStream -----------------------------------------------------------------------------

ALPHABET = "ab é€😀\n"


def feed(text: str, stops: list[str], cuts: list[int]) -> tuple[list[str], TextStream]:
    raw = text.encode("utf-8")
    bounds = [0, *sorted(cuts), len(raw)]
    stream = TextStream(stops)
    pieces = [stream.push(raw[a:b]) for a, b in itertools.pairwise(bounds)]
    return [*pieces, stream.flush()], stream


def expected_text(text: str, stops: list[str]) -> str:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


@settings(database=None, deadline=None, max_examples=300)
@given(
    text=st.text(alphabet=ALPHABET, max_size=30),
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=4),
    data=st.data(),
)
def test_textstream_emits_the_text_up_to_the_first_stop(
    text: str, stops: list[str], data: st.DataObject
) -> None:
    size = len(text.encode("utf-8"))
    cuts = data.draw(st.lists(st.integers(0, size), max_size=size + 1), label="cuts")
    pieces, stream = feed(text, stops, cuts)
    assert "".join(pieces) == expected_text(text, stops)
    assert stream.stopped == any(s in text for s in stops)
    for piece in pieces:
        assert "\ufffd" not in piece
        assert piece.encode("utf-8").decode("utf-8") == piece


@settings(database=None, deadline=None, max_examples=200)
@given(text=st.text(max_size=40), data=st.data())
def test_textstream_reassembles_any_text_split_anywhere(text: str, data: st.DataObject) -> None:
    size = len(text.encode("utf-8"))
    cuts = data.draw(st.lists(st.integers(0, size), max_size=size + 1), label="cuts")
    pieces, stream = feed(text, [], cuts)
    assert "".join(pieces) == text
    assert not stream.stopped
    offset = 0
    for piece in pieces:  # each piece is whole characters at its place in the text
        assert text[offset:offset + len(piece)] == piece
        offset += len(piece)


def test_textstream_examples() -> None:
    pieces, stream = feed("héllo😀 world", ["😀 w"], [2, 7, 9])  # cuts inside é and 😀
    assert "".join(pieces) == "héllo"
    assert stream.stopped
    stream = TextStream(["STOP"])
    assert stream.push(b"abc ST") == "abc "
    assert stream.push(b"OP and more") == ""
    assert stream.push(b"ignored") == ""
    assert stream.flush() == ""
    cut = TextStream()  # max_tokens ended inside a character: its bytes are dropped
    assert cut.push("ab😀".encode()[:4]) == "ab"
    assert cut.flush() == ""
    held = TextStream(["xyz"])
    assert held.push(b"ab xy") == "ab "
    assert held.flush() == "xy"
    # "a" is complete first, but "éaa" begins earlier: the stream waits to know which
    both = TextStream(["a", "éaa"])
    assert both.push("éa".encode()) == ""
    assert both.push(b"a") == "" and both.stopped
    longer_fails = TextStream(["a", "éab"])
    assert longer_fails.push("éa".encode()) == ""
    assert longer_fails.push(b"x") == "é" and longer_fails.stopped
