"""rbees_core.chat_template renders real templates byte for byte as transformers does.

The templates are the models' own (tests/data/chat_templates, README there says where each
comes from); the expected text is computed here by transformers' ``apply_chat_template`` on a
tokenizer built in memory with that template, so no hub access is needed. rbees gets the
messages as an OpenAI client sends them (``content: null``, ``arguments`` as a JSON string);
transformers gets them in its own convention (arguments as an object).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from rbees_core.chat_template import ChatTemplate, compile_template
from rbees_core.errors import InvalidParamsError
from rbees_core.testing import WorkerHandle, parse_sse

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

#: template file -> (bos_token, eos_token) of its model
TOKENS: dict[str, tuple[str | None, str]] = {
    "chatml-hermes3": ("<|begin_of_text|>", "<|im_end|>"),
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-7b-instruct": ("<s>", "</s>"),
    "mistral-small-24b": ("<s>", "</s>"),
    "mistral-nemo": ("<s>", "</s>"),
    "gemma2": ("<bos>", "<eos>"),
    "gemma3": ("<bos>", "<eos>"),
    "qwen2.5": (None, "<|im_end|>"),
    "phi3.5": ("<s>", "<|endoftext|>"),
    "phi4": ("<|endoftext|>", "<|im_end|>"),
    "phi4-mini": ("<|endoftext|>", "<|endoftext|>"),
    "qwen3": (None, "<|im_end|>"),
    "deepseek-r1-distill": ("<\uff5cbegin\u2581of\u2581sentence\uff5c>",
                            "<\uff5cend\u2581of\u2581sentence\uff5c>"),
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city, in °C",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "e.g. Zürich"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


#: name -> (messages as an OpenAI client sends them, tools, add_generation_prompt)
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool]] = {
    "system+user": ([{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Hello, who are you?"}], None, True),
    "user only": ([{"role": "user", "content": "  Grüße aus Köln 👋  "}], None, True),
    "multi-turn": ([{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Count to three."},
                    {"role": "assistant", "content": "1, 2, 3"},
                    {"role": "user", "content": "Again"}], None, True),
    "multi-turn, system, no generation prompt": (
        [{"role": "system", "content": "Be kind."},
         {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}], None, False),
    "tools offered": ([{"role": "system", "content": "You help with weather."},
                       {"role": "user", "content": "Weather in Zürich?"}], [WEATHER, TIME], True),
    "tools offered, no system": ([{"role": "user", "content": "Weather in Paris?"}],
                                 [WEATHER], True),
    "tool round trip": (
        [{"role": "system", "content": "You help with weather."},
         {"role": "user", "content": "Weather in Zürich?"},
         {"role": "assistant", "content": None,
          "tool_calls": [call("call_1", "get_weather", {"city": "Zürich", "unit": "celsius"})]},
         {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
          "content": '{"temperature": 21, "sky": "clear"}'}], [WEATHER], True),
    "tool round trip, 9-character ids": (  # Mistral's templates want these
        [{"role": "user", "content": "Weather in Lyon?"},
         {"role": "assistant", "content": None,
          "tool_calls": [call("Ab3dE6gH9", "get_weather", {"city": "Lyon"})]},
         {"role": "tool", "tool_call_id": "Ab3dE6gH9", "name": "get_weather",
          "content": '{"temperature": 18}'},
         {"role": "assistant", "content": "18 °C in Lyon."},
         {"role": "user", "content": "And tomorrow?"}], [WEATHER], True),
    "parallel tool calls": (
        [{"role": "user", "content": "Weather and time in Oslo?"},
         {"role": "assistant", "content": "Let me check.",
          "tool_calls": [call("a", "get_weather", {"city": "Oslo"}),
                         call("b", "get_time", {"city": "Oslo"})]},
         {"role": "tool", "tool_call_id": "a", "content": "4 °C"},
         {"role": "tool", "tool_call_id": "b", "content": "10:42"},
         {"role": "assistant", "content": "4 °C and 10:42."},
         {"role": "user", "content": "Thanks"}], [WEATHER, TIME], True),
}


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same chat in transformers' convention: tool call arguments as objects."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def hf_render(name: str, messages: list[dict[str, Any]], tools: Any,
              add_generation_prompt: bool, **kwargs: Any) -> str:
    """What transformers' apply_chat_template renders, on a tokenizer made in memory."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    bos, eos = TOKENS[name]
    vocab = {"<unk>": 0, eos: 1, **({bos: 2} if bos else {})}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token=bos, eos_token=eos, chat_template=template(name))
    assert set(tokenizer.special_tokens_map) <= {"bos_token", "eos_token"}
    return str(tokenizer.apply_chat_template(
        hf_messages(messages), tools=tools, tokenize=False,
        add_generation_prompt=add_generation_prompt, **kwargs))


