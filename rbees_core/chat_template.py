"""Chat templates: render OpenAI-shaped chats with the model's own Jinja template.

Every backend renders chats here, the way transformers' ``apply_chat_template`` and
llama.cpp's ``--jinja`` do: the template string the model ships (a GGUF's
``tokenizer.chat_template``, a tokenizer's ``chat_template``) runs in a sandboxed Jinja2
environment with the globals templates expect (``bos_token``, ``eos_token``,
``add_generation_prompt``, ``tools``, ``raise_exception``, ``strftime_now``, a ``tojson`` that
keeps non-ASCII text). For the same inputs the text is byte for byte what transformers
renders (``tests/test_chat_template.py`` checks it on the templates of several families).

Backends build one :class:`ChatTemplate` when they load a model (compiling is cached by
template text) and call :meth:`ChatTemplate.render` once per request from their
:meth:`rbees_core.backend.LoadedModel.render_chat`.

What the renderer does to OpenAI messages before the template sees them, as transformers
or llama.cpp would:

- keys whose value is None are dropped (``content: null`` on an assistant message that
  carries ``tool_calls``): templates test for a missing key, not for None; a template that
  then fails (it reads every content as a string: Qwen3) gets ``""`` there instead;
- ``tool_calls[].function.arguments``, a JSON string on the wire, becomes the object it
  encodes (templates such as Qwen's or Llama 3.1's write it with ``tojson``); a string that
  is not JSON stays a string;
- ``content`` given as a list of parts: passed as it is to a template that reads parts
  (Gemma 3, Llama 3.2 vision...), else the text parts joined with newlines (llama.cpp);
- ``reasoning_content`` (or ``thinking``/``reasoning``) of a past assistant turn is given
  under both ``reasoning_content`` and ``thinking``, the names templates read (transformers 5).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import attrs
import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rbees_core.errors import InvalidParamsError

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_PROBE = "RbeesProbe4f1c"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own filter escapes HTML and sorts keys; templates expect json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` for templates, without the class itself (and its attributes) in reach."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so no template reaches internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no self: Jinja's own signature trick
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template cannot store {name!r} on a namespace")


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template of ``source``, cached: models sharing a template share it.

    Raises :class:`jinja2.TemplateSyntaxError` (callers turn it into a 400).
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """JSON-shaped copy of ``value``: what the sandbox sees has no methods worth calling."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _arguments(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _tool_calls(calls: Any) -> Any:
    if not isinstance(calls, list):
        return calls
    out = []
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict) \
                and "arguments" in call["function"]:
            function = dict(call["function"])
            function["arguments"] = _arguments(function["arguments"])
            call = {**call, "function": function}
        out.append(call)
    return out


@attrs.frozen
class TemplateCapabilities:
    """What a template does with what it is given, found by rendering probes (as
    llama.cpp's minja does), for the code that chooses how to prompt a model: tool calling
    falls back to a generic format when a template shows no tools.
    """

    #: shows the ``tools`` offered
    tools: bool
    #: shows the ``tool_calls`` of a past assistant turn (their arguments included)
    tool_calls: bool
    #: accepts a ``system`` message and shows it
    system: bool
    #: reads ``content`` given as a list of parts
    parts: bool


