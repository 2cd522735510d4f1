"""Tool calling through rbees-orcd's /v1 on a real ``rbees up`` cluster, driven by the official
``openai`` client (and LangChain and LiteLLM when installed). SmolLM2's template shows no
tools, so this is the generic format; with ``tool_choice`` required or named a grammar makes
every call's arguments valid under the tool's schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from .test_orcd import Cluster, up

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
    "required": ["a", "b"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                      "description": "The current weather of a city"}},
    {"type": "function", "function": {"name": "add", "parameters": ADD,
                                      "description": "The sum of two integers"}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
QUESTIONS = ["What is the weather in Paris?", "How warm is it in Tokyo, in fahrenheit?",
             "What is 12 plus 30?", "Add 7 and 5.", "Is it raining in London?"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("tools"))
    yield c
    c.rbees("down")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _valid(calls: Any, names: set[str]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.function.name in names
        assert len(call.id) == 9 and call.id.isalnum()
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("choice", ["required", "named"])
def test_twenty_of_twenty_calls_validate(client: openai.OpenAI, choice: str) -> None:
    tool_choice: Any = choice if choice == "required" else {
        "type": "function", "function": {"name": "add"}}
    names = {"get_weather", "add"} if choice == "required" else {"add"}
    for i in range(20):
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": QUESTIONS[i % 5]}],
            tools=TOOLS, tool_choice=tool_choice, temperature=0.9, seed=i, max_tokens=400,
            parallel_tool_calls=i % 2 == 0)
        choice0 = answer.choices[0]
        assert choice0.finish_reason == "tool_calls", choice0
        _valid(choice0.message.tool_calls, names)
        if i % 2:
            assert len(choice0.message.tool_calls or []) == 1


def test_a_round_trip_call_result_answer(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=200)
    call = (first.choices[0].message.tool_calls or [])[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    assert messages[-1]["tool_calls"][0]["id"] == call.id
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": 21, "sky": "sunny"})})
    answer = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, temperature=0, max_tokens=60)
    final = answer.choices[0]
    assert final.finish_reason in ("stop", "length", "tool_calls")
    assert final.message.content or final.message.tool_calls
    # tool_choice none: the same chat answered in text, never a call
    plain = client.chat.completions.create(
        model="smollm2", messages=messages, tools=TOOLS, tool_choice="none", temperature=0,
        max_tokens=30)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


def test_streamed_tool_calls(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Add 2 and 40."}],
        tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300, stream=True,
        stream_options={"include_usage": True})
    calls: dict[int, dict[str, Any]] = {}
    finish, usage = None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for delta in c.delta.tool_calls or []:
                slot = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = delta.id or slot["id"]
                if delta.function is not None:
                    slot["name"] += delta.function.name or ""
                    slot["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and usage is not None and calls
    for call in calls.values():
        assert call["id"] and call["name"] in SCHEMAS
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_auto_answers_text_or_calls(client: openai.OpenAI) -> None:
    for question in ("Say hello.", "What is the weather in Rome?"):
        answer = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": question}], tools=TOOLS,
            temperature=0, max_tokens=80)
        message = answer.choices[0].message
        if message.tool_calls:
            assert answer.choices[0].finish_reason == "tool_calls"
            for call in message.tool_calls:
                assert call.function.name in SCHEMAS
                json.loads(call.function.arguments)
        else:
            assert message.content


def test_auto_streams_a_plain_answer_as_it_comes(client: openai.OpenAI) -> None:
    pieces, finish, called = [], None, False
    for chunk in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Write two sentences "
                                        "about bees."}], tools=TOOLS, temperature=0,
            max_tokens=40, stream=True):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            called = called or bool(c.delta.tool_calls)
            finish = c.finish_reason or finish
    # greedy decoding: the same answer every run, and for this chat it is text, not a call
    assert not called, "the model called a tool; this test needs a plain answer"
    assert len([p for p in pieces if p]) > 5  # token by token, not one block at the end
    assert "".join(pieces).strip() and finish in ("stop", "length")


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "wizard"}}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tools_are_400s(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2", max_tokens=5, messages=[
            {"role": "user", "content": "x"}], **extra)
    assert bad.value.body is not None
    assert dict(bad.value.body).get("param") == param


def test_langchain_bind_tools_and_structured_output(cluster: Cluster) -> None:
    import langchain_openai  # a test dependency (dev extra): missing is a failure, not a skip
    from pydantic import BaseModel, Field

    llm = langchain_openai.ChatOpenAI(model="smollm2", base_url=f"{cluster.url}/v1",
                                      api_key="unused", temperature=0, max_tokens=200,
                                      max_retries=0)

    class Add(BaseModel):
        """The sum of two integers."""

        a: int = Field(ge=-1000, le=1000)
        b: int = Field(ge=-1000, le=1000)

    called = llm.bind_tools([Add], tool_choice="Add").invoke("What is 3 plus 4?")
    assert called.tool_calls and called.tool_calls[0]["name"] == "Add"
    Add(**called.tool_calls[0]["args"])
    for method in ("json_schema", "function_calling"):
        made = llm.with_structured_output(Add, method=method).invoke("3 plus 4")
        assert isinstance(made, Add)


LITELLM = """
import json, sys
import litellm
url, tools = sys.argv[1], json.loads(sys.argv[2])
answer = litellm.completion(
    model="openai/smollm2", api_base=url, api_key="unused", tools=tools,
    messages=[{"role": "user", "content": "What is 1 plus 2?"}], tool_choice="required",
    temperature=0, max_tokens=200)
