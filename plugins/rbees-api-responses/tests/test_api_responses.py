"""OpenAI's Responses API (stateless) on a real ``rbees up`` cluster, driven by the ``openai``
SDK's ``responses.create``: plain and streamed, instructions and input items, a function
tool round trip, structured output, max_output_tokens, reasoning items (SmolLM2 in a
thinking template, as tests/test_openai_reasoning.py does it), errors in OpenAI's shape."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import jsonschema
import openai
import pytest

from rbees_core.testing.cluster import Cluster, up

ROOT = Path(__file__).resolve().parents[3]
THINK_TEMPLATE = ROOT / "tests" / "data" / "smollm2-think.jinja"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "parameters": WEATHER,
                     "description": "The current weather of a city", "strict": True}]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
def client(rbees_cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{rbees_cluster.url}/v1", api_key="unused",
                       max_retries=0) as c:
        yield c


def test_a_response_streamed_and_not(client: openai.OpenAI) -> None:
    answer = client.responses.create(model="smollm2", instructions="You are a beekeeper.",
                                     input="Say hello to the bees.", temperature=0,
                                     max_output_tokens=12)
    assert answer.object == "response" and answer.id.startswith("resp_")
    assert answer.status in ("completed", "incomplete") and answer.model == "smollm2"
    assert [item.type for item in answer.output] == ["message"]
    text = answer.output_text
    assert text and answer.usage is not None and 0 < answer.usage.output_tokens <= 12
    assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens

    kinds: list[str] = []
    deltas, final = "", None
    for event in client.responses.create(model="smollm2", instructions="You are a beekeeper.",
                                         input="Say hello to the bees.", temperature=0,
                                         max_output_tokens=12, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert deltas == text and final is not None and final.output_text == text
    assert final.status == answer.status
    assert final.usage is not None and final.usage.output_tokens == answer.usage.output_tokens

    with client.responses.stream(model="smollm2", input="Say hello to the bees.",
                                 instructions="You are a beekeeper.", temperature=0,
                                 max_output_tokens=12) as s:
        last = [event.type for event in s][-1]
        assert last == f"response.{answer.status}"
        if answer.status == "completed":  # the SDK's own accumulation
            assert s.get_final_response().output_text == text


def test_input_tokens_counts_the_prompt_a_response_uses(client: openai.OpenAI) -> None:
    counted = client.responses.input_tokens.count(model="smollm2", input="Hello bees.",
                                                  instructions="Be brief.")
    answer = client.responses.create(model="smollm2", input="Hello bees.",
                                     instructions="Be brief.", max_output_tokens=1)
    assert counted.object == "response.input_tokens"
    assert answer.usage is not None and counted.input_tokens == answer.usage.input_tokens > 5


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    answer = client.responses.create(model="smollm2", input="Write a long story about a bee.",
                                     max_output_tokens=3, temperature=0)
    assert answer.status == "incomplete"
    assert answer.incomplete_details is not None
    assert answer.incomplete_details.reason == "max_output_tokens"
    assert answer.usage is not None and answer.usage.output_tokens == 3


def test_input_items_and_a_function_tool_round_trip(client: openai.OpenAI) -> None:
    items: list[Any] = [
        {"role": "developer", "content": "Answer weather questions with the tool."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}]
    first = client.responses.create(model="smollm2", input=items, tools=TOOLS, temperature=0,
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    parallel_tool_calls=False, max_output_tokens=200)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    items += [item.model_dump(exclude_none=True) for item in first.output]
    items.append({"type": "function_call_output", "call_id": calls[0].call_id,
                  "output": json.dumps({"temperature": 21, "sky": "sunny"})})
    answer = client.responses.create(model="smollm2", input=items, tools=TOOLS,
                                     tool_choice="none", temperature=0, max_output_tokens=40)
    assert [item.type for item in answer.output] == ["message"] and answer.output_text

    arguments, added = "", []
    for event in client.responses.create(model="smollm2", input="Weather in Oslo?",
                                         tools=TOOLS, tool_choice="required", temperature=0,
                                         max_output_tokens=200, stream=True):
        if event.type == "response.output_item.added":
            added.append(event.item.type)
        if event.type == "response.function_call_arguments.done":
            arguments = event.arguments
    assert "function_call" in added
    jsonschema.validate(json.loads(arguments), WEATHER)


def test_structured_output_follows_the_schema(client: openai.OpenAI) -> None:
    answer = client.responses.create(
        model="smollm2", input="Describe the weather in Rome as JSON.", temperature=0,
        max_output_tokens=80, text={"format": {"type": "json_schema", "name": "weather",
                                               "schema": WEATHER, "strict": True}})
    jsonschema.validate(json.loads(answer.output_text), WEATHER)


def test_errors_are_in_openais_shape(client: openai.OpenAI, rbees_cluster: Cluster) -> None:
    with pytest.raises(openai.BadRequestError) as stored:
        client.responses.create(model="smollm2", input="Hi", previous_response_id="resp_1")
    assert stored.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="no-such-model", input="Hi")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as tool:
        client.responses.create(model="smollm2", input="Hi", tools=[{"type": "web_search"}])
    assert tool.value.body["param"] == "tools[0].type"  # type: ignore[index]
    for body in ({"model": "smollm2"}, {"model": "smollm2", "input": []},
                 {"model": "smollm2", "input": [{"role": "robot", "content": "x"}]},
                 {"model": "smollm2", "input": "Hi", "max_output_tokens": 0},
                 {"model": "smollm2", "input": "Hi", "temperature": "hot"},
                 {"model": "smollm2", "input": [{"type": "input_image"}]}, [1]):
        raw = httpx.post(f"{rbees_cluster.url}/v1/responses", json=body, timeout=30)
        assert raw.status_code == 400, raw.text
        assert set(raw.json()["error"]) == ERROR_KEYS, raw.text
    limit = httpx.post(f"{rbees_cluster.url}/v1/responses", timeout=30,
                       json={"model": "smollm2", "input": "Hi", "max_output_tokens": 0})
    assert limit.json()["error"]["param"] == "max_output_tokens"


# -- reasoning -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with mock.patch.dict(os.environ, {"RBEES_WORKER_CHAT_TEMPLATE_FILE": str(THINK_TEMPLATE)}):
        cluster = up(tmp_path_factory.mktemp("thinking") / "home")
    try:
        with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused",
                           max_retries=0) as c:
            yield c
    finally:
        cluster.rbees("down")


def test_reasoning_items_streamed_and_not(thinking: openai.OpenAI) -> None:
    answer = thinking.responses.create(model="smollm2", input="Write a long story about a bee.",
                                       max_output_tokens=16, temperature=0)
    assert answer.output[0].type == "reasoning"
    thought = (answer.output[0].content or [])[0].text
    assert thought and answer.status == "incomplete"
    deltas = ""
    for event in thinking.responses.create(model="smollm2", max_output_tokens=16,
                                           input="Write a long story about a bee.",
                                           temperature=0, stream=True):
        if event.type == "response.reasoning_text.delta":
            deltas += event.delta
    assert deltas == thought
    plain = thinking.responses.create(model="smollm2", input="Write a long story about a bee.",
                                      max_output_tokens=16, temperature=0,
                                      reasoning={"effort": "none"})
    assert [item.type for item in plain.output] == ["message"]
