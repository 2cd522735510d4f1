"""Logprobs, penalties, min_p, logit_bias and max_tokens clamping through rbees-orcd's /v1 on a
real ``rbees up`` cluster (SmolLM2), driven by the official ``openai`` client. The cluster's
workers hold 512 tokens per slot, so that filling a context stays quick; the client fixture
is test_orcd_openai's."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from .test_orcd import Cluster, up
from .test_orcd_openai import client

__all__ = ["client"]
CTX = 512
CHAT: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
REPETITIVE = "List the word 'bee' twenty times:"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("sampling"), environ={"RBEES_PLACEMENT_CTX": str(CTX)})
    yield c
    c.rbees("down")


@functools.cache
def _token_id(text: str) -> int:
    """SmolLM2's single token for ``text`` (its vocabulary alone, through llama-cpp-python)."""
    import llama_cpp

    from rbees_core import plugins
    from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

    vocab = llama_cpp.Llama(resolve_model(plugins.make_manager(), DEFAULT_MODEL_REF),
                            vocab_only=True, verbose=False)
    ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=CHAT, temperature=0, seed=1, max_tokens=12, logprobs=True,
        top_logprobs=3)
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert answer.usage is not None and len(content) == answer.usage.completion_tokens
    assert b"".join(bytes(e.bytes or []) for e in content) == (choice.message.content or
                                                              "").encode()
    for entry in content:  # greedy: the chosen token is the likeliest
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (
            entry.token, entry.logprob)
    streamed = []
    text = ""
    for chunk in client.chat.completions.create(
            model="smollm2", messages=CHAT, temperature=0, seed=1, max_tokens=12,
            logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            lp = chunk.choices[0].logprobs
            assert lp is not None and lp.content is not None
            streamed.extend(lp.content)
    assert text == choice.message.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(streamed, content, strict=True))
    plain = client.chat.completions.create(model="smollm2", messages=CHAT, temperature=0,
                                           seed=1, max_tokens=12)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content


def test_completions_logprobs_in_the_legacy_form(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    answer = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8,
                                       temperature=0, logprobs=2)
    choice = answer.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset is not None and lp.text_offset[0] == len(prompt)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob and len(top) <= 3
        assert max(top.values()) == logprob  # greedy
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=8,
                                            temperature=0, logprobs=2, stream=True))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.tokens or []]
    assert tokens == lp.tokens


def test_penalties_change_greedy_output(client: openai.OpenAI) -> None:
    def repeats(**extra: Any) -> tuple[int, str]:
        text = client.completions.create(model="smollm2", prompt=REPETITIVE, max_tokens=32,
                                         temperature=0, **extra).choices[0].text
        words = text.split()
        return len(words) - len(set(words)), text

    plain, text = repeats()
    assert plain >= 6, text  # greedy SmolLM2 repeats itself here
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}):
        penalized, other = repeats(**extra)
        assert penalized < plain / 2, (extra, text, other)
    assert repeats(extra_body={"min_p": 0.3})[1] == text  # min_p: no effect on greedy


def test_min_p_is_accepted_when_sampling(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="smollm2", messages=CHAT, temperature=0.9,
                                            seed=5, max_tokens=8,
                                            extra_body={"min_p": 0.2})
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI) -> None:
    def first(**extra: Any) -> str:
        answer = client.chat.completions.create(
            model="smollm2", messages=CHAT, temperature=0, max_tokens=1, logprobs=True,
            **extra)
        content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and len(content) == 1
        return content[0].token

    greedy = first()
    banned = _token_id(greedy)
    assert first(logit_bias={str(banned): -100}) != greedy
    forced = _token_id(" bees")
    assert first(logit_bias={str(forced): 100}) == " bees"


def test_max_completion_tokens_beyond_the_context_ends_with_length(
        client: openai.OpenAI) -> None:
    """A prompt that leaves a few of the slot's tokens and max_completion_tokens 20000 end
    with length once the context is full."""
    def ask(words: int) -> list[Any]:
        return [{"role": "user", "content": " ".join(["bee"] * words)
                 + "\nWrite a long story about these bees."}]

    def prompt_tokens(words: int) -> int:
        answer = client.chat.completions.create(model="smollm2", max_tokens=1,
                                                messages=ask(words))
        assert answer.usage is not None
        return answer.usage.prompt_tokens

    base = prompt_tokens(100)
    per_word = (prompt_tokens(200) - base) / 100
    assert base + 200 < CTX
    words = 100 + int((CTX - 24 - base) / per_word)
    answer = client.chat.completions.create(
        model="smollm2", max_completion_tokens=20000, temperature=0, messages=ask(words))
    assert answer.usage is not None
    assert answer.choices[0].finish_reason == "length", answer
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == CTX, answer.usage
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model="smollm2", max_completion_tokens=20000, messages=ask(words + 200))
    assert too_long.value.body["param"] == "prompt"  # type: ignore[index]


@pytest.mark.parametrize(("extra", "param"), [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"logprobs": "yes"}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"5": 150}}, "logit_bias"),
    ({"logit_bias": {"bee": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # beyond SmolLM2's vocabulary
    ({"max_completion_tokens": 2**31}, "max_tokens"),
])
def test_bad_values_are_openai_400s(cluster: Cluster, extra: dict[str, Any], param: str
                                    ) -> None:
    answer = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=60, json={
        "model": "smollm2", "messages": CHAT, "max_tokens": 2, **extra})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error


def test_completions_logprobs_take_0_to_5(cluster: Cluster) -> None:
    for bad in (6, True, -1):
        answer = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
            "model": "smollm2", "prompt": "Bees", "max_tokens": 2, "logprobs": bad})
        assert answer.status_code == 400, (bad, answer.text)
        assert answer.json()["error"]["param"] == "logprobs"


def test_rbees_jobs_submit_takes_the_sampling_flags(cluster: Cluster) -> None:
    import json

    done = cluster.rbees("jobs", "submit", "--model", "smollm2", "--prompt", "Bees are",
                         "--raw", "--max-tokens", "6", "--temperature", "0", "--logprobs", "2",
                         "--presence-penalty", "0.5", "--frequency-penalty", "0.5",
                         "--min-p", "0.1", "--format", "json")
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)["end"]["logprobs"]
    assert len(entries) == 6 and all(len(e["top_logprobs"]) == 2 for e in entries)
    text = cluster.rbees("jobs", "submit", "--model", "smollm2", "--prompt", "Bees are",
                         "--raw", "--max-tokens", "4", "--temperature", "0", "--logprobs", "1")
    assert text.returncode == 0, text.stderr
    assert len([line for line in text.stderr.splitlines() if "\t" in line]) == 4, text.stderr
