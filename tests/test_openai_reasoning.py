"""Reasoning (issue 23 item 4) end to end on a real ``rbees up`` cluster: SmolLM2 wears a
thinking template (``rbees-workerd --chat-template-file``, given to the pool's workers as
``RBEES_WORKER_CHAT_TEMPLATE_FILE``) whose generation prompt opens ``<think>``, as the
DeepSeek-R1 distills' does, so what the model writes is reasoning until ``</think>``.

SmolLM2 never writes ``</think>`` of itself; where a test needs a closed reasoning, a GBNF
grammar (llama.cpp's server takes ``grammar`` on /v1 too) makes the real model write one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import openai
import pytest

from .test_orcd import Cluster, up

THINK_TEMPLATE = Path(__file__).parent / "data" / "smollm2-think.jinja"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a bee and a bear."}]
#: reasoning, the closing tag, then an answer: what a thinking model writes
CLOSING = ('root ::= [a-zA-Z ,]{10,40} "." "</think>" "\\n\\n" "The answer is " '
           '[a-zA-Z]{2,12} "."')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with mock.patch.dict(os.environ, {"RBEES_WORKER_CHAT_TEMPLATE_FILE": str(THINK_TEMPLATE)}):
        c = up(tmp_path_factory.mktemp("reasoning"))
    yield c
    c.rbees("down")


@pytest.fixture
def client(cluster: Cluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _reasoning(thing: Any) -> str | None:
    extra = thing.model_extra or {}
    return extra.get("reasoning_content")


def test_an_unclosed_reasoning_cut_by_max_tokens_is_all_reasoning(client: openai.OpenAI
                                                                  ) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=16,
                                            temperature=0, seed=1)
    choice = answer.choices[0]
    thought = _reasoning(choice.message)
    assert thought and "<think>" not in thought and "</think>" not in thought
    assert thought == thought.strip()
    assert choice.message.content == "" and choice.finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 16

    stream = client.chat.completions.create(model="smollm2", messages=STORY, max_tokens=16,
                                            temperature=0, seed=1, stream=True)
    thoughts, contents, finish = [], [], None
    for chunk in stream:
        for c in chunk.choices:
            thoughts.append(_reasoning(c.delta) or "")
            contents.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(thoughts) == thought  # streamed as it came, the same text
    assert sum(1 for t in thoughts if t) >= 3
    assert "".join(contents) == "" and finish == "length"


def test_an_unclosed_reasoning_ended_by_the_model_is_all_reasoning(client: openai.OpenAI
                                                                   ) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=60,
                                            temperature=0, seed=1)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"  # SmolLM2 says its sentence and ends its turn
    assert _reasoning(choice.message) and choice.message.content == ""


def test_a_closed_reasoning_then_the_answer(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=60, temperature=0, seed=2,
        extra_body={"grammar": CLOSING})
    message = answer.choices[0].message
    thought = _reasoning(message)
    assert thought and thought.endswith(".") and "think>" not in thought
    assert message.content is not None and message.content.startswith("The answer is ")
    assert answer.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=60, temperature=0, seed=2,
        extra_body={"grammar": CLOSING}, stream=True)
    order = []
    for chunk in stream:
        for c in chunk.choices:
            if _reasoning(c.delta):
                order.append(("reasoning", _reasoning(c.delta)))
            if c.delta.content:
                order.append(("content", c.delta.content))
    kinds = [k for k, _ in order]
    assert kinds == sorted(kinds, reverse=True)  # all the reasoning, then the content
    assert "".join(t for k, t in order if k == "reasoning") == thought
    assert "".join(t for k, t in order if k == "content") == message.content


def test_v2_token_events_carry_the_reasoning(cluster: Cluster) -> None:
    job = cluster.submit(prompt=None, messages=QUESTION, max_tokens=60, grammar=CLOSING, seed=2)
    frames = cluster.events(job["job_id"])
    tokens = [data for _, event, data in frames if event == "token"]
    thought = "".join(d.get("reasoning", "") for d in tokens)
    content = "".join(d["t"] for d in tokens)
    assert thought and content.startswith("The answer is ") and "think>" not in thought + content
    assert [d["i"] for d in tokens] == list(range(len(tokens)))  # one event per piece
    # a prompt job is raw text: no template, no split
    raw = cluster.submit(prompt="<think>\nBees", max_tokens=4)
    assert all("reasoning" not in d for _, e, d in cluster.events(raw["job_id"]) if e == "token")


def test_rbees_jobs_submit_writes_the_reasoning_to_stderr(cluster: Cluster) -> None:
    done = cluster.rbees("jobs", "submit", "--model", "smollm2", "--prompt",
                         "What is the capital of France?", "--max-tokens", "60",
                         "--temperature", "0", "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""  # SmolLM2 ends its turn inside the reasoning
    assert "Paris" in done.stderr


def test_thinking_off_through_template_kwargs_or_reasoning_effort(client: openai.OpenAI
                                                                 ) -> None:
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}},
                  {"reasoning_effort": "none"}):
        answer = client.chat.completions.create(model="smollm2", messages=QUESTION,
                                                max_tokens=12, temperature=0, seed=1,
                                                extra_body=extra)
        assert _reasoning(answer.choices[0].message) is None, extra
        assert answer.choices[0].message.content, extra
    low = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8,
                                         temperature=0, reasoning_effort="low")
    assert _reasoning(low.choices[0].message)  # accepted; this template ignores it
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4,
                                       extra_body={"chat_template_kwargs": {"messages": 1}})
    assert bad.value.body["param"] == "chat_template_kwargs"  # type: ignore[index]


def test_structured_output_and_tools_under_a_thinking_template(client: openai.OpenAI) -> None:
    """A grammar constrains the answer from its first token: it is content, never
    reasoning, even where the prompt opened the reasoning."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert _reasoning(answer.choices[0].message) is None
    assert answer.choices[0].message.content and \
        answer.choices[0].message.content.startswith("{")
    tools: list[Any] = [{"type": "function", "function": {"name": "capital", "parameters": schema}}]
    called = client.chat.completions.create(model="smollm2", messages=QUESTION, tools=tools,
                                            tool_choice="required", max_tokens=60,
                                            temperature=0)
    assert called.choices[0].finish_reason == "tool_calls"
    assert (called.choices[0].message.tool_calls or [])[0].function.name == "capital"


def test_a_template_file_that_cannot_be_read_stops_the_worker_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [str(Path(sys.executable).parent / "rbees-workerd"), "--worker-id", "w1",
         "--chat-template-file", str(tmp_path / "missing.jinja")],
        capture_output=True, text=True, timeout=60, env={**os.environ,
                                                         "RBEES_HOME": str(tmp_path)})
    assert done.returncode != 0 and "--chat-template-file" in done.stderr
