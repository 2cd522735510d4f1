"""The reasoning splitter (rbees_core.reasoning) on outputs in the forms thinking models
write them, cut into pieces every way: the split never depends on where pieces end."""

from __future__ import annotations

import random
from typing import Any

import pytest

from rbees_core import reasoning
from rbees_core.chat_template import ChatTemplate
from rbees_core.reasoning import ReasoningSplitter, opens_reasoning, splitting_sink, thinks

from .test_chat_template import ours, template

# Qwen3 with enable_thinking (its template leaves the <think> to the model)
QWEN3 = ("<think>\nOkay, the user asks for the capital of France. That is Paris.\n</think>\n\n"
         "The capital of France is **Paris**.")
# Qwen3 thinking, then calling a tool in its Hermes format
QWEN3_TOOL = ("<think>\nThe user wants the weather in Paris; I should call get_weather.\n"
              "</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
              "{\"city\": \"Paris\"}}\n</tool_call>")
# DeepSeek-R1 distill whose generation prompt opened "<think>\n": the output starts inside
R1_OPENED = ("Okay, so I need to add 2 and 2. Let me think: 2 + 2 = 4.\n</think>\n\n"
             "2 + 2 = **4**")
# DeepSeek-R1 distill writing the tag itself (its older template), "<" inside the thought
R1_OWN = ("<think>\nIs 3 < 5? Yes, because 3 is smaller.\n</think>\n\n"
          "Yes: 3 < 5.")

CASES: list[tuple[str, str, bool, str, str]] = [
    # name, output, started, reasoning, content
    ("qwen3", QWEN3, False,
     "Okay, the user asks for the capital of France. That is Paris.",
     "The capital of France is **Paris**."),
    ("qwen3 tool", QWEN3_TOOL, False,
     "The user wants the weather in Paris; I should call get_weather.",
     "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
     "</tool_call>"),
    ("r1 opened", R1_OPENED, True,
     "Okay, so I need to add 2 and 2. Let me think: 2 + 2 = 4.", "2 + 2 = **4**"),
    ("r1 own tag", R1_OWN, False, "Is 3 < 5? Yes, because 3 is smaller.", "Yes: 3 < 5."),
    ("no thinking: all content, byte for byte", "  Paris <b>is</b> the capital.\n", False,
     "", "  Paris <b>is</b> the capital.\n"),
    ("a tag later is content", "Hi <think>no</think>", False, "", "Hi <think>no</think>"),
    ("cut by max_tokens inside the reasoning", "<think>\nFirst, 2 + 2 is 4. Then </thi",
     False, "First, 2 + 2 is 4. Then </thi", ""),
    ("opened, cut at once", "Hmm", True, "Hmm", ""),
    ("opened, and the model writes its own tag too", "<think>\nHmm.\n</think>\n\nOK", True,
     "Hmm.", "OK"),
    ("opened, a '<' that is no tag", "<b>Hmm</b>", True, "<b>Hmm</b>", ""),
    ("opened, cut inside a tag of its own", "\n<thi", True, "<thi", ""),
    ("opened, nothing", "", True, "", ""),
    ("only the start of a tag", "<thi", False, "", "<thi"),
    ("qwen3 without thinking (its prompt closed the think)", "Paris.", False, "", "Paris."),
    ("empty thought", "<think>\n\n</think>\n\nParis.", False, "", "Paris."),
]


def run(pieces: list[str], started: bool) -> tuple[str, str]:
    splitter = ReasoningSplitter(started=started)
    said = [splitter.feed(p) for p in pieces] + [splitter.finish()]
    return "".join(r for r, _ in said), "".join(c for _, c in said)


def chunkings(text: str, seed: int) -> list[list[str]]:
    """The text whole, per character, cut once at every place, and cut at random."""
    out = [[text], list(text)]
    out += [[text[:i], text[i:]] for i in range(1, len(text))]
    rng = random.Random(seed)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) \
            if len(text) > 1 else []
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


@pytest.mark.parametrize(("name", "output", "started", "thought", "answer"), CASES,
                         ids=[c[0] for c in CASES])
def test_the_split_is_the_same_however_the_pieces_fall(name: str, output: str, started: bool,
                                                       thought: str, answer: str) -> None:
    for i, pieces in enumerate(chunkings(output, len(name))):
        assert run(pieces, started) == (thought, answer), (name, i, pieces)