plain = litellm.completion(model="openai/smollm2", api_base=url, api_key="unused",
                           max_tokens=8, temperature=0,
                           messages=[{"role": "user", "content": "Say hi."}])
calls = [{"name": c.function.name, "arguments": c.function.arguments}
         for c in answer.choices[0].message.tool_calls or []]
print(json.dumps({"calls": calls, "plain": plain.choices[0].message.content}))
"""


def test_litellm_openai_provider(cluster: Cluster) -> None:
    """In a process of its own: importing litellm leaves the interpreter in a state that
    breaks later tests of the same process (AST recursion-depth SystemErrors)."""
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", LITELLM, f"{cluster.url}/v1", json.dumps(TOOLS)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})  # no fetch from GitHub
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["calls"] and out["calls"][0]["name"] in SCHEMAS
    jsonschema.validate(json.loads(out["calls"][0]["arguments"]),
                        SCHEMAS[out["calls"][0]["name"]])
    assert out["plain"]


def test_jobs_submit_with_tools_and_a_json_schema(cluster: Cluster, tmp_path: Any) -> None:
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    (tmp_path / "schema.json").write_text(json.dumps(ADD))
    done = cluster.rbees("jobs", "submit", "--model", "smollm2", "--prompt", "Add 2 and 3.",
                         "--tools", str(tmp_path / "tools.json"), "--tool-choice", "add",
                         "--temperature", "0", "--format", "json")
    assert done.returncode == 0, done.stderr
    calls = json.loads(done.stdout)["end"]["tool_calls"]
    assert calls[0]["function"]["name"] == "add"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), ADD)
    text = cluster.rbees("jobs", "submit", "--model", "smollm2", "--prompt", "Add 2 and 3.",
                         "--tools", str(tmp_path / "tools.json"), "--tool-choice", "required",
                         "--temperature", "0")
    assert text.returncode == 0 and "tool call " in text.stdout, text.stderr
    shaped = cluster.rbees("jobs", "submit", "--model", "smollm2", "--prompt", "Two numbers",
                           "--json-schema", str(tmp_path / "schema.json"), "--temperature",
                           "0", "--format", "json")
    assert shaped.returncode == 0, shaped.stderr
    bad = cluster.rbees("jobs", "submit", "--model", "smollm2", "--prompt", "x",
                        "--json-schema", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and "missing.json" in bad.stderr


ODD: list[dict[str, Any]] = [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": True}}],
     "tool_choice": "required"},
    {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": True, "b": {}}}}}], "tool_choice": "required"},
    {"tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": False},
    {"tools": TOOLS, "parallel_tool_calls": "yes"},
    {"tools": TOOLS, "tool_choice": 5},
    {"tools": TOOLS, "response_format": {"type": "json_object"}},
    {"tools": "all of them"},
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "content": [{"type": "text", "text": "3"}]}]},
    {"tools": TOOLS, "messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"function": "add"}]}]},
    {"tools": TOOLS, "messages": [{"role": "tool", "content": None}]},
    {"tools": TOOLS, "messages": [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": 7, "function": {"name": "add", "arguments": "{oops"}}]}]},
]


@pytest.mark.parametrize("extra", ODD)
def test_odd_tool_requests_are_answers_or_400s(cluster: Cluster, extra: dict[str, Any]
                                               ) -> None:
    import httpx

    body = {"model": "smollm2", "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "user", "content": "Add 1 and 2."}], **extra}
    answer = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code in (200, 400), answer.text
    if answer.status_code == 400:
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
