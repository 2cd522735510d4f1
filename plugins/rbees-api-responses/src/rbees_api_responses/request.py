"""A Responses request as rbees runs it, and the items of its answer.

:func:`chat_request` turns a ``POST /v1/responses`` body into a
:class:`~rbees_core.protocols.ChatRequest`: ``instructions`` and ``input`` (a text, or
items: messages, ``function_call`` and ``function_call_output`` items, ``reasoning`` items)
become the task's chat turns, function ``tools`` the task's, ``text.format`` a JSON schema,
``reasoning.effort`` the template's ``reasoning_effort``, ``max_output_tokens`` the task's
``max_tokens``. The API is stateless here: what needs a stored response
(``previous_response_id``, ``conversation``, ``background``, ``prompt``) is refused, as are
inputs and tools rbees cannot run (images, files, built-in tools).
"""

from __future__ import annotations

from typing import Any

from rbees_core import protocols as p
from rbees_core.errors import InvalidParamsError
from rbees_core.protocols import RequestError
from rbees_core.structured import response_format_schema

#: The task's fields as this API names them (a 400 from the task's checks names these).
FIELDS = {"max_tokens": "max_output_tokens", "json_schema": "text.format",
          "reasoning_effort": "reasoning.effort", "messages": "input", "prompt": "input"}
#: Fields that need state rbees does not keep, or work it does not do: refused when set.
REFUSED = {"previous_response_id": "rbees keeps no responses; send the conversation as input",
           "conversation": "rbees keeps no conversations; send them as input",
           "background": "background responses are not supported",
           "prompt": "stored prompt templates are not supported; send instructions"}


def _bad(field: str, message: str) -> RequestError:
    return RequestError(400, message, field=field)


def _content_text(content: Any, field: str, role: str) -> str:
    """A message's content: a string or text parts (``input_text``; an assistant's
    ``output_text``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(field, "content must be a string or an array of content parts")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise _bad(f"{field}[{i}]", f"a {kind!r} content part is not supported (only "
                       "input_text, and output_text in an assistant message)")
    return "".join(texts)


def _items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat turns of ``instructions`` and ``input``: consecutive ``function_call``
    items join the assistant turn before them, a ``function_call_output`` becomes a tool
    turn, a ``reasoning`` item the next assistant turn's reasoning."""
    turns: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", "instructions must be a string")
        if instructions:
            turns.append(p.message("system", instructions))
    given = body.get("input")
    if isinstance(given, str):
        return [*turns, p.message("user", given)]
    if not isinstance(given, list) or not given:
        raise _bad("input", "input must be a string or a non-empty array of items")
    names: dict[str, str] = {}
    thought: list[str] = []
    for i, item in enumerate(given):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, "each input item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"{where}.role", "role must be user, assistant, system or developer")
            text = _content_text(item.get("content"), f"{where}.content", role)
            role = "system" if role == "developer" else role
            reasoning = "".join(thought) if role == "assistant" else None
            thought = [] if role == "assistant" else thought
            turns.append(p.message(role, text, reasoning=reasoning or None))
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            arguments = item.get("arguments", "{}")
            if not (isinstance(call_id, str) and isinstance(name, str)
                    and isinstance(arguments, str)):
                raise _bad(where, "a function_call item needs call_id, name and arguments "
                           "(a JSON string)")
            call = p.tool_call(call_id, name, arguments)
            p.check_calls([call], where)
            names[call_id] = name
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant" and not last.get(
                    "tool_calls"):
                last["tool_calls"] = [call]
            else:
                turns.append(p.message("assistant", None, tool_calls=[call],
                                       reasoning="".join(thought) or None))
                thought = []
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad(f"{where}.call_id", "a function_call_output item needs call_id")
            text = output if isinstance(output, str) else _content_text(
                output, f"{where}.output", "tool")
            turns.append(p.tool_result(call_id, text, names.get(call_id)))
        elif kind == "reasoning":
            for part in item.get("content") or item.get("summary") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    thought.append(part["text"])
        else:
            raise _bad(f"{where}.type", f"{kind!r} input items are not supported (message, "
                       "function_call, function_call_output and reasoning are)")
    return turns


def _tools(body: dict[str, Any], chat: p.ChatRequest) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "tools must be an array")
        chat.tools = []
        for i, spec in enumerate(tools):
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind != "function":
                raise _bad(f"tools[{i}].type", f"{kind!r} tools are not supported; only "
                           "function tools")
            if not isinstance(spec.get("name"), str):
                raise _bad(f"tools[{i}].name", "each function tool needs a name")
            parameters = spec.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise _bad(f"tools[{i}].parameters", "parameters must be an object")
            description = spec.get("description")
            chat.tools.append(p.tool(spec["name"], parameters,
                                     description if isinstance(description, str) else None))
    choice = body.get("tool_choice")
    if choice is None:
        return
    if choice in ("auto", "none", "required"):
        chat.tool_choice = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(
            choice.get("name"), str):
        chat.tool_choice = p.named_choice(choice["name"])
    else:
        raise _bad("tool_choice", 'tool_choice must be "auto", "none", "required" or '
                   '{"type": "function", "name": ...}')
    if not chat.tools:
        if chat.tool_choice not in ("auto", "none"):
            raise _bad("tool_choice", "tool_choice needs tools")
        chat.tool_choice = None