class ChatTemplate:
    """One model's chat template, compiled once, rendered once per request.

    ``source`` is the template text; ``tool_source`` an optional second template used when
    the request has tools (a tokenizer's ``tool_use`` template, a GGUF's
    ``tokenizer.chat_template.tool_use``). ``special_tokens`` are the template variables
    naming the model's special tokens (at least ``bos_token`` and ``eos_token`` when the
    model has them; a tokenizer's whole ``special_tokens_map``). ``model`` names the model
    in error messages.

    A template that does not compile does not stop the model from loading: every
    :meth:`render` then raises the 400 that says why.
    """

    def __init__(self, source: str, *, model: str, tool_source: str | None = None,
                 special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.tool_source = tool_source
        self.model = model
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._typed: dict[str, bool] = {}
        self._capabilities: TemplateCapabilities | None = None

    def _compiled(self, source: str) -> jinja2.Template:
        try:
            return compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidParamsError(
                "messages", f"the chat template of {self.model} does not compile "
                f"(line {exc.lineno}: {exc.message})") from exc

    def _probe(self, source: str, messages: list[dict[str, Any]],
               tools: list[dict[str, Any]] | None = None) -> str:
        """The raw render of a probe chat ('' when the template fails on it)."""
        try:
            return str(self._compiled(source).render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=True,
                **self.special_tokens))
        except Exception:
            return ""

    def _takes_parts(self, source: str) -> bool:
        """Whether the template reads ``content`` as a list of parts (found by rendering a
        probe once, as llama.cpp does), so that a list is passed as it is."""
        typed = self._typed.get(source)
        if typed is None:
            out = self._probe(source, [
                {"role": "user", "content": [{"type": "text", "text": _PROBE}]}])
            typed = self._typed[source] = (
                _PROBE in out and "'type'" not in out and '"type"' not in out)
        return typed

    @property
    def capabilities(self) -> TemplateCapabilities:
        """What this template shows (:class:`TemplateCapabilities`), probed once."""
        if self._capabilities is None:
            tool = {"type": "function", "function": {
                "name": f"{_PROBE}_tool", "description": "a probe",
                "parameters": {"type": "object", "properties": {"k": {"type": "string"}}}}}
            call = {"id": "call00001", "type": "function", "function": {  # Mistral: 9 chars
                "name": f"{_PROBE}_tool", "arguments": {"k": f"{_PROBE}_arg"}}}
            with_tools = self.tool_source or self.source
            user = {"role": "user", "content": "hello"}
            shown_calls = any(
                f"{_PROBE}_arg" in self._probe(with_tools, [
                    user, {"role": "assistant", **content, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call00001", "content": "ok"}], [tool])
                for content in ({}, {"content": ""}))
            self._capabilities = TemplateCapabilities(
                tools=f"{_PROBE}_tool" in self._probe(with_tools, [user], [tool]),
                tool_calls=shown_calls,
                system=_PROBE in self._probe(self.source, [
                    {"role": "system", "content": _PROBE}, user]),
                parts=self._takes_parts(self.source))
        return self._capabilities

    def _message(self, index: int, message: Mapping[str, Any], typed_parts: bool
                 ) -> dict[str, Any]:
        msg = {k: v for k, v in _plain(message).items() if v is not None}
        content = msg.get("content")
        if isinstance(content, list) and not typed_parts:
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise InvalidParamsError(
                        "messages", f"message {index} has a {kind or 'malformed'} content "
                        f"part; {self.model} takes text parts only")
                texts.append(part["text"])
            msg["content"] = "\n".join(texts)
        if "tool_calls" in msg:
            msg["tool_calls"] = _tool_calls(msg["tool_calls"])
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        return msg

    def render(self, messages: Sequence[Mapping[str, Any]], *,
               tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text of ``messages`` (OpenAI chat messages) and ``tools`` (OpenAI tool
        objects); ``kwargs`` are further template variables (``enable_thinking``...), and
        win over the special tokens of the same name.

        Called by the backends' ``render_chat``, once per request. Raises
        :class:`rbees_core.errors.InvalidParamsError` on ``messages`` (a 400 naming the
        model) when the template does not compile, refuses the chat (``raise_exception``)
        or fails while rendering it.
        """
        source = self.tool_source if tools is not None and self.tool_source else self.source
        template = self._compiled(source)
        has_parts = any(isinstance(m.get("content"), list) for m in messages)
        typed = has_parts and self._takes_parts(source)
        chat = [self._message(i, m, typed) for i, m in enumerate(messages)]
        variables = _plain({**self.special_tokens, **kwargs})
        try:
            return self._render(template, chat, tools, add_generation_prompt, variables)
        except InvalidParamsError:
            # A template that reads every turn's content as a string (Qwen3) fails on the
            # assistant turn of tool_calls and content null that OpenAI clients send: as
            # llama.cpp does, give it "" there. Only when the chat as given fails.
            if any(m.get("tool_calls") and "content" not in m for m in chat):
                with contextlib.suppress(InvalidParamsError):
                    return self._render(template, [
                        {**m, "content": ""} if m.get("tool_calls") and "content" not in m
                        else m for m in chat], tools, add_generation_prompt, variables)
            # A template without a system role (Mistral 7B, Gemma) refuses the system
            # message every OpenAI client sends: as llama.cpp does, say it in the first user
            # turn instead. Only when the chat as given fails, so that what transformers
            # renders stays byte for byte the same.
            if self.capabilities.system or not any(m.get("role") == "system" for m in chat):
                raise
            try:
                return self._render(template, _system_in_user_turn(chat), tools,
                                    add_generation_prompt, variables)
            except InvalidParamsError:
                pass
            raise

    def _render(self, template: jinja2.Template, chat: list[dict[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None, add_generation_prompt: bool,
                variables: dict[str, Any]) -> str:
        try:
            return template.render(messages=chat, tools=_plain(tools), documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise InvalidParamsError(
                "messages", f"the chat template of {self.model} refused these messages: "
                f"{exc.message or type(exc).__name__}") from exc
        except Exception as exc:  # a template is code: any error in it is the template's
            raise InvalidParamsError(
                "messages", f"the chat template of {self.model} failed on these messages: "
                f"{type(exc).__name__}: {exc}") from exc


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _system_in_user_turn(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``chat`` with its system messages said at the start of the next user turn, a line
    above what the user said (llama.cpp's polyfill for templates without a system role)."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for message in chat:
        if message.get("role") == "system":
            pending.append(_text_of(message.get("content")))
            continue
        if pending:
            text = "\n".join(pending)
            pending = []
            content = message.get("content")
            if message.get("role") != "user":
                out.append({"role": "user", "content": text})
            elif isinstance(content, list):
                message = {**message, "content": [{"type": "text", "text": text}, *content]}
            else:
                message = {**message, "content": text + ("\n" + content if content else "")}
        out.append(message)
    if pending:
        out.append({"role": "user", "content": "\n".join(pending)})
    return out
