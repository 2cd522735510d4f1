"""An Anthropic Messages request as rbees runs it, and its answer in Anthropic's words.

:func:`chat_request` turns a ``POST /v1/messages`` body into a
:class:`~rbees_core.protocols.ChatRequest`: ``system`` and the messages' content blocks
(``text``, ``tool_use``, ``tool_result``, ``thinking``) become the task's chat turns,
``tools`` / ``tool_choice`` the task's functions, ``thinking`` switches reasoning,
``output_config.format`` a JSON schema. What Anthropic's API has and rbees cannot honour
(images, documents, server tools, MCP servers) is refused with a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from rbees_core import protocols as p
from rbees_core.errors import InvalidParamsError
from rbees_core.protocols import RequestError
from rbees_core.structured import response_format_schema

#: The task's fields as this API names them (a 400 from the task's checks names these).
FIELDS = {"stop": "stop_sequences", "json_schema": "output_config.format",
          "chat_template_kwargs": "thinking", "parallel_tool_calls": "tool_choice"}
#: Anthropic's stop reasons by the neutral finish.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
#: Request fields rbees accepts and ignores (they change nothing on a local cluster).
IGNORED = ("metadata", "service_tier", "inference_geo", "speed", "cache_control",
           "diagnostics", "user_profile_id", "workspace_id")


def _bad(field: str, message: str) -> RequestError:
    return RequestError(400, message, field=field)


def _text_of(content: Any, field: str) -> str:
    """A ``system`` or ``tool_result`` content: a string or an array of text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(field, f"{field} must be a string or an array of text blocks")
    texts = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(
                block.get("text"), str):
            raise _bad(f"{field}[{i}]", "only text blocks are supported here")
        texts.append(block["text"])
    return "\n".join(texts) if field == "system" else "".join(texts)


def _blocks(content: Any, field: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(field, "content must be a string or an array of content blocks")
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(f"{field}[{i}]", "each content block needs a type")
    return content


def _turns(messages: Any) -> list[dict[str, Any]]:
    """The chat turns of Anthropic's ``messages``: a user turn's ``tool_result`` blocks
    become tool turns (before its text), an assistant turn's ``tool_use`` blocks its calls
    and its ``thinking`` blocks its reasoning."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty array")
    turns: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_use id -> the tool's name, for the results
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(f"{where}.role", "each message needs a role of user or assistant")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        thoughts: list[str] = []
        for j, block in enumerate(_blocks(m.get("content"), f"{where}.content")):
            at, kind = f"{where}.content[{j}]", block["type"]
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and m["role"] == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"),
                                                                          str):
                    raise _bad(at, "a tool_use block needs an id and a name")
                if not isinstance(block.get("input", {}), dict):
                    raise _bad(f"{at}.input", "input must be an object")
                names[block["id"]] = block["name"]
                calls.append(p.tool_call(block["id"], block["name"], block.get("input", {})))
            elif kind == "tool_result" and m["role"] == "user":
                call_id = block.get("tool_use_id")
                if not isinstance(call_id, str):
                    raise _bad(f"{at}.tool_use_id", "a tool_result block needs tool_use_id")
                result = _text_of(block.get("content", ""), f"{at}.content")
                if block.get("is_error") is True:
                    result = f"Error: {result}"
                turns.append(p.tool_result(call_id, result, names.get(call_id)))
            elif kind == "thinking" and m["role"] == "assistant":
                if isinstance(block.get("thinking"), str):
                    thoughts.append(block["thinking"])
            elif kind == "redacted_thinking" and m["role"] == "assistant":
                continue  # opaque: nothing a local model could read
            else:
                raise _bad(at, f"a {kind!r} block is not supported in a {m['role']} message "
                           "(text, tool_use, tool_result and thinking are)")
        text = "".join(texts)
        if m["role"] == "assistant":
            if calls:
                p.check_calls(calls, f"{where}.content")
            turns.append(p.message("assistant", text or (None if calls else ""),
                                   tool_calls=calls or None,
                                   reasoning="".join(thoughts) or None))
        elif texts or not any(t.get("role") == "tool" for t in turns[-1:]):
            turns.append(p.message("user", text))
    return turns


def _tools(body: dict[str, Any], chat: p.ChatRequest) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "tools must be an array")
        chat.tools = []
        for i, spec in enumerate(tools):
            if not isinstance(spec, dict) or spec.get("type") not in (None, "custom"):
                kind = spec.get("type") if isinstance(spec, dict) else None
                raise _bad(f"tools[{i}]", f"server tools ({kind!r}) are not supported; only "
                           "custom tools (name, description, input_schema)")
            if not isinstance(spec.get("name"), str):
                raise _bad(f"tools[{i}].name", "each tool needs a name")
            schema = spec.get("input_schema", {"type": "object"})
            if not isinstance(schema, dict):
                raise _bad(f"tools[{i}].input_schema", "input_schema must be an object")
            description = spec.get("description")
            chat.tools.append(p.tool(spec["name"], schema,
                                     description if isinstance(description, str) else None))
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise _bad("tool_choice", 'tool_choice must be {"type": "auto" | "any" | "tool" | '
                   '"none"}')
    if kind != "none" and not chat.tools and kind != "auto":
        raise _bad("tool_choice", "tool_choice needs tools")
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise _bad("tool_choice.name", "a tool choice of type tool needs the tool's name")
        chat.tool_choice = p.named_choice(choice["name"])
    else:
        chat.tool_choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use") is True:
        chat.parallel_tool_calls = False
    if not chat.tools:
        chat.tool_choice = None


def _thinking(body: dict[str, Any], chat: p.ChatRequest) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise _bad("thinking", 'thinking must be {"type": "enabled" | "disabled" | '
                   '"adaptive"}')
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)
                                   or budget < 0):
            raise _bad("thinking.budget_tokens", "budget_tokens must be an integer >= 0")
    chat.think = {"enabled": True, "disabled": False}.get(kind)


def _output(body: dict[str, Any], chat: p.ChatRequest) -> None:
    config = body.get("output_config")
    if config is None:
        return
    if not isinstance(config, dict):
        raise _bad("output_config", "output_config must be an object")
    fmt = config.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _bad("output_config.format", 'format must be {"type": "json_schema", '
                   '"schema": {...}}')
    try:
        chat.json_schema = response_format_schema(
            {"type": "json_schema", "json_schema": {"name": "output", "schema":
                                                    fmt.get("schema")}},
            field="output_config.format")
    except InvalidParamsError as exc:
        raise _bad(exc.field, exc.message) from exc


def chat_request(body: dict[str, Any], *, counting: bool = False) -> p.ChatRequest:
    """The neutral request of a Messages body (``counting``: a count_tokens body, which has
    no ``max_tokens``). Raises :class:`RequestError` (400 naming the field)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "model is required")
    for name in ("mcp_servers", "container"):
        if body.get(name):
            raise _bad(name, f"{name} is not supported")
    for name in ("stream",):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise _bad(name, f"{name} must be true or false")
    chat = p.ChatRequest(model=model)
    system = body.get("system")
    turns = [] if system is None or system == "" else [
        p.message("system", _text_of(system, "system"))]
    chat.messages = turns + _turns(body.get("messages"))
    if counting:
        chat.max_tokens = 1
    else:
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _bad("max_tokens", "max_tokens is required: an integer >= 1")
        chat.max_tokens = max_tokens
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            setattr(chat, key, body[key])
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences", "stop_sequences must be an array of strings")
        chat.stop = [s for s in stops if s] or None
    _tools(body, chat)
    _thinking(body, chat)
    _output(body, chat)
    return chat