def _format(body: dict[str, Any], chat: p.ChatRequest) -> None:
    text = body.get("text")
    if text is None:
        return
    if not isinstance(text, dict):
        raise _bad("text", "text must be an object")
    fmt = text.get("format")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return
    if not isinstance(fmt, dict):
        raise _bad("text.format", "format must be an object")
    as_chat: Any = fmt
    if fmt.get("type") == "json_schema":
        as_chat = {"type": "json_schema", "json_schema": {
            k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
    try:
        chat.json_schema = response_format_schema(as_chat, field="text.format")
    except InvalidParamsError as exc:
        raise _bad(exc.field, exc.message) from exc


def chat_request(body: dict[str, Any]) -> p.ChatRequest:
    """The neutral request of a Responses body. Raises :class:`RequestError` (400 naming
    the field)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "model is required")
    for name, why in REFUSED.items():
        if body.get(name):
            raise _bad(name, why)
    for name in ("stream", "parallel_tool_calls", "store"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise _bad(name, f"{name} must be true or false")
    chat = p.ChatRequest(model=model, messages=_items(body))
    limit = body.get("max_output_tokens")
    if limit is not None:
        chat.max_tokens = limit
    chat.temperature, chat.top_p = body.get("temperature"), body.get("top_p")
    if body.get("parallel_tool_calls") is not None:
        chat.parallel_tool_calls = body["parallel_tool_calls"]
    _tools(body, chat)
    if chat.tools is None:
        chat.parallel_tool_calls = None
    _format(body, chat)
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise _bad("reasoning", "reasoning must be an object")
        if reasoning.get("effort") is not None:
            chat.extra["reasoning_effort"] = reasoning["effort"]
    return chat


def field_name(field: str | None) -> str | None:
    """The request field a task field stands for (a 400 from the task's checks)."""
    return None if field is None else FIELDS.get(field, field)


def render(error: RequestError) -> dict[str, Any]:
    """A :class:`RequestError` in OpenAI's shape, the task's field names mapped back."""
    return p.openai_body(RequestError(error.status, error.message,
                                      field=field_name(error.field), code=error.code,
                                      retry_after_s=error.retry_after_s))


def usage(turn: p.Turn) -> dict[str, Any]:
    """The answer's ``usage`` object."""
    tokens_in, tokens_out = turn.usage.tokens_in, turn.usage.tokens_out
    return {"input_tokens": tokens_in, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tokens_out, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens_in + tokens_out}


def reasoning_item(ident: str, text: str) -> dict[str, Any]:
    """A ``reasoning`` output item holding the model's reasoning text."""
    return {"id": ident, "type": "reasoning", "summary": [], "status": "completed",
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(ident: str, text: str, status: str = "completed") -> dict[str, Any]:
    """A ``message`` output item with one ``output_text`` part."""
    return {"id": ident, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}]}


def call_item(ident: str, call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A ``function_call`` output item (``call``: a :class:`~rbees_core.protocols.Delta`'s
    ``{id, name, arguments}``)."""
    return {"id": ident, "type": "function_call", "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"], "status": status}


def envelope(ident: str, chat: p.ChatRequest, body: dict[str, Any], created: int,
             status: str) -> dict[str, Any]:
    """The response object around the output (``output`` empty, ``usage`` None: the
    caller fills them in)."""
    return {
        "id": ident, "object": "response", "created_at": created, "status": status,
        "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "max_output_tokens": chat.max_tokens,
        "model": chat.model, "output": [], "parallel_tool_calls": chat.parallel_tool_calls
        is not False, "previous_response_id": None,
        "reasoning": {"effort": chat.extra.get("reasoning_effort"), "summary": None},
        "store": False, "temperature": chat.temperature, "top_p": chat.top_p,
        "text": {"format": body.get("text", {}).get("format") or {"type": "text"}}
        if isinstance(body.get("text"), dict) else {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
        "truncation": "disabled", "usage": None, "metadata": body.get("metadata") or {},
    }


def output(ident: str, turn: p.Turn) -> list[dict[str, Any]]:
    """The output items of a finished job: its reasoning, its text, its calls."""
    tail = ident.removeprefix("resp_")
    items: list[dict[str, Any]] = []
    if turn.reasoning:
        items.append(reasoning_item(f"rs_{tail}_0", turn.reasoning))
    if turn.content or not turn.calls:
        items.append(message_item(f"msg_{tail}_{len(items)}", turn.content or ""))
    for call in turn.calls:
        items.append(call_item(f"fc_{tail}_{len(items)}", {
            "id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"]}))
    return items


def finish(answer: dict[str, Any], turn: p.Turn) -> dict[str, Any]:
    """Fill in a finished job's status, incomplete details and usage."""
    if turn.finish == "length":
        answer["status"] = "incomplete"
        answer["incomplete_details"] = {"reason": "max_output_tokens"}
    else:
        answer["status"] = "completed"
    answer["usage"] = usage(turn)
    return answer
