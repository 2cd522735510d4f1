"""A transformers causal LM on one torch device; every slot owns its KV cache and sampler.

Imported only when a model is loaded: importing this module imports torch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from rbees_backend_torch.tokens import TokenBytes
from rbees_core.backend import Feed, LoadedModel, MemoryKind, SamplingParams
from rbees_core.chat_template import ChatTemplate
from rbees_core.errors import InvalidParamsError, ModelLoadError, RbeesError

DEFAULT_CTX_CAP = 4096
N_BATCH = 256
#: Generated tokens the presence and frequency penalties look back on (llama.cpp's default).
PENALTY_WINDOW = 64
_MEMORY_KIND: dict[str, MemoryKind] = {"cpu": "ram", "cuda": "vram", "mps": "unified"}


def locate(path: str) -> tuple[str, dict[str, str]]:
    """The folder and ``from_pretrained`` arguments for a GGUF file or a safetensors folder."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), {"gguf_file": p.name}
    folder = p.parent if p.is_file() and p.suffix == ".safetensors" else p
    if folder.is_dir() and (folder / "config.json").is_file() and any(
            folder.glob("*.safetensors")):
        return str(folder), {}
    raise ModelLoadError(
        f"{path!r} is neither a GGUF file nor a folder with config.json and *.safetensors",
        details={"path": path})


def _dtype(kind: str) -> torch.dtype:
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.float32


def _dtype_arg() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, int)}
    return set()


def chat_template(tokenizer: Any, model: str) -> ChatTemplate | None:
    """The tokenizer's chat template (a ``tool_use`` one too when it has named templates)
    with its special tokens, rendered by rbees' own renderer as by llama.cpp's backend."""
    source: Any = getattr(tokenizer, "chat_template", None)
    tool_source: str | None = None
    if isinstance(source, dict):
        named: dict[str, str] = source
        source, tool_source = named.get("default"), named.get("tool_use")
    if not source:
        return None
    special = {k: v for k, v in dict(tokenizer.special_tokens_map).items() if isinstance(v, str)}
    return ChatTemplate(str(source), model=model, tool_source=tool_source,
                        special_tokens=special)


@attrs.define(eq=False)
class _Slot:
    params: SamplingParams = attrs.field(factory=SamplingParams)
    generator: torch.Generator | None = None
    cache: Any = None
    logits: torch.Tensor | None = None
    history: list[int] = attrs.field(factory=list)
    #: the tokens sampled so far (the window of presence and frequency penalties)
    generated: list[int] = attrs.field(factory=list)
    #: the logits the last token was sampled from, for logprobs
    sampled_from: torch.Tensor | None = None


