"""Tool calling: OpenAI's ``tools`` / ``tool_choice`` as a prompt, a grammar and a parser.

rbees-orcd checks the request's shapes with :func:`check_tools`, :func:`check_tool_choice`
and :func:`check_tool_calls` before a job is queued. The worker then asks :func:`plan` for the
prompt and the grammar of the job, and :func:`parse` for the tool calls in what the model
wrote; it reports them in the job's ``end`` event (``content``, ``tool_calls``).

Formats. A model whose chat template shows the tools (:class:`~rbees_core.chat_template.
TemplateCapabilities`) is prompted by its own template and answers in its family's format:

- ``hermes`` (Hermes, Qwen 2.5/3, ChatML tool templates): ``<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>``, one block per call;
- ``llama3`` (Llama 3.1+): ``{"name": ..., "parameters": {...}}``, optionally after
  ``<|python_tag|>``, calls separated by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]`` (older) or
  ``[TOOL_CALLS]name[ARGS]{...}`` (newer); its templates want 9-character alphanumeric ids.

Any other model (SmolLM2's template shows no tools) gets the ``generic`` format: the tools are
described in the system message and a call is the JSON ``{"tool_calls": [{"name": ...,
"arguments": {...}}]}``; past calls and tool results are written into the chat as text.

``tool_choice`` ``required`` or a named function constrains the answer with a grammar made
from the tools' parameter schemas, so even a small model's arguments validate; ``auto`` leaves
the model free and parses what it wrote; ``none`` prompts without the tools.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from rbees_core.errors import InvalidParamsError
from rbees_core.structured import check_schema

if TYPE_CHECKING:
    from rbees_core.backend import LoadedModel

MAX_TOOLS = 128
#: Most calls one answer may hold under a grammar (``parallel_tool_calls``).
MAX_PARALLEL_CALLS = 4
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ID_CHARS = string.ascii_letters + string.digits
ANY_OBJECT = {"type": "object"}


def new_call_id() -> str:
    """A tool call id: 9 letters and digits, the form Mistral's templates require (and any
    other template accepts)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


# -- request checks (rbees-orcd and the worker) -----------------------------------------------


