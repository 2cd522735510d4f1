"""rbees_core.tools: the parsers on model output as each family writes it, the format chosen
from a template, and the grammars of tool_choice required / named, run on SmolLM2 under the
templates of other families."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from rbees_core import tools
from rbees_core.backend import Feed, LoadedModel, SamplingParams
from rbees_core.chat_template import ChatTemplate
from rbees_core.errors import InvalidParamsError

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
NAMES = ["get_weather", "add"]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "weather of a city"}},
         {"type": "function", "function": {"name": "add", "parameters": ADD,
                                           "description": "sum of two integers"}}]

# What models of each family write (as rbees streams it: control tokens such as
# [TOOL_CALLS] and <|python_tag|> are not in the text, Qwen's <tool_call> is).
RECORDED: list[tuple[str, str, str | None, list[tuple[str, dict[str, Any]]]]] = [
    ("qwen2.5 one call", '<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Paris"}}\n</tool_call>', None, [("get_weather", {"city": "Paris"})]),
    ("qwen2.5 two calls with text", 'Let me check.\n<tool_call>\n{"name": "get_weather", '
     '"arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "add", '
     '"arguments": {"a": 1, "b": 2}}\n</tool_call>', "Let me check.",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ("hermes3 unclosed at max_tokens", '<tool_call>\n{"arguments": {"a": 1, "b": 2}, '
     '"name": "add"}', None, [("add", {"a": 1, "b": 2})]),
    ("llama3.1 json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ("llama3.1 python_tag kept", '<|python_tag|>{"name": "add", "parameters": {"a": 3, '
     '"b": 4}}', None, [("add", {"a": 3, "b": 4})]),
    ("llama3.2 two calls", '{"name": "add", "parameters": {"a": 3, "b": 4}}; {"name": '
     '"get_weather", "parameters": {"city": "Oslo"}}', None,
     [("add", {"a": 3, "b": 4}), ("get_weather", {"city": "Oslo"})]),
    ("mistral 7b v0.3", ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None,
     [("get_weather", {"city": "Paris"})]),
    ("mistral nemo with ids", '[{"name": "add", "arguments": {"a": 1, "b": 1}, "id": '
     '"a1B2c3D4e"}]', None, [("add", {"a": 1, "b": 1})]),
    ("mistral small 3.2 [ARGS]", 'get_weather[ARGS]{"city": "Paris"}', None,
     [("get_weather", {"city": "Paris"})]),
    ("mistral [ARGS] twice", '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]get_weather'
     '[ARGS]{"city": "Rome"}', None, [("add", {"a": 1, "b": 2}),
                                      ("get_weather", {"city": "Rome"})]),
    ("generic", '{"tool_calls": [{"name": "add", "arguments": {"a": 5, "b": 6}}]}', None,
     [("add", {"a": 5, "b": 6})]),
    ("openai shape", '{"tool_calls": [{"type": "function", "function": {"name": "add", '
     '"arguments": "{\\"a\\": 1, \\"b\\": 2}"}}]}', None, [("add", {"a": 1, "b": 2})]),
]


@pytest.mark.parametrize(("case", "text", "content", "calls"), RECORDED,
                         ids=[r[0] for r in RECORDED])
def test_parsers_on_recorded_output(case: str, text: str, content: str | None,
                                    calls: list[tuple[str, dict[str, Any]]]) -> None:
    got_content, got = tools.parse(text, NAMES)
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] \
        == calls
    for call in got:
        assert call["type"] == "function" and len(call["id"]) == 9 and call["id"].isalnum()


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.", '{"name": "rm_rf", "parameters": {}}',
    '{"city": "Paris"}', "<tool_call>\nnot json\n</tool_call>", "[1, 2, 3]", ""])
def test_what_is_no_call_is_content(text: str) -> None:
    assert tools.parse(text, NAMES) == (text, [])


def _template(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"),
                        model=name, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


@pytest.mark.parametrize(("name", "fmt"), [
    ("qwen2.5", "hermes"), ("chatml-hermes3", "generic"), ("llama3.1", "llama3"),
    ("mistral-nemo", "mistral"), ("smollm2", "generic"), ("phi3.5", "generic")])
def test_the_format_follows_the_template(model: LoadedModel, name: str, fmt: str) -> None:
    with _as(model, name):
        assert tools.tool_format(model) == fmt


def test_checks_name_the_field() -> None:
    for bad, field in (([], "tools"), ([{"type": "x"}], "tools[0]"),
                       ([{"function": {"name": "a b"}}], "tools[0].function.name"),
                       ([TOOLS[0], TOOLS[0]], "tools[1].function.name")):
        with pytest.raises(InvalidParamsError) as exc:
            tools.check_tools(bad)
        assert exc.value.field == field
    assert tools.check_tool_choice(None, NAMES) == ("auto", None)
    assert tools.check_tool_choice({"type": "function", "function": {"name": "add"}},
                                   NAMES) == ("named", "add")
    with pytest.raises(InvalidParamsError):
        tools.check_tool_choice("sometimes", NAMES)


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    from rbees_backend_llamacpp import LlamaCppBackend

    from rbees_core import plugins
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    loaded = LlamaCppBackend().load(resolve_model(plugins.make_manager(), DEFAULT_MODEL_REF),
                                    device="cpu", slots=1, ctx=2048, threads=2,
                                    progress=lambda s, f: None)
    yield loaded
    loaded.close()


class _as:
    """SmolLM2 wearing another family's chat template for the block."""

    def __init__(self, model: LoadedModel, name: str) -> None:
        self.model, self.name = model, name

    def __enter__(self) -> None:
        self.saved = self.model.chat_template
        self.model.chat_template = _template(self.name)

    def __exit__(self, *exc: object) -> None:
        self.model.chat_template = self.saved


