"""The shared layer of the client protocols (rbees_core.protocols): the neutral request's
task, a job's events as deltas, the neutral error statuses, the error shapes by path."""

from __future__ import annotations

from typing import Any

from rbees_core import protocols as p
from rbees_core.http import error_shape, register_error_shape


def test_a_chat_request_is_the_task_the_openai_path_submits() -> None:
    chat = p.ChatRequest(
        model="smollm2", messages=[p.message("user", "Hi")], max_tokens=8, stop=["\n"],
        tools=[p.tool("add", {"type": "object"})], tool_choice=p.named_choice("add"),
        think=False, extra={"chat_template_kwargs": {"x": 1}})
    task = chat.task()
    assert task == {
        "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
        "stop": ["\n"], "tools": [{"type": "function", "function": {
            "name": "add", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "add"}},
        "chat_template_kwargs": {"x": 1, "enable_thinking": False}}
    assert chat.tooled
    assert not p.ChatRequest(model="m", tools=task["tools"], tool_choice="none").tooled


def test_a_turn_reads_text_reasoning_and_the_end() -> None:
    turn = p.Turn()
    out: list[p.Delta] = []
    for event, data in [("started", {}), ("token", {"t": "", "reasoning": "hm"}),
                        ("token", {"t": "Hi", "logprobs": [{"x": 1}]}),
                        ("end", {"stop_reason": "max_tokens", "tokens_in": 3, "tokens_out": 2})]:
        out += turn.feed(event, data)
    assert [(d.kind, d.text) for d in out] == [("reasoning", "hm"), ("text", "Hi"), ("end", "")]
    assert out[-1].finish == "length" and turn.finish == "length"
    assert (turn.content, turn.reasoning, turn.entries) == ("Hi", "hm", [{"x": 1}])
    assert (turn.usage.tokens_in, turn.usage.tokens_out) == (3, 2)


def test_with_tools_the_calls_and_held_text_come_at_the_end() -> None:
    turn = p.Turn(tools=True)
    assert turn.feed("token", {"t": '{"name"'}) == []  # may be a call: held
    call = p.tool_call("abc123def", "add", {"a": 1})
    out = turn.feed("end", {"stop_reason": "eos", "content": None, "tool_calls": [call]})
    assert [d.kind for d in out] == ["tool_call", "end"]
    assert out[0].call == {"id": "abc123def", "name": "add", "arguments": '{"a": 1}'}
    assert turn.finish == "tool_calls" and turn.calls == [call] and turn.content is None
    plain = p.Turn(tools=True)
    streamed = plain.feed("token", {"t": "Hello there"})
    rest = plain.feed("end", {"stop_reason": "eos", "content": "Hello there", "tool_calls": []})
    assert [d.text for d in streamed] == ["Hello there"] and [d.kind for d in rest] == ["end"]


def test_job_errors_map_to_neutral_statuses() -> None:
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"code": "INVALID_PARAMS", "field": "messages"}, 400, "messages"),
        ({"code": "NO_CAPACITY", "reason": "unknown_model"}, 404, "model"),
        ({"code": "WORKER_FAILED"}, 503, None), ({"code": "CANCELLED"}, 499, None),
        ({"code": "DECODE_ERROR"}, 502, None), ({"code": "QUEUE_FULL_DROPPED"}, 429, None)]
    for data, status, field in cases:
        error = p.job_error({"message": "m", **data})
        assert (error.status, error.field) == (status, field), data


def test_a_registered_error_shape_answers_for_its_room_and_the_room_itself() -> None:
    def mine(status: int, message: str, code: str, field: str | None) -> dict[str, Any]:
        return {"kind": "mine", "status": status}

    register_error_shape("/v1/test-shape/", mine)
    assert error_shape("/v1/test-shape/x") is mine and error_shape("/v1/test-shape") is mine
    assert error_shape("/v1/test-shapes") is not mine
    openai = error_shape("/v1/chat/completions")
    assert openai is not None and openai(401, "no", "UNAUTHENTICATED", None)["error"][
        "type"] == "authentication_error"
    assert error_shape("/v2/tasks") is None


def test_the_fuzz_checks_each_protocols_own_error_shape() -> None:
    import httpx
    import pytest

    from rbees_core.testing.fuzz.runner import check_answer

    register_error_shape("/v1/test-fuzz/", lambda status, message, code, field: {
        "type": "error", "error": {"type": "invalid_request_error", "message": message}})
    mine = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    check_answer(httpx.Response(400, json=mine), "/v1/test-fuzz")
    openai = {"error": {"message": "bad", "type": "invalid_request_error", "param": None,
                        "code": None}}
    check_answer(httpx.Response(400, json=openai), "/v1/chat/completions")
    with pytest.raises(AssertionError):
        check_answer(httpx.Response(400, json=openai), "/v1/test-fuzz/x")
    with pytest.raises(AssertionError):
        check_answer(httpx.Response(400, json=mine), "/v1/chat/completions")
