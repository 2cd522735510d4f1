"""Structured output through rbees-orcd's /v1 with the official ``openai`` client: SmolLM2's
answers under ``response_format`` parse and validate (``jsonschema``) every time, streamed
and not, on a real ``rbees up`` cluster (the llamacpp backend's grammar sampler)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from .test_orcd import Cluster, up

NAME = {"type": "string", "maxLength": 24}
#: (what to ask for, schema): nested objects, arrays, enums, required,
#: additionalProperties false, numbers with bounds.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("a person", {"type": "object", "properties": {"name": NAME, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"],
        "additionalProperties": False}),
    ("a color", {"type": "object", "properties": {"color": {
        "enum": ["red", "green", "blue"]}}, "required": ["color"],
        "additionalProperties": False}),
    ("three fruits", {"type": "object", "properties": {"fruits": {
        "type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
        "required": ["fruits"], "additionalProperties": False}),
    ("a city with its location", {"type": "object", "properties": {
        "city": NAME, "location": {"type": "object", "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90},
            "lon": {"type": "number", "minimum": -180, "maximum": 180}},
            "required": ["lat", "lon"], "additionalProperties": False}},
        "required": ["city", "location"], "additionalProperties": False}),
    ("a yes or no answer: is the sky blue?", {"type": "object", "properties": {
        "answer": {"type": "boolean"}}, "required": ["answer"],
        "additionalProperties": False}),
    ("a rating of a movie from 1 to 5", {"type": "object", "properties": {
        "movie": NAME, "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["movie", "stars"], "additionalProperties": False}),
    ("a probability that it rains", {"type": "object", "properties": {
        "p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["p"],
        "additionalProperties": False}),
    ("a price in dollars", {"type": "object", "properties": {
        "item": NAME, "price": {"type": "number", "minimum": 0}},
        "required": ["item", "price"], "additionalProperties": False}),
    ("a list of numbers", {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2, "maxItems": 5}),
    ("a book", {"type": "object", "properties": {
        "title": NAME, "author": {"type": "object", "properties": {
            "first": NAME, "last": NAME}, "required": ["first", "last"],
            "additionalProperties": False},
        "year": {"type": "integer", "minimum": 1400, "maximum": 2030}},
        "required": ["title", "author", "year"], "additionalProperties": False}),
    ("a weekday", {"enum": ["monday", "tuesday", "wednesday", "thursday", "friday"]}),
    ("a task list", {"type": "object", "properties": {"tasks": {
        "type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
            "title": NAME, "done": {"type": "boolean"}}, "required": ["title", "done"],
            "additionalProperties": False}}}, "required": ["tasks"],
        "additionalProperties": False}),
    ("a temperature reading", {"type": "object", "properties": {
        "celsius": {"type": "number"}, "unit": {"const": "C"}},
        "required": ["celsius", "unit"], "additionalProperties": False}),
    ("an http status", {"type": "object", "properties": {
        "code": {"enum": [200, 404, 500]}, "ok": {"type": "boolean"}},
        "required": ["code", "ok"], "additionalProperties": False}),
    ("a user with optional email", {"type": "object", "properties": {
        "username": NAME, "email": NAME}, "required": ["username"],
        "additionalProperties": False}),
    ("a count of bees", {"type": "object", "properties": {
        "bees": {"type": "integer", "minimum": 0}}, "required": ["bees"],
        "additionalProperties": False}),
    ("a point in 3D", {"type": "array", "prefixItems": [
        {"type": "number"}, {"type": "number"}, {"type": "number"}],
        "minItems": 3, "maxItems": 3}),
    ("a nullable nickname", {"type": "object", "properties": {
        "nickname": {"type": ["string", "null"], "maxLength": 16}},
        "required": ["nickname"], "additionalProperties": False}),
    ("a recipe", {"type": "object", "properties": {
        "name": NAME, "ingredients": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"item": NAME, "grams": {
                "type": "integer", "minimum": 1, "maximum": 250}},
            "required": ["item", "grams"], "additionalProperties": False}},
        "vegan": {"type": "boolean"}},
        "required": ["name", "ingredients", "vegan"], "additionalProperties": False}),
    ("a traffic light state", {"type": "object", "properties": {
        "light": {"enum": ["red", "yellow", "green"]},
        "seconds": {"type": "integer", "minimum": 1, "maximum": 90}},
        "required": ["light", "seconds"], "additionalProperties": False}),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("structured"))
    yield c
    c.rbees("down")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _ask(what: str) -> list[Any]:
    return [{"role": "user", "content": f"Answer with JSON only: {what}."}]


def _format(schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                   "strict": True}}


def test_twenty_schemas_validate_every_time(client: openai.OpenAI) -> None:
    assert len(SCHEMAS) == 20
    failures = []
    for what, schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)
        answer = client.chat.completions.create(
            model="smollm2", messages=_ask(what), response_format=_format(schema),
            max_tokens=400, temperature=0, seed=1)
        choice = answer.choices[0]
        pieces, finish = [], None
        for chunk in client.chat.completions.create(
                model="smollm2", messages=_ask(what), response_format=_format(schema),
                max_tokens=400, temperature=0.8, seed=7, stream=True):
            for c in chunk.choices:
                pieces.append(c.delta.content or "")
                finish = c.finish_reason or finish
        for text, why in ((choice.message.content or "", choice.finish_reason),
                          ("".join(pieces), finish)):
            try:
                assert why == "stop", f"finish_reason {why}"
                jsonschema.validate(json.loads(text), schema)
            except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
                failures.append((what, text, str(exc)[:200]))
    assert not failures, failures


def test_json_object_and_completions(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=_ask("a person"), response_format={"type": "json_object"},
        max_tokens=300, temperature=0)
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)
    done = client.completions.create(model="smollm2", prompt="A bee as JSON:",
                                     max_tokens=200, temperature=0,
                                     extra_body={"response_format": _format(SCHEMAS[1][1])})
    assert done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].text), SCHEMAS[1][1])


@pytest.mark.parametrize("fmt", [
    {"type": "xml"},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": 3}}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
])
def test_bad_formats_and_schemas_are_400s(client: openai.OpenAI, fmt: Any) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2", messages=_ask("x"),
                                       response_format=fmt, max_tokens=10)
    assert bad.value.body is not None
    assert dict(bad.value.body).get("param", "").startswith("response_format")


def test_native_api_takes_json_schema_and_grammar(cluster: Cluster) -> None:
    schema = SCHEMAS[1][1]
    job = cluster.submit(messages=_ask("a color"), json_schema=schema, max_tokens=100,
                         prompt=None)
    events = cluster.events(job["job_id"])
    text = "".join(d["t"] for _, e, d in events if e == "token")
    jsonschema.validate(json.loads(text), schema)
    job = cluster.submit(grammar='root ::= "yes" | "no"', max_tokens=20)
    events = cluster.events(job["job_id"])
    assert "".join(d["t"] for _, e, d in events if e == "token") in ("yes", "no")
    refused = httpx.post(f"{cluster.url}/v2/tasks", json={
        "model": "smollm2", "prompt": "x", "json_schema": {"type": "wizard"}})
    assert refused.status_code == 400
    assert refused.json()["error"]["details"]["field"] == "json_schema"