def has_system(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "system" for m in messages)


def empty_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat with "" for the null content of assistant turns with tool calls."""
    return [{**m, "content": ""} if m.get("tool_calls") and m.get("content") is None else m
            for m in messages]


def system_in_user_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What llama.cpp does for a template without a system role (test's own version)."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    first = next(m for m in rest if m["role"] == "user")
    first["content"] = f"{system}\n{first['content']}"
    return rest


def ours(name: str) -> ChatTemplate:
    bos, eos = TOKENS[name]
    return ChatTemplate(template(name), model=f"test/{name}",
                        special_tokens={"bos_token": bos, "eos_token": eos})  # type: ignore[dict-item]


def test_every_template_file_has_its_tokens() -> None:
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == sorted(TOKENS)


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_matches_transformers_byte_for_byte(name: str) -> None:
    rendered = 0
    for label, (messages, tools, gen) in CONVERSATIONS.items():
        try:
            expected: str | None = hf_render(name, messages, tools, gen)
        except Exception:  # the template refuses this chat (e.g. no system role): so must we
            expected = None
        if expected is None and any(m.get("tool_calls") and m.get("content") is None
                                    for m in messages):
            # a template that reads every content as a string refuses content null: as
            # llama.cpp does, the renderer gives it "" there
            try:
                expected = hf_render(name, empty_content(messages), tools, gen)
            except Exception:
                expected = None
        if expected is None and has_system(messages) and not ours(name).capabilities.system:
            # a template without a system role: the system message goes to the user turn
            try:
                expected = hf_render(name, system_in_user_turn(messages), tools, gen)
            except Exception:
                expected = None
        if expected is None:
            with pytest.raises(InvalidParamsError) as info:
                ours(name).render(messages, tools=tools, add_generation_prompt=gen)
            assert f"test/{name}" in str(info.value), label
            continue
        got = ours(name).render(messages, tools=tools, add_generation_prompt=gen)
        assert got.encode() == expected.encode(), f"{name}: {label}"
        rendered += 1
    assert rendered >= 3, f"{name} rendered only {rendered} conversations"


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "mistral-nemo"])
def test_tool_families_really_show_tools_and_calls(name: str) -> None:
    messages, tools, _ = CONVERSATIONS["tool round trip, 9-character ids"]
    text = ours(name).render(messages, tools=tools)
    assert "get_weather" in text and "Zürich" in text  # tojson keeps non-ASCII as it is
    assert '{"city": "Lyon"}' in text  # the arguments: an object, not a JSON string


def test_content_parts_are_joined_for_a_text_template() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                          {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    assert ours("smollm2").render(parts) == hf_render("smollm2", joined, None, True)


def test_content_parts_pass_through_to_a_template_that_reads_them() -> None:
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                             {"type": "text", "text": "there"}]}]
    assert ours("gemma3").render(messages) == hf_render("gemma3", messages, None, True)


def test_a_non_text_part_is_a_400_for_a_text_template() -> None:
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(InvalidParamsError, match="image_url"):
        ours("smollm2").render(messages)


@pytest.mark.parametrize(("name", "tools", "tool_calls", "system", "parts"), [
    ("llama3.1", True, True, True, False),
    ("qwen2.5", True, True, True, False),
    ("mistral-nemo", True, True, True, False),
    ("smollm2", False, False, True, False),
    ("mistral-7b-instruct", False, False, False, False),
    ("gemma3", False, False, False, True),
])
def test_capabilities_are_probed_from_the_template(name: str, tools: bool, tool_calls: bool,
                                                   system: bool, parts: bool) -> None:
    caps = ours(name).capabilities
    assert (caps.tools, caps.tool_calls, caps.system, caps.parts) == (
        tools, tool_calls, system, parts)


def test_a_system_message_for_a_template_without_one_goes_to_the_user_turn() -> None:
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    assert ours("gemma2").render(messages) == hf_render("gemma2", [
        {"role": "user", "content": "Be terse.\nHi"}, *messages[2:]], None, True)
    # a chat the template refuses for another reason too is refused, in its first words
    with pytest.raises(InvalidParamsError, match="System role not supported"):
        ours("gemma2").render([messages[0], messages[1], messages[3]])


def test_template_kwargs_reach_the_template() -> None:
    chat = ChatTemplate("{{ 'think' if enable_thinking else 'no' }}|{{ bos_token }}",
                        model="m", special_tokens={"bos_token": "<s>"})
    messages = [{"role": "user", "content": "x"}]
    assert chat.render(messages, enable_thinking=True) == "think|<s>"
    assert chat.render(messages, enable_thinking=False, bos_token="B") == "no|B"


def test_tool_use_template_is_chosen_when_tools_are_given() -> None:
    chat = ChatTemplate("plain", tool_source="tools:{{ tools | length }}", model="m")
    messages = [{"role": "user", "content": "x"}]
    assert chat.render(messages) == "plain"
    assert chat.render(messages, tools=[WEATHER]) == "tools:1"


@pytest.mark.parametrize(("source", "words"), [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{% if %}", "does not compile"),
    ("{% for m in messages %}{{ m.content + 1 }}{% endfor %}", "TypeError"),
    ("{{ messages.__class__.__mro__ }}", "refused"),
    ("{{ ''.__class__.__subclasses__() }}", "refused"),
])
def test_a_failing_template_is_a_400_naming_the_model(source: str, words: str) -> None:
    chat = ChatTemplate(source, model="acme/broken-7b")
    with pytest.raises(InvalidParamsError) as info:
        chat.render([{"role": "user", "content": "hi"}])
    assert info.value.status == 400 and info.value.field == "messages"
    assert "acme/broken-7b" in str(info.value) and words in str(info.value)


def test_tojson_and_strftime_now_behave_as_in_transformers() -> None:
    chat = ChatTemplate("{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|"
                        "{{ strftime_now('%Y') | length }}", model="m")
    tools = [{"b": "é<>&", "a": 1}]
    first, second, year = chat.render([], tools=tools).split("|")
    assert first == json.dumps(tools, ensure_ascii=False)
    assert second == json.dumps(tools, ensure_ascii=False, indent=2)
    assert year == "4"


def test_a_template_compiles_once() -> None:
    source = template("smollm2") + "{# once #}"
    compile_template.cache_clear()
    a, b = ChatTemplate(source, model="a"), ChatTemplate(source, model="b")
    for _ in range(3):
        a.render([{"role": "user", "content": "hi"}])
        b.render([{"role": "user", "content": "hi"}])
    assert compile_template.cache_info().misses == 1


@pytest.mark.model
def test_smollm2_chats_through_its_own_template_in_a_real_worker(worker: WorkerHandle,
                                                                smollm2_path: str) -> None:
    from rbees_backend_llamacpp.backend import LlamaCppBackend

    model = LlamaCppBackend().load(smollm2_path, device="cpu", slots=1, ctx=512, threads=1,
                                   progress=lambda *_: None)
    try:
        messages = [{"role": "user", "content": "What is 2+2?"}]
        assert model.render_chat(messages) == hf_render("smollm2", messages, None, True)
    finally:
        model.close()
    response = httpx.post(f"{worker.url}/v2/execute", timeout=120, json={
        "job_id": "tmpl", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]})
    assert response.status_code == 200, response.text
    events = parse_sse(response.text)
    assert events[-1][1] == "end", events
    text = "".join(d["t"] for _, e, d in events if e == "token")
    assert text.strip()


def gguf_with_template(src: str, dst: Path, template_text: str) -> Path:
    """A copy of the GGUF ``src`` whose chat template is ``template_text`` (padded with a
    Jinja comment to the original's length, so that the file is patched in place)."""
    data = Path(src).read_bytes()
    meta_template = _read_template(src).encode()
    new = template_text.encode()
    assert len(new) + 4 <= len(meta_template) and data.count(meta_template) == 1
    new += b"{#" + b" " * (len(meta_template) - len(new) - 4) + b"#}"
    dst.write_bytes(data.replace(meta_template, new))
    return dst


def _read_template(path: str) -> str:
    from rbees_core.gguf import read_header

    return str(read_header(path).metadata["tokenizer.chat_template"])


@pytest.mark.model
def test_a_template_that_refuses_is_a_400_from_the_worker(rbees_worker: Any, tmp_path: Path,
                                                        smollm2_path: str) -> None:
    bad = gguf_with_template(smollm2_path, tmp_path / "picky.gguf",
                             "{{ raise_exception('only a system turn, please') }}")
    worker = rbees_worker(model=str(bad))
    response = httpx.post(f"{worker.url}/v2/execute", timeout=60, json={
        "job_id": "refused", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_PARAMS" and error["details"]["field"] == "messages"
    assert "picky.gguf" in error["message"] and "only a system turn" in error["message"]
    # a prompt still works: only chats need the template
    response = httpx.post(f"{worker.url}/v2/execute", timeout=60, json={
        "job_id": "prompt", "max_tokens": 2, "prompt": "Hello"})
    assert response.status_code == 200 and parse_sse(response.text)[-1][1] == "end"


@pytest.mark.model
def test_a_template_refusal_reaches_an_openai_client_as_a_400(
        tmp_path: Path, smollm2_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    from .test_orcd import up

    bad = gguf_with_template(smollm2_path, tmp_path / "picky.gguf",
                             "{{ raise_exception('only a system turn, please') }}")
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[models]]\nid = "picky"\nname = "Picky"\nsize_bytes = '
                       f'{bad.stat().st_size}\ncontext_length = 2048\nlicense = "apache-2.0"\n'
                       f'sources = ["file:{bad}"]\n', encoding="utf-8")
    monkeypatch.setenv("RBEES_POOL_CATALOG_FILE", str(catalog))
    cluster = up(tmp_path / "home")
    try:
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
        with client, pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="picky", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert info.value.status_code == 400
        assert "picky.gguf" in info.value.message and "only a system turn" in info.value.message
    finally:
        cluster.rbees("down")


@pytest.mark.model
def test_a_gguf_without_a_template_chats_in_llamacpps_default(tmp_path: Path,
                                                             smollm2_path: str) -> None:
    from rbees_backend_llamacpp.backend import LlamaCppBackend

    data = Path(smollm2_path).read_bytes()
    key = b"tokenizer.chat_template"
    assert data.count(key) == 1
    bare = tmp_path / "bare.gguf"
    bare.write_bytes(data.replace(key, b"tokenizer.chat_templatX"))  # the key is gone
    load = LlamaCppBackend().load
    model = load(str(bare), device="cpu", slots=1, ctx=256, threads=1, progress=lambda *_: None)
    try:
        assert model.chat_template is None
        assert model.render_chat([{"role": "user", "content": "hi"}]) == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        with pytest.raises(InvalidParamsError) as info:
            model.render_chat([{"role": "user", "content": "hi"}], tools=[WEATHER])
        assert info.value.field == "tools" and "bare.gguf" in str(info.value)
    finally:
        model.close()
    model = load(smollm2_path, device="cpu", slots=1, ctx=256, threads=1,
                 progress=lambda *_: None)
    try:
        assert model.chat_template is not None
        assert model.chat_template.capabilities.system
        assert not model.chat_template.capabilities.tools
    finally:
        model.close()