class TorchModel(LoadedModel):
    def __init__(self, path: str, *, device: str, slots: int, ctx: int | None,
                 threads: int | None, progress: Callable[[str, float], None]) -> None:
        folder, where = locate(path)
        kind = device.partition(":")[0]
        if threads:
            torch.set_num_threads(threads)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        progress("tokenizer", 0.0)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **where)
            progress("weights", 0.1)
            model: Any = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, **where, **{_dtype_arg(): _dtype(kind)})
            progress("device", 0.8)
            model = model.to(device).eval()
        except Exception as exc:  # whatever transformers raises, the client sees one code
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelLoadError(f"transformers could not load {path!r}: {first}",
                                 details={"path": path}) from exc
        self._model = model
        self._tokenizer = tokenizer
        self._device = torch.device(device)
        self._token_bytes = TokenBytes(tokenizer)
        forward = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._keep_arg = next(
            (a for a in ("logits_to_keep", "num_logits_to_keep") if a in forward), None)
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_pos = getattr(text, "max_position_embeddings", None) or DEFAULT_CTX_CAP
        self.n_ctx_slot = min(int(n_pos), ctx or DEFAULT_CTX_CAP)
        self.n_batch = N_BATCH
        self.memory_kind = _MEMORY_KIND[kind]
        self.memory_bytes = self._weights_bytes() + self._kv_bytes(text) * self.n_ctx_slot * slots
        self._eog = _ids(tokenizer.eos_token_id) | _ids(getattr(config, "eos_token_id", None))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            self._eog |= _ids(generation.eos_token_id)
        self._slots = [_Slot() for _ in range(slots)]
        self.n_vocab = int(getattr(text, "vocab_size", 0) or len(tokenizer))
        self.chat_template = chat_template(tokenizer, Path(path).name)
        progress("device", 1.0)

    def _weights_bytes(self) -> int:
        tensors = [*self._model.parameters(), *self._model.buffers()]
        return sum(int(t.numel()) * int(t.element_size()) for t in tensors)

    def _kv_bytes(self, text: Any) -> int:
        """Bytes of K and V for one token of context."""
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = getattr(text, "head_dim", None) or int(
            getattr(text, "hidden_size", 0)) // heads
        layers = int(getattr(text, "num_hidden_layers", 0))
        element = torch.finfo(next(self._model.parameters()).dtype).bits // 8
        return 2 * layers * kv_heads * int(head_dim) * element

    # -- text -----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        tokens = [int(t) for t in self._tokenizer.encode(text, add_special_tokens=True)]
        bos = self._tokenizer.bos_token_id
        if bos is not None and len(tokens) > 1 and tokens[0] == tokens[1] == bos:
            del tokens[0]  # the text began with BOS (a chat template writes it): keep one
        return tokens

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self.chat_template is None:
            raise InvalidParamsError("messages",
                                     "this model has no chat template; send a prompt instead")
        return self.chat_template.render(messages, tools=tools,
                                 add_generation_prompt=add_generation_prompt, **kwargs)

    def token_bytes(self, token: int) -> bytes:
        return self._token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    # -- sequences ------------------------------------------------------------------------

    def begin(self, slot: int, params: SamplingParams) -> None:
        generator = torch.Generator()
        generator.manual_seed(params.seed)
        self._slots[slot] = _Slot(params=params, generator=generator)

    def decode(self, feeds: Sequence[Feed]) -> None:
        with torch.inference_mode():
            for feed in feeds:
                state = self._slots[feed.slot]
                ids = torch.tensor([list(feed.tokens)], dtype=torch.long, device=self._device)
                kwargs: dict[str, Any] = {self._cache_arg: state.cache, "use_cache": True}
                if self._keep_arg is not None:
                    kwargs[self._keep_arg] = 1
                out = self._model(input_ids=ids, **kwargs)
                state.cache = out[self._cache_arg]
                state.history.extend(feed.tokens)
                if feed.logits:
                    state.logits = out.logits[0, -1].to(device="cpu", dtype=torch.float32)

    def sample(self, slot: int) -> int:
        state = self._slots[slot]
        if state.logits is None:
            raise RbeesError(f"slot {slot} has no logits to sample from")
        logits, state.logits = state.logits, None
        token = sample_logits(logits, state.params, state.history, state.generator,
                              generated=state.generated)
        state.generated.append(token)
        state.sampled_from = logits
        return token

    supports_logprobs = True

    def logprobs(self, slot: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        logits = self._slots[slot].sampled_from
        if logits is None:
            raise RbeesError(f"slot {slot} has sampled nothing yet")
        lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
        best: list[tuple[int, float]] = []
        if top > 0:
            values, ids = torch.topk(lp, min(top, lp.numel()))
            best = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
        return float(lp[token]), best

    def end(self, slot: int) -> None:
        self._slots[slot] = _Slot()

    def close(self) -> None:
        self._slots = []
        self._model = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def sample_logits(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
                  generator: torch.Generator | None, *, generated: Sequence[int] = ()) -> int:
    """One token from 1-D float32 CPU ``logits``.

    Logit bias first (-100 bans), the repetition penalty over ``history``, presence and
    frequency penalties over the last :data:`PENALTY_WINDOW` tokens of ``generated`` (as
    llama.cpp's penalties sampler), then greedy when ``temperature == 0``, else top-k ->
    top-p -> min-p -> temperature -> a draw from ``generator``.
    """
    if params.logit_bias:
        logits = logits.clone()
        for token, bias in params.logit_bias:
            if token < logits.numel():
                logits[token] = float("-inf") if bias <= -100 else logits[token] + bias
    if (params.presence_penalty or params.frequency_penalty) and generated:
        window = torch.tensor(list(generated[-PENALTY_WINDOW:]), dtype=torch.long)
        seen, counts = torch.unique(window, return_counts=True)
        logits = logits.clone()
        logits[seen] -= counts.to(logits.dtype) * params.frequency_penalty + (
            params.presence_penalty)
    if params.repetition_penalty != 1.0 and history:
        seen = torch.unique(torch.tensor(history, dtype=torch.long))
        seen = seen[seen < logits.numel()]
        scores = logits[seen]
        penalty = params.repetition_penalty
        logits = logits.clone()
        logits[seen] = torch.where(scores < 0, scores * penalty, scores / penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) > params.top_p
        drop[0] = False
        logits = logits.index_fill(0, order[drop], float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
