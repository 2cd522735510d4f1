"""Ollama's ``/api/chat`` and ``/api/generate`` on a real ``rbees up`` cluster (SmolLM2),
driven by the official ``ollama`` package: streamed and not, options, ``format`` as
``"json"`` and as a schema (the OpenAI path's schemas), tool calls (the OpenAI path's tools:
forced, then a round trip), ``think``, ``keep_alive``, and refusals in Ollama's shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from tests.test_openai_structured import SCHEMAS
from tests.test_openai_tools import QUESTIONS, TOOLS
from tests.test_openai_tools import SCHEMAS as TOOL_SCHEMAS
from tests.test_orcd import Cluster, up

HI = [{"role": "user", "content": "Say hello to the bees."}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("ollama-chat"))
    yield c
    c.rbees("down")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[ollama.Client]:
    with ollama.Client(host=cluster.url, timeout=300) as c:
        yield c


def test_chat_not_streamed(client: ollama.Client) -> None:
    answer = client.chat(model="smollm2", messages=HI, stream=False,
                         options={"temperature": 0, "num_predict": 12, "seed": 1})
    assert answer.model == "smollm2" and answer.done and answer.done_reason == "length"
    assert answer.message.role == "assistant" and answer.message.content
    assert answer.eval_count == 12 and answer.prompt_eval_count and answer.prompt_eval_count > 5
    assert answer.total_duration and answer.eval_duration is not None
    assert answer.created_at and answer.created_at.endswith("Z")
    again = client.chat(model="smollm2:latest", messages=HI, stream=False,
                        options={"temperature": 0, "num_predict": 12, "seed": 1})
    assert again.message.content == answer.message.content  # greedy: the same text


def test_chat_streamed_is_the_same_text(client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 16}
    whole = client.chat(model="smollm2", messages=HI, stream=False, options=options)
    parts = list(client.chat(model="smollm2", messages=HI, stream=True, options=options))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 16
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_generate_streamed_and_not_with_system_and_raw(client: ollama.Client) -> None:
    answer = client.generate(model="smollm2", prompt="Why is the sky blue?",
                             system="Answer in one sentence.", stream=False,
                             options={"temperature": 0, "num_predict": 10, "stop": ["\n\n"]})
    assert answer.done and answer.response and answer.eval_count and answer.eval_count <= 10
    parts = list(client.generate(model="smollm2", prompt="Why is the sky blue?",
                                 system="Answer in one sentence.", stream=True,
                                 options={"temperature": 0, "num_predict": 10,
                                          "stop": ["\n\n"]}))
    assert "".join(p.response or "" for p in parts) == answer.response and parts[-1].done
    raw = client.generate(model="smollm2", prompt="The capital of France is", raw=True,
                          stream=False, options={"temperature": 0, "num_predict": 5})
    assert raw.response and raw.done_reason in ("stop", "length")
    load = client.generate(model="smollm2", prompt="")  # Ollama's "load" request
    assert load.done and load.done_reason == "load"


@pytest.mark.parametrize("index", [0, 2, 8])
def test_format_schema_constrains_the_answer(client: ollama.Client, index: int) -> None:
    what, schema = SCHEMAS[index]
    answer = client.chat(model="smollm2", format=schema, stream=False,
                         messages=[{"role": "user", "content": f"Give me {what} as JSON."}],
                         options={"temperature": 0.7, "seed": index, "num_predict": 200})
    jsonschema.validate(json.loads(answer.message.content or ""), schema)


def test_format_json_is_one_object(client: ollama.Client) -> None:
    answer = client.generate(model="smollm2", prompt="Give a bee's name and color as JSON.",
                             format="json", stream=False,
                             options={"temperature": 0, "num_predict": 400})
    assert answer.done_reason == "stop", answer
    assert isinstance(json.loads(answer.response or ""), dict)


def test_forced_tool_calls_validate(cluster: Cluster) -> None:
    """``tool_choice`` (not Ollama's, as OpenAI's) forces a call; its arguments hold to the
    tool's schema, as on /v1 (shared code: the worker's parser and grammar)."""
    for i in range(4):
        answer = httpx.post(f"{cluster.url}/api/chat", timeout=300, json={
            "model": "smollm2", "stream": i % 2 == 1, "tools": TOOLS, "tool_choice": "required",
            "messages": [{"role": "user", "content": QUESTIONS[i]}],
            "options": {"temperature": 0.9, "seed": i, "num_predict": 300}})
        assert answer.status_code == 200, answer.text
        lines = [json.loads(line) for line in answer.text.splitlines() if line.strip()]
        assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop", lines[-1]
        calls = [c for line in lines for c in line["message"].get("tool_calls") or ()]
        assert calls, lines
        for call in calls:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            assert isinstance(arguments, dict)
            jsonschema.validate(arguments, TOOL_SCHEMAS[name])


def test_a_tool_round_trip_through_the_ollama_package(client: ollama.Client,
                                                      cluster: Cluster) -> None:
    first = httpx.post(f"{cluster.url}/api/chat", timeout=300, json={
        "model": "smollm2", "stream": False, "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "options": {"temperature": 0, "num_predict": 200}}).json()
    calls = first["message"]["tool_calls"]
    assert calls[0]["function"]["name"] == "get_weather"
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"},
                           first["message"],
                           {"role": "tool", "tool_name": "get_weather",
                            "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    answer = client.chat(model="smollm2", messages=messages, tools=TOOLS, stream=False,
                         options={"temperature": 0, "num_predict": 60})
    assert answer.done and (answer.message.content or answer.message.tool_calls)
    for call in answer.message.tool_calls or []:
        assert call.function.name in TOOL_SCHEMAS


def test_think_keep_alive_and_logprobs_are_taken(client: ollama.Client) -> None:
    for think in (True, False, "low"):
        answer = client.chat(model="smollm2", messages=HI, think=think, keep_alive="10m",
                             stream=False, options={"temperature": 0, "num_predict": 4})
        assert answer.done and answer.message.content is not None
        assert think is not False or not answer.message.thinking
    scored = client.generate(model="smollm2", prompt="Bees are", logprobs=True, top_logprobs=2,
                             stream=False, options={"temperature": 0, "num_predict": 3})
    assert scored.logprobs and len(scored.logprobs) == 3
    assert all(len(lp.top_logprobs or []) == 2 for lp in scored.logprobs)


@pytest.mark.parametrize(("body", "status"), [
    ({"messages": HI}, 400),
    ({"model": "no-such-model:7b", "messages": HI}, 404),
    ({"model": "hf:..//x", "messages": HI}, 400),
    ({"model": "smollm2", "messages": "hi"}, 400),
    ({"model": "smollm2", "messages": [{"role": "robot", "content": "x"}]}, 400),
    ({"model": "smollm2", "messages": [{"role": "user", "content": 3}]}, 400),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     400),
    ({"model": "smollm2", "messages": HI, "format": "xml"}, 400),
    ({"model": "smollm2", "messages": HI, "format": {"type": "nonsense"}}, 400),
    ({"model": "smollm2", "messages": HI, "options": [1]}, 400),
    ({"model": "smollm2", "messages": HI, "options": {"temperature": 5}}, 400),
    ({"model": "smollm2", "messages": HI, "options": {"num_predict": "many"}}, 400),
    ({"model": "smollm2", "messages": HI, "think": "very"}, 400),
    ({"model": "smollm2", "messages": HI, "keep_alive": "forever"}, 400),
    ({"model": "smollm2", "messages": HI, "stream": "no"}, 400),
    ({"model": "smollm2", "messages": HI, "tools": [{"type": "function"}]}, 400),
    ({"model": "smollm2", "messages": HI, "tool_choice": "required"}, 400),
])
def test_chat_refusals_are_4xx_in_ollamas_shape(cluster: Cluster, body: dict[str, Any],
                                                status: int) -> None:
    answer = httpx.post(f"{cluster.url}/api/chat", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and answer.json()["error"], answer.text


@pytest.mark.parametrize("body", [{"model": "smollm2", "prompt": "x", "suffix": "y"},
                                  {"model": "smollm2", "prompt": 3},
                                  {"model": "smollm2", "prompt": "x", "system": ["a"]},
                                  {"model": "smollm2", "prompt": "x", "raw": "yes"}])
def test_generate_refusals_are_400s(cluster: Cluster, body: dict[str, Any]) -> None:
    answer = httpx.post(f"{cluster.url}/api/generate", json=body, timeout=60)
    assert answer.status_code == 400 and set(answer.json()) == {"error"}, answer.text


def test_a_prompt_too_long_for_the_context_is_a_400_or_an_error_line(client: ollama.Client
                                                                      ) -> None:
    """The worker refuses it once the job runs: before the answer began, a 400; in a stream,
    the last line is Ollama's ``{"error": ...}``, which the package raises."""
    long = [{"role": "user", "content": "bees " * 19000}]
    with pytest.raises(ollama.ResponseError) as plain:
        client.chat(model="smollm2", messages=long, stream=False)
    assert plain.value.status_code == 400, plain.value
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.chat(model="smollm2", messages=long, stream=True))
    assert streamed.value.error
