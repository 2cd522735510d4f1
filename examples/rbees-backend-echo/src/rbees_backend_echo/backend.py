"""The echo backend: generates the prompt back, one byte per token, then ends.

The tokenizer maps each byte of the UTF-8 text to one token (0..255), so multi-byte
characters span several tokens and the worker has to reassemble them. Token 256 ends
generation. Sampling settings are accepted and ignored: echoing is deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs

from rbees_core.backend import Backend, Feed, LoadedModel, MemoryKind, SamplingParams
from rbees_core.errors import ModelLoadError, RbeesError

#: The end-of-generation token; every other token is one byte.
EOG = 256
#: Context per slot when the worker does not ask for one; echoing costs no memory.
DEFAULT_CTX = 1 << 18


@attrs.define
class _Slot:
    prompt: bytearray = attrs.field(factory=bytearray)
    prefilled: bool = False
    cursor: int = 0
    ready: bool = False


class EchoModel(LoadedModel):
    """A "model" that answers each prompt with the prompt itself."""

    memory_kind: MemoryKind = "ram"

    def __init__(self, *, slots: int, ctx: int) -> None:
        self.n_ctx_slot = ctx
        self.memory_bytes = 0
        self.n_batch = max(256, slots)
        self._slots: dict[int, _Slot] = {}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """``role: content`` lines; tools and template variables change nothing."""
        return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)

    def token_bytes(self, token: int) -> bytes:
        return bytes((token,)) if 0 <= token < EOG else b""

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def begin(self, slot: int, params: SamplingParams) -> None:
        self._slots[slot] = _Slot()

    def decode(self, feeds: Sequence[Feed]) -> None:
        for feed in feeds:
            state = self._slot(feed.slot)
            # Tokens fed after the first sample are our own output coming back: not prompt.
            if not state.prefilled:
                state.prompt.extend(feed.tokens)
                state.prefilled = feed.logits
            state.ready = state.ready or feed.logits

    def sample(self, slot: int) -> int:
        state = self._slot(slot)
        if not state.ready:
            raise RbeesError(f"slot {slot} was sampled before its prompt was decoded")
        if state.cursor < len(state.prompt):
            state.cursor += 1
            return state.prompt[state.cursor - 1]
        return EOG

    def end(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def _slot(self, slot: int) -> _Slot:
        try:
            return self._slots[slot]
        except KeyError:
            raise RbeesError(f"slot {slot} was not begun") from None


class EchoBackend(Backend):
    """Loads any existing file as an :class:`EchoModel`; its content is not read."""

    name: ClassVar[str] = "echo"
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    batched: ClassVar[bool] = True

    def load(
        self,
        path: str,
        *,
        device: str,
        slots: int,
        ctx: int | None,
        threads: int | None,
        progress: Callable[[str, float], None],
    ) -> EchoModel:
        if not os.path.exists(path):
            raise ModelLoadError(f"model file {path!r} does not exist", details={"path": path})
        progress("load", 0.5)
        model = EchoModel(slots=slots, ctx=ctx or DEFAULT_CTX)
        progress("load", 1.0)
        return model
