"""rbees_core.structured's shape checks, without a cluster: every malformed response_format
is an InvalidParamsError (found by the structural fuzz: a schema of ``true`` and a ``type``
that is an object were 500 TypeErrors on /v1/chat/completions)."""

from __future__ import annotations

from typing import Any

import pytest

from rbees_core.errors import InvalidParamsError
from rbees_core.structured import response_format_schema


def fmt(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("value", [
    fmt(False), fmt({"type": {}}), fmt({"type": [[]]}), fmt({"type": 1}),
    fmt({"properties": {"a": {"type": {"b": 1}}}}), fmt({"items": {"type": {}}}),
    fmt([]), fmt("x"), {"type": {}}, {"type": "json_schema", "json_schema": []},
])
def test_malformed_formats_are_invalid_params(value: Any) -> None:
    with pytest.raises(InvalidParamsError):
        response_format_schema(value)


def test_a_schema_of_true_accepts_any_output() -> None:
    assert response_format_schema(fmt(True)) == {}
    assert response_format_schema(fmt({"type": ["object", "null"]})) == {
        "type": ["object", "null"]}