def field_name(field: str | None) -> str | None:
    """The request field a task field stands for (a 400 from the task's checks)."""
    return None if field is None else FIELDS.get(field, field)


def stop_sequence(chat: p.ChatRequest, turn: p.Turn) -> tuple[str, str | None]:
    """The answer's ``stop_reason`` and ``stop_sequence``: a stop sequence is named when the
    request gave one only (the worker does not say which one matched)."""
    if turn.finish == "stop" and turn.stop_reason == "stop" and chat.stop:
        return "stop_sequence", chat.stop[0] if len(chat.stop) == 1 else None
    return STOP_REASONS.get(turn.finish or "stop", "end_turn"), None


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """A call (:class:`~rbees_core.protocols.Delta`'s ``call``) as a ``tool_use`` block."""
    try:
        arguments = json.loads(call["arguments"] or "{}")
    except ValueError:
        arguments = {}
    if not isinstance(arguments, dict):
        arguments = {"value": arguments}
    return {"type": "tool_use", "id": call["id"], "name": call["name"], "input": arguments}


def error_type(status: int) -> str:
    """Anthropic's error ``type`` of an HTTP status."""
    return {400: "invalid_request_error", 401: "authentication_error",
            403: "permission_error", 404: "not_found_error", 413: "request_too_large",
            429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}.get(
        status, "api_error" if status >= 499 else "invalid_request_error")


def error_body(status: int, message: str, code: str | None = None,
               field: str | None = None) -> dict[str, Any]:
    """Anthropic's error shape ``{"type": "error", "error": {type, message}}``; the field
    at fault, when known, opens the message."""
    text = f"{field}: {message}" if field and not message.startswith(field) else message
    return {"type": "error", "error": {"type": error_type(status), "message": text}}


def render(error: RequestError) -> dict[str, Any]:
    """A :class:`RequestError` in Anthropic's shape (the task's field names mapped back)."""
    return error_body(error.status, error.message, error.code, field_name(error.field))