def check_tools(tools: Any, *, field: str = "tools") -> list[str]:
    """The function names of OpenAI ``tools`` after checking their shape: a list of
    ``{"type": "function", "function": {"name", "description"?, "parameters"?}}`` with
    unique names and parameters shaped like a JSON schema. Raises
    :class:`InvalidParamsError` naming the field."""
    if not isinstance(tools, list) or not tools:
        raise InvalidParamsError(field, "must be a non-empty array of tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidParamsError(field, f"must hold at most {MAX_TOOLS} tools")
    names: list[str] = []
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise InvalidParamsError(where, 'must be {"type": "function", "function": {...}}')
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidParamsError(f"{where}.function", "must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidParamsError(f"{where}.function.name",
                                     "must be 1-64 letters, digits, _ . or -")
        if name in names:
            raise InvalidParamsError(f"{where}.function.name", f"{name!r} is given twice")
        if "parameters" in function:
            check_schema(function["parameters"], field=f"{where}.function.parameters")
        names.append(name)
    return names


def check_tool_choice(choice: Any, names: Sequence[str], *, field: str = "tool_choice"
                      ) -> tuple[str, str | None]:
    """``(mode, name)`` of a ``tool_choice``: mode ``auto`` (the default), ``none``,
    ``required`` or ``named`` (then ``name`` is the function). Raises
    :class:`InvalidParamsError` for another value or a function not among ``names``."""
    if choice is None:
        return ("auto" if names else "none"), None
    if choice in ("auto", "none", "required"):
        if choice != "none" and not names:
            raise InvalidParamsError(field, f"{choice!r} needs tools")
        return str(choice), None
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or name not in names:
            raise InvalidParamsError(f"{field}.function.name",
                                     f"must name one of the tools ({', '.join(names)})")
        return "named", name
    raise InvalidParamsError(field, 'must be "auto", "none", "required" or '
                             '{"type": "function", "function": {"name": ...}}')


def check_tool_calls(calls: Any, *, field: str) -> None:
    """Check an assistant message's ``tool_calls``: ``[{id, type: "function", function:
    {name, arguments}}]``, ``arguments`` a JSON string (or an object). Raises
    :class:`InvalidParamsError`."""
    if not isinstance(calls, list):
        raise InvalidParamsError(field, "must be an array")
    for i, call in enumerate(calls):
        where = f"{field}[{i}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidParamsError(where, "must be {id, type, function: {name, arguments}}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                json.loads(arguments or "{}")
            except ValueError as exc:
                raise InvalidParamsError(f"{where}.function.arguments",
                                         "must be a JSON string") from exc
        elif not isinstance(arguments, Mapping):
            raise InvalidParamsError(f"{where}.function.arguments", "must be a JSON string")


# -- prompting ------------------------------------------------------------------------------


@attrs.frozen
class ToolPlan:
    """How one job with tools is run: its prompt text, its grammar (None: unconstrained)."""

    prompt: str
    grammar: str | None
    format: str


def tool_format(model: LoadedModel) -> str:
    """``hermes``, ``llama3``, ``mistral`` (the model's template shows tools and is of that
    family) or ``generic``."""
    template = model.chat_template
    if template is None or not template.capabilities.tools:
        return "generic"
    source = (template.tool_source or "") + template.source
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return "hermes"


def plan(model: LoadedModel, messages: Sequence[Mapping[str, Any]],
         tools: Sequence[Mapping[str, Any]], choice: Any, parallel: bool = True, *,
         variables: Mapping[str, Any] | None = None) -> ToolPlan:
    """The prompt and grammar of a chat job with ``tools`` and ``tool_choice`` ``choice``;
    ``variables`` go to the template's render (``enable_thinking``...).

    Called by the worker once per such job. The grammar is compiled by ``model`` (only when
    it :attr:`~rbees_core.backend.LoadedModel.supports_grammar`; otherwise the answer is
    parsed unconstrained). Raises :class:`InvalidParamsError` for bad tools or choice, or
    when the template refuses the chat."""
    names = check_tools(list(tools))
    mode, name = check_tool_choice(choice, names)
    extra = dict(variables or {})
    fmt = tool_format(model)
    template = model.chat_template
    if mode == "none":
        return ToolPlan(model.render_chat(_as_text_history(messages), **extra), None, fmt)
    if fmt == "generic":
        chat = _generic_system(_as_text_history(messages), tools, mode, name)
        prompt = model.render_chat(chat, **extra)
    else:
        shows_calls = template is not None and template.capabilities.tool_calls
        chat = [dict(m) for m in messages] if shows_calls else _as_text_history(messages)
        if fmt == "mistral":
            chat = _nine_character_ids(chat)
        prompt = model.render_chat(chat, tools=tools, **extra)
    grammar = None
    if mode in ("required", "named") and model.supports_grammar:
        chosen = [t for t in tools if t["function"]["name"] == name] if name else list(tools)
        grammar = _grammar(model, fmt, chosen, parallel and mode == "required")
    return ToolPlan(prompt, grammar, fmt)


def _nine_character_ids(chat: list[Any]) -> list[dict[str, Any]]:
    """``chat`` with every tool call id that is not 9 letters and digits (OpenAI's
    ``call_...``, another server's) replaced by 9 hex digits of its hash, the same in the
    call and in the tool message that answers it: Mistral's templates refuse other ids."""

    def fix(ident: Any) -> Any:
        text = str(ident)
        if len(text) == 9 and text.isascii() and text.isalnum():
            return ident
        return hashlib.sha256(text.encode()).hexdigest()[:9]

    out = []
    for m in chat:
        msg = dict(m)
        if msg.get("tool_calls"):
            msg["tool_calls"] = [{**c, "id": fix(c.get("id", ""))} for c in msg["tool_calls"]]
        if msg.get("role") == "tool" and "tool_call_id" in msg:
            msg["tool_call_id"] = fix(msg["tool_call_id"])
        out.append(msg)
    return out


def _function_list(tools: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(json.dumps({"name": t["function"]["name"],
                                 "description": t["function"].get("description", ""),
                                 "parameters": t["function"].get("parameters", ANY_OBJECT)},
                                ensure_ascii=False) for t in tools)


def _generic_system(chat: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]], mode: str,
                    name: str | None) -> list[dict[str, Any]]:
    how = {"auto": "Otherwise answer the user in plain text.",
           "required": "You must call at least one tool now.",
           "named": f"You must call the tool {name} now."}[mode]
    text = ("You can call these tools (functions), each given with a JSON schema of its "
            f"arguments:\n{_function_list(tools)}\n\nTo call tools, answer with JSON only, in "
            'this form: {"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
            f"\n{how} A tool's result comes back in a message that starts with "
            '"Tool result".')
    if chat and chat[0].get("role") == "system":
        first = dict(chat[0])
        first["content"] = f"{first.get('content') or ''}\n\n{text}".strip()
        return [first, *chat[1:]]
    return [{"role": "system", "content": text}, *chat]


