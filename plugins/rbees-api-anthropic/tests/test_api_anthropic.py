"""Anthropic's Messages API on a real ``rbees up`` cluster, driven by the ``anthropic`` SDK:
messages streamed and not, count_tokens, a tool round trip, thinking blocks (SmolLM2 in a
thinking template, as tests/test_openai_reasoning.py does it), errors in Anthropic's shape."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import anthropic
import httpx
import httpx2
import jsonschema
import pytest
from rbees_api_anthropic import rbees_register_routes

from rbees_core.http import build_app
from rbees_core.testing.cluster import Cluster, up

ROOT = Path(__file__).resolve().parents[3]
THINK_TEMPLATE = ROOT / "tests" / "data" / "smollm2-think.jinja"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS: list[Any] = [{"name": "get_weather", "description": "The current weather of a city",
                     "input_schema": WEATHER}]
#: The SDK no longer has temperature; older clients send it and rbees honours it.
GREEDY = {"temperature": 0}
HELLO: list[Any] = [{"role": "user", "content": "Say hello to the bees."}]


@pytest.fixture
def client(rbees_cluster: Cluster) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=rbees_cluster.url, api_key="unused",
                             max_retries=0) as c:
        yield c


def test_a_message_streamed_and_not(client: anthropic.Anthropic) -> None:
    answer = client.messages.create(model="smollm2", max_tokens=12, messages=HELLO,
                                    system="You are a friendly beekeeper.", extra_body=GREEDY)
    assert answer.type == "message" and answer.role == "assistant"
    assert answer.id.startswith("msg_") and answer.model == "smollm2"
    assert [b.type for b in answer.content] == ["text"]
    text = answer.content[0].text  # type: ignore[union-attr]
    assert text and answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.usage.input_tokens > 10 and 0 < answer.usage.output_tokens <= 12

    kinds: list[str] = []
    with client.messages.stream(model="smollm2", max_tokens=12, messages=HELLO,
                                system="You are a friendly beekeeper.", extra_body=GREEDY) as s:
        for event in s:
            if event.type in ("message_start", "content_block_start", "content_block_delta",
                              "content_block_stop", "message_delta", "message_stop"):
                kinds.append(event.type)
        final = s.get_final_message()
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") >= 2
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == answer.stop_reason
    assert final.usage.output_tokens == answer.usage.output_tokens
    assert final.usage.input_tokens == answer.usage.input_tokens


def test_count_tokens_is_the_prompt_a_message_uses(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model="smollm2", messages=HELLO, system="Be brief.")
    answer = client.messages.create(model="smollm2", max_tokens=1, messages=HELLO,
                                    system="Be brief.")
    assert counted.input_tokens == answer.usage.input_tokens > 5
    with_tools = client.messages.count_tokens(model="smollm2", messages=HELLO, tools=TOOLS)
    assert with_tools.input_tokens > counted.input_tokens


def test_stop_sequences_and_max_tokens(client: anthropic.Anthropic) -> None:
    cut = client.messages.create(model="smollm2", max_tokens=3, extra_body=GREEDY, messages=[
        {"role": "user", "content": "Write a long story about a bee."}])
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    text = cut.content[0].text  # type: ignore[union-attr]
    word = text.split()[-1] if text.split() else text
    stopped = client.messages.create(
        model="smollm2", max_tokens=3, extra_body=GREEDY, stop_sequences=[word],
        messages=[{"role": "user", "content": "Write a long story about a bee."}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert word not in stopped.content[0].text  # type: ignore[union-attr]


def test_a_tool_round_trip(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(
        model="smollm2", max_tokens=200, messages=messages, tools=TOOLS, extra_body=GREEDY,
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, WEATHER)
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                      for b in first.content]})
    messages.append({"role": "user", "content": [{
        "type": "tool_result", "tool_use_id": uses[0].id,
        "content": json.dumps({"temperature": 21, "sky": "sunny"})}]})
    answer = client.messages.create(model="smollm2", max_tokens=40, messages=messages,
                                    tools=TOOLS, tool_choice={"type": "none"}, extra_body=GREEDY)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text  # type: ignore[union-attr]


def test_a_streamed_tool_call(client: anthropic.Anthropic) -> None:
    partial: dict[int, str] = {}
    starts = []
    with client.messages.stream(model="smollm2", max_tokens=200, tools=TOOLS,
                                extra_body=GREEDY, tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Oslo?"}]
                                ) as s:
        for event in s:
            if event.type == "content_block_start":
                starts.append(event.content_block.type)
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial[event.index] = partial.get(event.index, "") + event.delta.partial_json
        final = s.get_final_message()
    assert "tool_use" in starts and final.stop_reason == "tool_use" and partial
    for index, text in partial.items():
        use = final.content[index]
        assert use.type == "tool_use" and use.input == json.loads(text)
        jsonschema.validate(use.input, WEATHER)


def test_structured_output_follows_the_schema(client: anthropic.Anthropic) -> None:
    answer = client.messages.create(
        model="smollm2", max_tokens=80, messages=[
            {"role": "user", "content": "Describe the weather in Rome as JSON."}],
        extra_body={"temperature": 0,
                    "output_config": {"format": {"type": "json_schema", "schema": WEATHER}}})
    jsonschema.validate(json.loads(answer.content[0].text), WEATHER)  # type: ignore[union-attr]


def test_errors_are_in_anthropics_shape(client: anthropic.Anthropic,
                                        rbees_cluster: Cluster) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="smollm2", max_tokens=0, messages=HELLO)
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="smollm2", max_tokens=8, messages=[{
            "role": "user", "content": [{"type": "image", "source": {
                "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    for body in ({"model": "smollm2"}, {"model": "smollm2", "max_tokens": 4, "messages": "hi"},
                 {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "system"}]},
                 {"model": "smollm2", "max_tokens": 4, "messages": HELLO, "temperature": 9},
                 {"model": "smollm2", "max_tokens": 4, "messages": HELLO,
                  "tool_choice": {"type": "tool"}}, [1]):
        raw = httpx.post(f"{rbees_cluster.url}/v1/messages", json=body, timeout=30)
        assert raw.status_code == 400, raw.text
        assert raw.json()["type"] == "error", raw.text
    nowhere = httpx.post(f"{rbees_cluster.url}/v1/messages/nowhere", json={}, timeout=30)
    assert nowhere.status_code == 404
    assert nowhere.json()["error"]["type"] == "not_found_error"


async def test_the_key_comes_as_x_api_key() -> None:
    app = build_app(rbees_register_routes("rbees-orcd"), token="s3cret-token-of-bees")
    for key, error in (("wrong", anthropic.AuthenticationError),
                       ("s3cret-token-of-bees", anthropic.BadRequestError)):
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))  # the SDK's httpx
        async with anthropic.AsyncAnthropic(base_url="http://rbees.test", api_key=key,
                                            max_retries=0, http_client=http) as c:
            with pytest.raises(error) as caught:  # past the key: no max_tokens, a 400
                await c.messages.create(model="smollm2", max_tokens=0, messages=HELLO)
            assert caught.value.body["type"] == "error"  # type: ignore[index]


# -- thinking ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    with mock.patch.dict(os.environ, {"RBEES_WORKER_CHAT_TEMPLATE_FILE": str(THINK_TEMPLATE)}):
        cluster = up(tmp_path_factory.mktemp("thinking") / "home")
    try:
        with anthropic.Anthropic(base_url=cluster.url, api_key="unused", max_retries=0) as c:
            yield c
    finally:
        cluster.rbees("down")


def test_thinking_blocks_streamed_and_not(thinking: anthropic.Anthropic) -> None:
    story: list[Any] = [{"role": "user", "content": "Write a long story about a bee."}]
    answer = thinking.messages.create(model="smollm2", max_tokens=16, messages=story,
                                      extra_body=GREEDY,
                                      thinking={"type": "enabled", "budget_tokens": 1024})
    assert answer.content[0].type == "thinking" and answer.content[0].thinking
    assert answer.stop_reason == "max_tokens"
    deltas = ""
    with thinking.messages.stream(model="smollm2", max_tokens=16, messages=story,
                                  extra_body=GREEDY,
                                  thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        for event in s:
            if event.type == "content_block_delta" and event.delta.type == "thinking_delta":
                deltas += event.delta.thinking
    assert deltas == answer.content[0].thinking
    plain = thinking.messages.create(model="smollm2", max_tokens=16, messages=story,
                                     extra_body=GREEDY, thinking={"type": "disabled"})
    assert [b.type for b in plain.content] == ["text"]
