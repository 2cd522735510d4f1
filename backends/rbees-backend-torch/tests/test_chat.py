"""The torch backend renders chats with rbees' own renderer, as transformers would."""

from __future__ import annotations

import json
from typing import Any

from rbees_backend_torch.model import chat_template

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]"
    "{% endfor %}{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}")


def tokenizer(template: Any) -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2},
                                                    unk_token="<unk>")),
        bos_token="<s>", eos_token="</s>", chat_template=template)


def test_render_matches_apply_chat_template_with_tools() -> None:
    tok = tokenizer(TEMPLATE)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    wire = [{"role": "user", "content": "héllo"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "1", "type": "function",
                 "function": {"name": "f", "arguments": json.dumps({"x": "ü"})}}]}]
    hf = [wire[0], {"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": "ü"}}}]}]
    chat = chat_template(tok, "m.gguf")
    assert chat is not None
    assert chat.render(wire, tools=tools) == tok.apply_chat_template(
        hf, tools=tools, tokenize=False, add_generation_prompt=True)


def test_no_template_is_none() -> None:
    assert chat_template(tokenizer(None), "m.gguf") is None