def test_reasoning_streams_as_it_comes_holding_back_only_a_possible_tag() -> None:
    splitter = ReasoningSplitter()
    assert splitter.feed("<thi") == ("", "")
    assert splitter.feed("nk>\nStep one") == ("Step one", "")
    assert splitter.feed(" done.\n</") == (" done.", "")  # "\n</" may be the end tag
    assert splitter.feed("think>\n\n") == ("", "")
    assert splitter.feed("Answer") == ("", "Answer")
    assert splitter.feed(" <") == ("", " <")  # after the reasoning: content as it comes
    assert splitter.finish() == ("", "")


def test_templates_that_think_and_prompts_that_open_the_reasoning() -> None:
    assert thinks(ours("qwen3")) and thinks(ours("deepseek-r1-distill"))
    assert not any(thinks(ours(name)) for name in ("smollm2", "qwen2.5", "llama3.1"))
    assert not thinks(None)
    chat = [{"role": "user", "content": "Capital of France?"}]
    thinking = ours("qwen3").render(chat)
    assert thinking.endswith("<|im_start|>assistant\n") and not opens_reasoning(thinking)
    plain = ours("qwen3").render(chat, enable_thinking=False)
    assert plain.endswith("<think>\n\n</think>\n\n") and not opens_reasoning(plain)
    # the R1 distills' later template: the generation prompt opens the reasoning
    assistant = "<\uff5cAssistant\uff5c>"
    opened = ChatTemplate(template("deepseek-r1-distill").replace(
        f"{{{{'{assistant}'}}}}{{% endif %}}", f"{{{{'{assistant}<think>\\n'}}}}{{% endif %}}"),
        model="r1", special_tokens={"bos_token": "<s>"}).render(chat)
    assert opened.endswith(f"{assistant}<think>\n") and opens_reasoning(opened)


def test_the_sink_keeps_one_event_per_piece_and_flushes_before_the_end() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    sink = splitting_sink(lambda e, d: seen.append((e, d)), started=True)
    for i, piece in enumerate(["Think", "ing", " </", "thi"]):  # cut by max_tokens
        sink("token", {"t": piece, "i": i, "logprobs": [i]})
    sink("end", {"stop_reason": "max_tokens"})
    tokens = [d for e, d in seen if e == "token"]
    assert [d["i"] for d in tokens] == [0, 1, 2, 3, 4]  # one per piece, then the held text
    assert [d.get("logprobs") for d in tokens] == [[0], [1], [2], [3], None]
    assert "".join(d.get("reasoning", "") for d in tokens) == "Thinking </thi"
    assert all(d["t"] == "" for d in tokens)
    assert seen[-1] == ("end", {"stop_reason": "max_tokens"})

    seen.clear()
    sink = splitting_sink(lambda e, d: seen.append((e, d)), started=False)
    for i, piece in enumerate(["<think>", "Hm", "</think>", "\n\nOK"]):
        sink("token", {"t": piece, "i": i})
    sink("end", {})
    assert [(d["t"], d.get("reasoning")) for _, d in seen[:-1]] == [
        ("", None), ("", "Hm"), ("", None), ("OK", None)]
    assert reasoning.OPEN == "<think>" and reasoning.CLOSE == "</think>"


def test_a_past_turns_reasoning_reaches_the_template_through_task_and_worker() -> None:
    """An agent loop on Qwen3: the assistant turn that called a tool after the last user
    message keeps its reasoning, which Qwen3's template shows; /v1 passes it as sent."""
    import attrs

    from rbees_core.api.orchestrator import TaskRequest
    from rbees_core.api.worker import ExecuteRequest
    from rbees_core.errors import InvalidParamsError
    from rbees_core.orchestrator.jobs import execute_body, new_job
    from rbees_core.schema import from_mapping

    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call],
             "reasoning_content": "I should look it up."},
            {"role": "tool", "tool_call_id": "c1", "content": "21 C"}]
    task = from_mapping(TaskRequest, {"model": "qwen3", "messages": chat})
    req = from_mapping(ExecuteRequest, execute_body(new_job(task)))
    assert req.messages is not None
    messages = [{k: v for k, v in attrs.asdict(m).items() if v is not None}
                for m in req.messages]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    text = ours("qwen3").render(messages, tools=tools)
    assert "<think>\nI should look it up.\n</think>" in text
    with pytest.raises(InvalidParamsError, match="reasoning_content"):
        from_mapping(TaskRequest, {"model": "m", "messages": [
            {"role": "user", "content": "x", "reasoning_content": "no"}]})