def _as_text_history(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with past tool calls and tool results written as text, for templates
    that show neither (an assistant turn of content null and tool_calls fails in them)."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for m in messages:
        msg = {k: v for k, v in m.items() if v is not None}
        calls = msg.pop("tool_calls", None)
        if msg.get("role") == "assistant" and calls:
            listed = []
            for call in calls:
                function = call.get("function", {})
                names[str(call.get("id"))] = str(function.get("name"))
                arguments = function.get("arguments", "{}")
                listed.append({"name": function.get("name"), "arguments": json.loads(
                    arguments or "{}") if isinstance(arguments, str) else arguments})
            text = json.dumps({"tool_calls": listed}, ensure_ascii=False)
            msg["content"] = f"{msg.get('content') or ''}\n{text}".strip()
        elif msg.get("role") == "tool":
            call_id = str(msg.pop("tool_call_id", ""))
            label = msg.pop("name", None) or names.get(call_id, "")
            msg = {"role": "user", "content": f"Tool result ({label}, call {call_id}):\n"
                   f"{_text(msg.get('content'))}"}
        msg.setdefault("content", "")
        out.append(msg)
    return out


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


# -- grammar --------------------------------------------------------------------------------


def _call_schema(tool: Mapping[str, Any], arguments_key: str = "arguments") -> dict[str, Any]:
    function = tool["function"]
    return {"type": "object", "properties": {
        "name": {"const": function["name"]},
        arguments_key: function.get("parameters") or ANY_OBJECT},
        "required": ["name", arguments_key], "additionalProperties": False}


def _one_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def calls_schema(tools: Sequence[Mapping[str, Any]], fmt: str, parallel: bool
                 ) -> dict[str, Any]:
    """The JSON schema of an answer that calls one of ``tools`` (several when ``parallel``),
    in format ``fmt``; ``hermes`` is the schema of one ``<tool_call>`` block's JSON."""
    most = MAX_PARALLEL_CALLS if parallel else 1
    if fmt == "llama3":
        return _one_of([_call_schema(t, "parameters") for t in tools])
    one = _one_of([_call_schema(t) for t in tools])
    if fmt == "hermes":
        return one
    calls = {"type": "array", "items": one, "minItems": 1, "maxItems": most}
    if fmt == "mistral":
        return calls
    return {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
            "additionalProperties": False}


def _grammar(model: LoadedModel, fmt: str, tools: Sequence[Mapping[str, Any]],
             parallel: bool) -> str:
    schema = calls_schema(tools, fmt, parallel)
    gbnf = model.compile_grammar(json_schema=schema)
    if fmt != "hermes":
        return gbnf
    # one <tool_call> block per call, the JSON rule renamed from root
    renamed = re.sub(r"^root ::=", "rbees-call ::=", gbnf, flags=re.M)
    block = r'"<tool_call>\n" rbees-call "\n</tool_call>"'
    more = f' ("\\n" {block}){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    return model.compile_grammar(grammar=f"root ::= {block}{more}\n{renamed}")


# -- parsing --------------------------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MISTRAL_ARGS = re.compile(r"([A-Za-z0-9_.-]+)\[ARGS\]")


def parse(text: str, names: Sequence[str]) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of what a model wrote: the calls in any of the formats of
    this module, in OpenAI's form (``id``, ``type``, ``function.name``, ``function.arguments``
    as a JSON string); ``content`` the text around them (None when there is none). Text
    that is no call of a function among ``names`` is all content, no calls."""
    found: list[tuple[str, Any]] = []
    rest = text
    if "<tool_call>" in text:
        for match in _HERMES.finditer(text):
            found += _calls_in(match.group(1))
        rest = _HERMES.sub("", text)
    else:
        body = text.strip()
        for prefix in ("<|python_tag|>", "[TOOL_CALLS]"):
            body = body.removeprefix(prefix).lstrip()
        found = _mistral_args(body) if _MISTRAL_ARGS.match(body) else _calls_in(body)
        if found:
            rest = ""
    if not found or any(name not in names for name, _ in found):
        return text, []
    calls = [{"id": new_call_id(), "type": "function", "function": {
        "name": name, "arguments": arguments if isinstance(arguments, str)
        else json.dumps(arguments, ensure_ascii=False)}} for name, arguments in found]
    return (rest.strip() or None), calls


def _calls_in(text: str) -> list[tuple[str, Any]]:
    """(name, arguments) of every call in JSON text: one object or several (separated by
    ``;``, ``,`` or whitespace), a list of them, or ``{"tool_calls": [...]}``."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    text = text.strip()
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return []
        values.append(value)
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
    out: list[tuple[str, Any]] = []
    for value in values:
        items = value.get("tool_calls") if isinstance(value, dict) and "tool_calls" in value \
            else value
        for item in items if isinstance(items, list) else [items]:
            call = _call(item)
            if call is None:
                return []
            out.append(call)
    return out


