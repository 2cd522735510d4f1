"""The bytes of rbees-orcd's OpenAI stream chunks: a text delta's chunk, made from bytes
precomputed per stream (the per-token fast path), is the chunk the dict and json.dumps
make, for any text and any id or model a client can cause."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbees_core.programs.orcd_openai import _OpenAIStream
from rbees_core.protocols import Delta

AWKWARD = ["", "plain", ' "quoted" ', "back\\slash\\", "\n\r\t\x00\x1f\x7f", "\u2028\u2029",
           "\U0001f41d bees", "é世", '"content": ""', "</script>", "\ud800"]


def streams(n: int, **kwargs: Any) -> tuple[_OpenAIStream, _OpenAIStream]:
    fast = _OpenAIStream(None, n, **kwargs)  # type: ignore[arg-type]
    slow = _OpenAIStream(None, n, **kwargs)  # type: ignore[arg-type]
    slow.plain = None
    return fast, slow


def chunk(stream: _OpenAIStream, index: int, text: str) -> bytes | type[Exception]:
    try:
        return stream._delta(index, Delta("text", text), 0)
    except UnicodeEncodeError as exc:  # a lone surrogate: both paths refuse it alike
        return type(exc)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("model", ["smollm2", 'we"ird\\"content": ""\u2028\U0001f41d'])
def test_a_plain_text_chunk_is_the_bytes_json_dumps_makes(chat: bool, model: str) -> None:
    fast, slow = streams(3, chat=chat, ident="chatcmpl-1", model=model, created=7,
                         usage=False)
    assert fast.plain is not None
    for index in range(3):
        for text in AWKWARD:
            assert chunk(fast, index, text) == chunk(slow, index, text), (index, text)


def test_with_logprobs_the_chunk_is_made_the_usual_way() -> None:
    fast, _ = streams(1, chat=True, ident="c", model="m", created=1, usage=False,
                      logprobs=[lambda entries: {"content": list(entries)}])
    assert fast.plain is None
    assert b'"logprobs": {"content": []}' in fast._delta(0, Delta("text", "x"), 0)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_categories=())),
       st.text(st.characters(exclude_categories=()), max_size=8), st.booleans())
def test_any_text_and_model(text: str, model: str, chat: bool) -> None:
    fast, slow = streams(2, chat=chat, ident="cmpl-" + model, model=model, created=1,
                         usage=False, tools=True)
    assert chunk(fast, 1, text) == chunk(slow, 1, text)
    assert chunk(fast, 0, "\ud800") is UnicodeEncodeError


@pytest.mark.parametrize("tools", [False, True])
def test_a_token_event_makes_the_same_bytes_and_answer_either_way(tools: bool) -> None:
    fast, slow = streams(2, chat=True, ident="c", model="m", created=1, usage=True,
                         tools=tools)
    events = [("token", {"t": text, "i": i}) for i, text in enumerate(AWKWARD[:-1])]
    events += [("token", {"t": "", "i": 20, "reasoning": "hm"}),
               ("token", {"t": "x", "i": 21, "logprobs": [{"token": "x", "logprob": -1.0}]}),
               ("end", {"stop_reason": "eos", "tokens_in": 3, "tokens_out": 12})]
    for event, data in events:
        for index in (0, 1):
            assert fast.event(index, event, data) == slow.event(index, event, data)
    for a, b in zip(fast.turns, slow.turns, strict=True):
        assert (a.content, a.reasoning, a.entries, a.finish) == \
            (b.content, b.reasoning, b.entries, b.finish)
    assert fast.tail() == slow.tail()
