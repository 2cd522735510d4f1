"""Embeddings with llama.cpp: every input of a request in one forward pass.

An embedding worker (rbees-workerd ``--embedding``) loads its model with a context made
for it (:func:`configure`): embeddings on, the GGUF's pooling type (``<arch>.pooling_type``;
mean when it names none, or none at all: per-token vectors are no OpenAI answer), one
unified KV cache of ``n_ctx`` cells shared by up to :data:`EMBED_SEQS` sequences, and
``n_batch == n_ubatch == n_ctx``, so that a pooled sequence is never split across
micro-batches (llama.cpp pools per micro-batch). :func:`embed` then puts every input in
one ``llama_batch``, input ``i`` as sequence ``i``, decodes it once and reads each
sequence's pooled vector with ``llama_get_embeddings_seq``; inputs that do not fit one
batch go into as few passes as they need, and the count is reported.

Flash attention is off in this context: with it, SmolLM2's vectors differed from
llama-cpp-python's ``Llama(embedding=True)`` (which turns it off) by 3.3e-4 in cosine
distance; without it they match to 1e-16.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rbees_core.backend import Embeddings
from rbees_core.errors import InvalidParamsError, RbeesError

if TYPE_CHECKING:
    from rbees_backend_llamacpp.backend import LlamaCppModel

#: inputs one forward pass can hold (sequences of the context)
EMBED_SEQS = 64
#: tokens of one forward pass (and the longest input) when the worker sets no ``--ctx``
DEFAULT_EMBED_CTX = 2048
_POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}


def pooling_of(lib: Any, model: Any) -> int:
    """The pooling type the GGUF names (``<arch>.pooling_type``), else mean. A GGUF that
    names none or rank pools by mean too: ``/v1/embeddings`` answers one vector per input."""
    buf = ctypes.create_string_buffer(64)
    n = lib.llama_model_meta_val_str(model, b"general.architecture", buf, 64)
    arch = buf.value.decode() if n > 0 else "llama"
    n = lib.llama_model_meta_val_str(model, f"{arch}.pooling_type".encode(), buf, 64)
    raw = buf.value.decode().strip().lower() if n > 0 else ""
    kind = int(raw) if raw.isdigit() else _POOLING.get(raw, -1)
    return kind if kind in (1, 2, 3) else int(lib.LLAMA_POOLING_TYPE_MEAN)


def configure(lib: Any, model: Any, cparams: Any, ctx: int | None) -> int:
    """Set ``cparams`` up for embeddings (see the module's docstring); returns the batch
    size, ``ctx`` tokens (default :data:`DEFAULT_EMBED_CTX`, at most the trained context)."""
    n = ctx or min(DEFAULT_EMBED_CTX, int(lib.llama_model_n_ctx_train(model)))
    cparams.embeddings = True
    cparams.pooling_type = pooling_of(lib, model)
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n
    cparams.n_seq_max = EMBED_SEQS
    cparams.kv_unified = True
    cparams.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    return n


def _passes(tokens: list[list[int]], n_batch: int) -> list[list[int]]:
    """Input indices grouped into forward passes: in order, each pass at most ``n_batch``
    tokens and :data:`EMBED_SEQS` inputs."""
    passes: list[list[int]] = [[]]
    used = 0
    for i, toks in enumerate(tokens):
        if passes[-1] and (used + len(toks) > n_batch or len(passes[-1]) >= EMBED_SEQS):
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += len(toks)
    return passes


def embed(model: LlamaCppModel, texts: Sequence[str]) -> Embeddings:
    """Unit-length pooled vectors of ``texts``, one ``llama_decode`` per pass (see the
    module's docstring). Raises :class:`InvalidParamsError` (field ``input``) for an input
    of no tokens or of more than the batch holds, :class:`RbeesError` when llama.cpp fails."""
    lib = model._lib
    n_batch = model.n_batch
    tokens = [model.tokenize(text) for text in texts]
    for i, toks in enumerate(tokens):
        if not toks:
            raise InvalidParamsError("input", f"input {i} has no tokens")
        if len(toks) > n_batch:
            raise InvalidParamsError(
                "input", f"input {i} is {len(toks)} tokens; this worker embeds at most "
                f"{n_batch} per input")
    n_embd = int(lib.llama_model_n_embd(model._model))
    mem = lib.llama_get_memory(model._ctx)
    batch = model._batch
    vectors: list[list[float]] = [[] for _ in texts]
    groups = _passes(tokens, n_batch)
    for group in groups:
        n = 0
        for seq, i in enumerate(group):
            for pos, tok in enumerate(tokens[i]):
                batch.token[n] = tok
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # every token is an output when embedding
                n += 1
        batch.n_tokens = n
        lib.llama_memory_clear(mem, True)
        rc = lib.llama_decode(model._ctx, batch)
        if rc != 0:
            raise RbeesError(f"llama_decode failed with code {rc}")
        for seq, i in enumerate(group):
            ptr = lib.llama_get_embeddings_seq(model._ctx, seq)
            if not ptr:
                raise RbeesError(f"llama.cpp returned no embedding for input {i}")
            vector = ptr[:n_embd]
            norm = math.sqrt(math.fsum(v * v for v in vector))
            vectors[i] = [v / norm for v in vector] if norm > 0 else list(vector)
    lib.llama_memory_clear(mem, True)
    return Embeddings(vectors=vectors, tokens=[len(t) for t in tokens], passes=len(groups))