def _call(item: Any) -> tuple[str, Any] | None:
    if not isinstance(item, dict):
        return None
    inner = item.get("function")
    function: dict[str, Any] = inner if isinstance(inner, dict) else item
    name = function.get("name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if not isinstance(name, str) or not isinstance(arguments, dict | str):
        return None
    return name, arguments


def _mistral_args(body: str) -> list[tuple[str, Any]]:
    """``name[ARGS]{...}`` calls, one after the other (``[TOOL_CALLS]`` between them)."""
    decoder = json.JSONDecoder()
    out: list[tuple[str, Any]] = []
    at = 0
    while at < len(body):
        match = _MISTRAL_ARGS.match(body, at)
        if match is None:
            return []
        try:
            arguments, at = decoder.raw_decode(body, match.end())
        except ValueError:
            return []
        out.append((match.group(1), arguments))
        rest = body[at:].lstrip()
        at = len(body) - len(rest.removeprefix("[TOOL_CALLS]").lstrip())
    return out


def collecting_sink(sink: Callable[[str, dict[str, Any]], None], names: Sequence[str]
                    ) -> Callable[[str, dict[str, Any]], None]:
    """``sink`` (the worker's event sink of one job) that also gathers the job's text and
    adds what :func:`parse` finds in it to the ``end`` event: ``content`` and, when the
    model called tools, ``tool_calls``. Runs on the decode thread, like ``sink``."""
    pieces: list[str] = []

    def collect(event: str, data: dict[str, Any]) -> None:
        if event == "token":
            pieces.append(str(data.get("t", "")))
        elif event == "end":
            content, calls = parse("".join(pieces), names)
            data = {**data, "content": content}
            if calls:
                data["tool_calls"] = calls
        sink(event, data)

    return collect


_CALL_START = re.compile(r"[A-Za-z0-9_.-]+\[")  # Mistral's name[ARGS]
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.-]+")


class LiveText:
    """What of a streamed job with tools may go to the client as content before the job ends.

    rbees-orcd feeds it each token's text; an answer that begins like a call (``{``, ``[``,
    ``<``, ``name[``) is held back whole, as is any text from a ``<`` on (a ``<tool_call>``
    may follow): the worker's parse at the end decides. Plain answers stream as they come.
    """

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.live: bool | None = None  # None: too early to tell

    def feed(self, piece: str) -> str:
        """The text to send now (possibly empty) after ``piece``."""
        self.text += piece
        if self.live is None:
            head = self.text.lstrip()
            if not head or _IDENTIFIER.fullmatch(head):
                return ""  # nothing yet, or a lone word that may be name[ARGS]
            self.live = not (head[0] in "{[<" or _CALL_START.match(head))
        if not self.live:
            return ""
        cut = self.text.find("<", self.sent)
        end = len(self.text) if cut < 0 else cut
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def rest(self, content: str | None, calls: bool) -> str | None:
        """The content still to send once the job ended with ``content`` (the worker's
        parse) and ``calls`` or not."""
        if not self.sent:
            return content
        if not calls:
            return self.text[self.sent:] or None
        said = self.text[:self.sent].lstrip()
        if content and content.startswith(said):
            return content[len(said):] or None
        return None