def _generate(model: LoadedModel, plan: tools.ToolPlan, seed: int) -> str:
    model.begin(0, SamplingParams(temperature=0.8, seed=seed, grammar=plan.grammar))
    prompt = model.tokenize(plan.prompt)
    for at in range(0, len(prompt), model.n_batch):  # as the engine feeds a long prompt
        chunk = prompt[at:at + model.n_batch]
        model.decode([Feed(0, chunk, at + len(chunk) == len(prompt))])
    out = b""
    for _ in range(300):
        token = model.sample(0)
        if model.is_eog(token):
            break
        out += model.token_bytes(token)
        model.decode([Feed(0, (token,), True)])
    model.end(0)
    return out.decode()


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1", "mistral-nemo", "smollm2"])
def test_required_and_named_calls_validate_in_every_format(model: LoadedModel,
                                                           name: str) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with _as(model, name):
        for seed, choice in enumerate(["required", {"type": "function",
                                                    "function": {"name": "add"}}]):
            plan = tools.plan(model, messages, TOOLS, choice, parallel=seed == 0)
            assert plan.grammar is not None
            text = _generate(model, plan, seed)
            _, calls = tools.parse(text, NAMES)
            assert calls, (name, text)
            for call in calls:
                schema = {"get_weather": WEATHER, "add": ADD}[call["function"]["name"]]
                jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
            if choice != "required":
                assert {c["function"]["name"] for c in calls} == {"add"}


def test_a_native_template_shows_tools_and_past_calls(model: LoadedModel) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "a1B2c3D4e", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "sunny"}]
    with _as(model, "qwen2.5"):
        prompt = tools.plan(model, messages, TOOLS, "auto").prompt
    assert '"name": "get_weather"' in prompt and "<tool_call>" in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt
    generic = tools.plan(model, messages, TOOLS, "auto").prompt  # SmolLM2's own template
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' \
        in generic
    assert "Tool result (get_weather, call a1B2c3D4e):\nsunny" in generic
    assert "get_weather" not in tools.plan(model, messages[:1], TOOLS, "none").prompt


def test_mistral_gets_nine_character_ids(model: LoadedModel) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_8f3e2a1b9c", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_8f3e2a1b9c", "content": "sunny"}]
    with _as(model, "mistral-nemo"):
        prompt = tools.plan(model, messages, TOOLS, "auto").prompt  # no 400
    assert "call_8f3e2a1b9c" not in prompt and "[TOOL_RESULTS]" in prompt


@pytest.mark.parametrize(("pieces", "live", "calls", "content", "rest"), [
    (["Hello", " there", ", friend."], "Hello there, friend.", False, None, None),
    ([" Let", " me", " check.", "\n<tool", "_call>\n{}", "</tool_call>"], " Let me check.\n",
     True, "Let me check.", None),
    (["a", " < b", " and c"], "a ", False, None, "< b and c"),
    (['{"tool', '_calls": []}'], "", True, None, None),
    (["get_weather", "[ARGS]", "{}"], "", True, None, None),
    (["Sure", ": the answer"], "Sure: the answer", False, None, None),
    (["  ", "[1, 2]"], "", False, "  [1, 2]", "  [1, 2]"),
])
def test_live_text_streams_what_cannot_be_a_call(pieces: list[str], live: str, calls: bool,
                                                 content: str | None, rest: str | None
                                                 ) -> None:
    text = tools.LiveText()
    assert "".join(text.feed(p) for p in pieces) == live
    assert text.rest(content, calls) == rest
