"""What rbees-workerd makes of a job's request before decoding: the prompt of a chat, the
grammar of structured output or tool calling, and the sinks that turn the model's text into
tool calls (:mod:`rbees_core.tools`) and reasoning (:mod:`rbees_core.reasoning`); and the
chat template that ``--chat-template-file`` puts in place of the model's own.

Called by :func:`rbees_core.programs.workerd.execute` once per job, on the event loop, before
the job is queued: every error here is a 400 the client sees at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from rbees_core import reasoning, tools
from rbees_core.api.worker import ExecuteRequest
from rbees_core.backend import LoadedModel
from rbees_core.errors import InvalidParamsError

Sink = Callable[[str, dict[str, Any]], None]


def grammar(backend: str, model: LoadedModel, req: ExecuteRequest) -> str | None:
    """The GBNF grammar of a job that asks for structured output (None for one that does
    not). Raises InvalidParamsError (a 400) for a backend without grammar support, naming
    the one that has it, and for a schema or grammar the backend cannot use."""
    if req.json_schema is None and req.grammar is None:
        return None
    field = "grammar" if req.grammar is not None else "json_schema"
    if not model.supports_grammar:
        raise InvalidParamsError(
            field, f"the {backend} backend cannot constrain output to a JSON "
            "schema or grammar; run the model on the llamacpp backend for structured output")
    return model.compile_grammar(json_schema=req.json_schema, grammar=req.grammar)


def chat(model: LoadedModel, req: ExecuteRequest, constraint: str | None, sink: Sink
         ) -> tuple[str, str | None, Sink]:
    """``(prompt, grammar, sink)`` of a chat job (``req.messages``): the messages rendered
    with the model's template and the job's template variables (``chat_template_kwargs``,
    ``reasoning_effort``); with tools, the prompt and grammar of :func:`rbees_core.tools.plan`
    and a sink that adds the parsed calls to the ``end`` event; for a thinking template
    (:func:`rbees_core.reasoning.thinks`), a sink that splits the reasoning off each token
    event, outermost so that tool calls are parsed from the content alone. ``constraint``
    is the job's structured-output grammar. Raises InvalidParamsError (a 400)."""
    assert req.messages is not None
    messages = [{k: v for k, v in attrs.asdict(m).items() if v is not None}
                for m in req.messages]
    variables = reasoning.template_variables(req.chat_template_kwargs, req.reasoning_effort)
    if req.tools:  # the prompt and grammar of tool calling; the calls come in "end"
        plan = tools.plan(model, messages, req.tools, req.tool_choice,
                          req.parallel_tool_calls, variables=variables)
        text, constraint = plan.prompt, plan.grammar
        if req.tool_choice != "none":
            sink = tools.collecting_sink(sink, tools.check_tools(req.tools))
    else:
        text = model.render_chat(messages, **variables)
    if reasoning.thinks(model.chat_template):
        # under a grammar that cannot write </think> (JSON, tool calls) the output is the
        # constrained answer, never reasoning
        free = constraint is None or reasoning.CLOSE in constraint
        sink = reasoning.splitting_sink(sink, started=free and reasoning.opens_reasoning(text))
    return text, constraint, sink


def read_template(path: str | None) -> str | None:
    """The text of the ``--chat-template-file`` (``[worker] chat_template_file``), None
    without one. Raises InvalidParamsError naming the flag when it cannot be read."""
    if not path:
        return None
    where = Path(path).expanduser()
    try:
        return where.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParamsError("--chat-template-file",
                                 f"cannot read {str(where)!r}: {exc}") from exc


def override_template(model: LoadedModel, source: str, name: str) -> None:
    """Give ``model`` the chat template ``source`` (--chat-template-file) in place of its
    own, with the special tokens its own template had (BOS, EOS). Called once, after the
    model loaded; a template that does not compile is a 400 on every chat job, as a
    model's own would be."""
    from rbees_core.chat_template import ChatTemplate

    own = model.chat_template
    model.chat_template = ChatTemplate(
        source, model=f"{name} (--chat-template-file)",
        special_tokens=own.special_tokens if own is not None else None)


__all__ = ["chat", "grammar", "override_template", "read_template"]
