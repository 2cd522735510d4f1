"""llama.cpp through llama-cpp-python's low-level API: one context, N sequences, one batch."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from rbees_backend_llamacpp import logs
from rbees_backend_llamacpp.interrupt import Interrupter
from rbees_backend_llamacpp.offload import set_devices, set_remote_devices
from rbees_core.backend import (
    OVERHEAD_BYTES,
    Backend,
    DecodeInterrupted,
    Embeddings,
    Feed,
    LoadedModel,
    MemoryEstimate,
    MemoryKind,
    SamplingParams,
    split_device,
)
from rbees_core.chat_template import ChatTemplate
from rbees_core.errors import (
    BackendUnavailableError,
    InvalidParamsError,
    ModelLoadError,
    RbeesError,
)
from rbees_core.gguf import read_header

DEFAULT_CTX_CAP = 4096
_MEMORY_KIND: dict[str, MemoryKind] = {"cpu": "ram", "cuda": "vram", "metal": "unified"}


def _text(content: Any) -> str:
    """A message's content as one string: text parts joined, none as empty."""
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _lib() -> Any:
    # No wait policy is set here: the engine's default (threads spin a while between the
    # steps of a graph, then sleep) is about 30% faster for one stream than passive
    # waiting. A pool gives each worker cores of its own, or OMP_WAIT_POLICY=PASSIVE when
    # it must share them (rbees_core.pool.cores), so spinning threads never starve another
    # worker on the same cores.
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - the dependency is declared
        raise BackendUnavailableError(f"llama-cpp-python is not importable: {exc}") from exc
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    logs.route(llama_cpp)
    return llama_cpp


def _usable_cores() -> int:
    """The CPUs this process may run on (its affinity: a pool's grant), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1  # pragma: no cover - not Linux


def _has_local_gpu() -> bool:
    """Whether ggml sees a GPU of this host. ``llama_supports_gpu_offload`` alone says yes
    for a CPU-only build with the RPC backend (remote devices can take layers), so the
    devices are counted where the build lets us (with RPC: :meth:`rpc.Ggml.local_gpus`)."""
    from rbees_backend_llamacpp.rpc import ggml

    try:
        return bool(ggml().local_gpus())
    except BackendUnavailableError:  # built without RPC: offload support means a GPU
        return True


class LlamaCppBackend(Backend):
    """llama.cpp: cpu always; cuda or metal when llama-cpp-python was built for them."""

    name: ClassVar[str] = "llamacpp"
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "metal")
    batched: ClassVar[bool] = True
    embeds: ClassVar[bool] = True
    offloads: ClassVar[bool] = True
    shards: ClassVar[bool] = True

    @classmethod
    def available_devices(cls) -> list[str]:
        lib = _lib()
        found = ["cpu"]
        if lib.llama_supports_gpu_offload() and _has_local_gpu():
            found.append("metal" if sys.platform == "darwin" else "cuda")
        return found

    def estimate_memory(self, path: str, *, device: str, slots: int, ctx: int | None,
                        embedding: bool = False) -> MemoryEstimate | None:
        """The GGUF file's size, an f16 K and V cache of ``ctx`` (default: the trained
        context capped at :data:`DEFAULT_CTX_CAP`, as :meth:`load` chooses) for each slot,
        and :data:`rbees_core.backend.OVERHEAD_BYTES`; read from the metadata and tensor
        records alone, with the repeating layers' share (``blk.N.`` tensors) for a partial
        offload. None for a path that is not a ``.gguf`` file. With ``embedding``: one cache
        of the embedding batch for all slots, and every token's logits twice (the output
        buffer and the graph that fills it, :mod:`rbees_backend_llamacpp.embedding`)."""
        if not path.endswith(".gguf"):
            return None
        header = read_header(path, tensors=True)
        value = header.arch_int
        layers = value("block_count") or 0
        embd = value("embedding_length") or 0
        heads = value("attention.head_count") or 1
        kv_heads = value("attention.head_count_kv") or heads
        trained = value("context_length") or DEFAULT_CTX_CAP
        per_slot = ctx or min(trained, DEFAULT_CTX_CAP)
        kv_token = 2 * layers * (embd * kv_heads // heads) * 2  # f16 K and V
        kv = kv_token * per_slot * slots
        if embedding:
            from rbees_backend_llamacpp.embedding import DEFAULT_EMBED_CTX

            per_slot = ctx or min(trained, DEFAULT_EMBED_CTX)
            kv = kv_token * per_slot + 2 * 4 * (value("vocab_size") or 65_536) * per_slot
            kv_token = 0  # one cache whatever the slots: not rescaled by them
        blocks, layer_weights, _ = header.layer_split()
        if blocks != layers:  # metadata and tensors disagree: no layer figures
            layers = layer_weights = 0
        return MemoryEstimate(
            weights_bytes=Path(path).stat().st_size, kv_cache_bytes=kv, layers=layers,
            layer_weights_bytes=layer_weights,
            layer_kv_bytes=(kv_token * per_slot * slots) // layers if layers else 0,
            kv_token_bytes=kv_token, slots=slots, ctx=per_slot)

    def load(
        self,
        path: str,
        *,
        device: str,
        slots: int,
        ctx: int | None,
        threads: int | None,
        progress: Callable[[str, float], None],
        embedding: bool = False,
        n_gpu_layers: int | None = None,
        tensor_split: Sequence[float] | None = None,
        rpc: Sequence[str] | None = None,
    ) -> LoadedModel:
        """The model on ``device``; with ``embedding``, a context for
        :meth:`LlamaCppModel.embed` instead of generation
        (:mod:`rbees_backend_llamacpp.embedding`); ``n_gpu_layers`` of it on the GPU (the
        rest in RAM) or split over the GPUs by ``tensor_split``
        (:mod:`rbees_backend_llamacpp.offload`); with ``rpc`` (``HOST:PORT`` of llama.cpp
        RPC servers) sharded by layer over ``device`` and their devices, ``tensor_split``
        then giving ``device``'s share first (:func:`offload.set_remote_devices`)."""
        kind, index = split_device(device, self.name)
        if kind not in self.available_devices():
            raise BackendUnavailableError(
                f"device {kind!r} is not supported by this llama-cpp-python build "
                f"(available: {', '.join(self.available_devices())})",
                details={"backend": self.name, "device": device},
            )
        return LlamaCppModel(path, kind=kind, index=index, slots=slots, ctx=ctx,
                             threads=threads or _usable_cores(), progress=progress,
                             embedding=embedding, n_gpu_layers=n_gpu_layers,
                             tensor_split=tensor_split, rpc=tuple(rpc or ()))


class LlamaCppModel(LoadedModel):
    supports_threads = True

    def __init__(self, path: str, *, kind: str, index: int, slots: int, ctx: int | None,
                 threads: int, progress: Callable[[str, float], None], n_batch: int = 256,
                 embedding: bool = False, n_gpu_layers: int | None = None,
                 tensor_split: Sequence[float] | None = None,
                 rpc: Sequence[str] = ()) -> None:
        lib = self._lib = _lib()
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        #: each device's share of a sharded model (this host's first), else None
        self.shard: tuple[float, ...] | None = None
        if rpc:
            n_layer = read_header(path).arch_int("block_count") or 0
            self._split = set_remote_devices(lib, mparams, kind=kind, index=index,
                                             n_layer=n_layer, endpoints=rpc,
                                             tensor_split=tensor_split)
            self.shard = self._split[-1]
        else:
            self._split = set_devices(lib, mparams, kind=kind, index=index,
                                      n_gpu_layers=n_gpu_layers, tensor_split=tensor_split)

        def on_progress(fraction: float, _user: Any) -> bool:
            progress("load", float(fraction))
            return True

        self._progress_cb = lib.llama_progress_callback(on_progress)
        mparams.progress_callback = self._progress_cb
        model = lib.llama_model_load_from_file(path.encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {path!r} (not a GGUF model?)",
                                 details={"path": path})
        self._model = model
        self._vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        # BOS that tokenize() adds itself, so that a chat template's own BOS is not doubled
        self._bos = int(lib.llama_vocab_bos(self._vocab))
        self._add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab)) and self._bos >= 0
        n_train = lib.llama_model_n_ctx_train(model)
        ctx_slot = ctx or min(n_train, DEFAULT_CTX_CAP)
        progress("context", 0.0)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = ctx_slot * slots
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = slots
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False
        cparams.no_perf = True
        if embedding:  # one pass of up to n_ctx tokens over up to EMBED_SEQS inputs
            from rbees_backend_llamacpp.embedding import configure

            n_batch = configure(lib, model, cparams, ctx)
        self._ctx = lib.llama_init_from_model(model, cparams)
        if not self._ctx:
            lib.llama_model_free(model)
            raise ModelLoadError(f"llama.cpp could not create a context of {ctx_slot} x {slots}")
        self._mem = lib.llama_get_memory(self._ctx)
        self.n_ctx_slot = int(lib.llama_n_ctx_seq(self._ctx))
        self.n_batch = int(lib.llama_n_batch(self._ctx))  # llama.cpp clamps it to n_ctx
        n_layer = lib.llama_model_n_layer(model)
        n_embd = lib.llama_model_n_embd(model)
        kv_per_token = 2 * n_layer * n_embd * lib.llama_model_n_head_kv(model) // max(
            1, lib.llama_model_n_head(model)) * 2
        kv_bytes = kv_per_token * self.n_ctx_slot * (1 if embedding else slots)
        if embedding:  # every token is an output: its logits, and the graph that makes them
            kv_bytes += 2 * 4 * int(lib.llama_vocab_n_tokens(self._vocab)) * self.n_batch
        # weights, cache and the compute buffers the estimate counts (OVERHEAD_BYTES), so
        # that the pool can calibrate its estimates by this figure (rbees_core.pool.memory)
        self.memory_bytes = int(lib.llama_model_size(model)) + kv_bytes + OVERHEAD_BYTES
        if self.shard is not None:  # this host holds its share; the servers hold the rest
            weights = int(lib.llama_model_size(model)) + kv_bytes
            self.memory_bytes = int(weights * self.shard[0] / sum(self.shard)) + OVERHEAD_BYTES
        self.memory_kind = _MEMORY_KIND[kind]
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        # a recurrent model's state cannot be cut back to a position: never interrupted
        self._interrupter = Interrupter(lib, self._ctx,
                                        enabled=not lib.llama_model_is_recurrent(model))
        self._pos = [0] * slots
        self._logit_at = [-1] * slots
        self._samplers: list[Any] = [None] * slots
        self._grammars: list[Any] = [None] * slots  # each slot's grammar sampler, if any
        self._stateless = [True] * slots  # no sampler of the slot's chain keeps state
        self._argmax = [False] * slots  # greedy and nothing else: the top logit is the token
        self._candidates: Any = None  # numpy llama_token_data[n_vocab], for grammar steps
        self._id_range: Any = None
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._name = Path(path).name
        self.chat_template = self._chat_template()
        self.supports_embedding = embedding
        progress("context", 1.0)

    def set_threads(self, threads: int) -> None:
        self._lib.llama_set_n_threads(self._ctx, threads, threads)

    def _chat_template(self) -> ChatTemplate | None:
        """The GGUF's ``tokenizer.chat_template`` (and ``.tool_use``) with the BOS and EOS
        text the template writes, as llama.cpp's ``--jinja`` gives them; None without one."""
        lib = self._lib
        source = lib.llama_model_chat_template(self._model, None)
        if not source:
            return None
        tool_source = lib.llama_model_chat_template(self._model, b"tool_use")
        special = {}
        for key, token in (("bos_token", lib.llama_vocab_bos(self._vocab)),
                           ("eos_token", lib.llama_vocab_eos(self._vocab))):
            if token >= 0:
                n = lib.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, True)
                special[key] = self._piece_buf.raw[:max(n, 0)].decode("utf-8", "replace")
        return ChatTemplate(source.decode("utf-8", "replace"), model=self._name,
                            tool_source=tool_source.decode("utf-8", "replace")
                            if tool_source else None, special_tokens=special)

    # -- text -----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        lib = self._lib
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, True, True)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, cap, True, True)
        tokens = list(buf[:n])
        if self._add_bos and len(tokens) > 1 and tokens[0] == tokens[1] == self._bos:
            del tokens[0]  # the text began with BOS (a chat template writes it): keep one
        return tokens

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if self.chat_template is not None:
            return self.chat_template.render(messages, tools=tools,
                                     add_generation_prompt=add_generation_prompt, **kwargs)
        # No template in the GGUF: llama.cpp's built-in default (ChatML), which shows no tools.
        if tools:
            raise InvalidParamsError("tools", f"{self._name} has no chat template that can "
                                     "show tools")
        lib = self._lib
        texts = [(str(m["role"]), _text(m.get("content"))) for m in messages]
        arr = (lib.llama_chat_message * len(texts))(*[
            lib.llama_chat_message(role.encode(), content.encode()) for role, content in texts
        ])
        size = sum(len(c.encode()) for _, c in texts) * 2 + 256
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_chat_apply_template(None, arr, len(texts), add_generation_prompt, buf,
                                          size)
        if n > size:
            buf = ctypes.create_string_buffer(n)
            n = lib.llama_chat_apply_template(None, arr, len(texts), add_generation_prompt,
                                              buf, n)
        if n < 0:
            raise InvalidParamsError("messages", f"{self._name} has no chat template; send a "
                                     "prompt instead")
        return buf.raw[:n].decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, False)
            piece = self._piece_buf.raw[:n] if n > 0 else b""
            self._pieces[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(self._lib.llama_vocab_is_eog(self._vocab, token))
        return eog

    # -- sequences ------------------------------------------------------------------------

    prefix_cache = True
    supports_grammar = True

    def compile_grammar(self, *, json_schema: Mapping[str, Any] | None = None,
                        grammar: str | None = None) -> str:
        """GBNF for ``json_schema`` (see :mod:`rbees_backend_llamacpp.grammar`) or
        ``grammar`` itself, checked by building llama.cpp's grammar sampler once (it returns
        NULL for a grammar it cannot parse: a 400, not a failed job)."""
        from rbees_backend_llamacpp.grammar import schema_to_gbnf

        field = "json_schema" if grammar is None else "grammar"
        gbnf = schema_to_gbnf(json_schema or {}) if grammar is None else grammar
        sampler = self._lib.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not sampler:
            raise InvalidParamsError(field, "llama.cpp cannot parse the grammar "
                                     f"{'of this JSON schema' if grammar is None else ''}")
        self._lib.llama_sampler_free(sampler)
        return gbnf

    def begin(self, slot: int, params: SamplingParams, keep: int = 0) -> int:  # type: ignore[override]
        lib = self._lib
        if not lib.llama_memory_seq_rm(self._mem, slot, keep, -1):
            lib.llama_memory_seq_rm(self._mem, slot, -1, -1)  # cannot cut: start over
            keep = 0
        self._pos[slot] = keep
        self._free_sampler(slot)
        if params.grammar is not None:
            # Kept out of the chain, see _sample_constrained.
            grammar = lib.llama_sampler_init_grammar(self._vocab, params.grammar.encode(),
                                                     b"root")
            if not grammar:
                raise InvalidParamsError("grammar", "llama.cpp cannot parse the grammar")
            self._grammars[slot] = grammar
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.logit_bias:
            lib.llama_sampler_chain_add(chain, self._logit_bias(params.logit_bias))
        if params.penalized:
            lib.llama_sampler_chain_add(chain, self._penalties(
                params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
        if params.temperature == 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
            lib.llama_sampler_chain_add(
                chain, lib.llama_sampler_init_dist(params.seed & 0xFFFFFFFF))
        self._samplers[slot] = chain
        self._stateless[slot] = not params.penalized
        self._argmax[slot] = (params.temperature == 0 and not params.logit_bias
                              and not params.penalized and params.grammar is None)
        return keep

    def _logit_bias(self, pairs: Sequence[tuple[int, float]]) -> Any:
        """llama.cpp's logit-bias sampler for ``(token, bias)`` pairs (it copies them); a
        bias of -100 or less is -inf, a ban as OpenAI means it. Ids beyond the vocabulary
        are refused by the worker before the job is queued."""
        lib = self._lib
        arr = (lib.llama_logit_bias * len(pairs))(*[
            lib.llama_logit_bias(token, float("-inf") if bias <= -100 else bias)
            for token, bias in pairs])
        return lib.llama_sampler_init_logit_bias(self.n_vocab, len(pairs), arr)

    def _penalties(self, repeat: float, freq: float = 0.0, present: float = 0.0,
                   last_n: int = 64) -> Any:
        """The penalties sampler (repetition, frequency, presence). Builds of llama.cpp
        differ on its arguments: the one llama-cpp-python 0.3.36 ships takes ``n_vocab``
        first (5 arguments), upstream does not (4); the binding's ``argtypes`` say which.
        Calling the 4-argument form on a 5-argument build raised TypeError on every job
        with a repetition_penalty."""
        init = self._lib.llama_sampler_init_penalties
        if len(getattr(init, "argtypes", None) or ()) == 5:
            return init(self.n_vocab, last_n, repeat, freq, present)
        return init(last_n, repeat, freq, present)

    supports_interrupt = True

    def interrupt(self) -> None:
        self._interrupter.fire()

    def decode(self, feeds: Sequence[Feed], interruptible: bool = False) -> None:
        """One ``llama_decode`` of every feed; with ``interruptible`` one that
        :meth:`interrupt` may stop (:mod:`rbees_backend_llamacpp.interrupt`), undone then
        (the slots' positions as before) and :class:`DecodeInterrupted` raised."""
        lib, batch = self._lib, self._batch
        token, pos, n_seq_id, seq_id, logits = (
            batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits)
        n = 0
        for feed in feeds:
            start = self._pos[feed.slot]
            for j, tok in enumerate(feed.tokens):
                token[n] = tok
                pos[n] = start + j
                n_seq_id[n] = 1
                seq_id[n][0] = feed.slot
                logits[n] = False
                n += 1
            if feed.logits:
                logits[n - 1] = True
                self._logit_at[feed.slot] = n - 1
            self._pos[feed.slot] = start + len(feed.tokens)
        if n > self.n_batch:
            raise RbeesError(f"batch of {n} tokens exceeds n_batch {self.n_batch}")
        batch.n_tokens = n
        armed = self._interrupter.arm(interruptible)
        rc = lib.llama_decode(self._ctx, batch)
        self._interrupter.disarm()
        if self._interrupter.stopped(rc, armed):
            # llama.cpp dropped the positions of the ubatch it stopped in, not those of
            # ubatches before it: every sequence of the pass goes back to where it was
            for feed in feeds:
                start = self._pos[feed.slot] - len(feed.tokens)
                if not lib.llama_memory_seq_rm(self._mem, feed.slot, start, -1):
                    raise RbeesError(f"llama.cpp could not undo slot {feed.slot}'s stopped pass")
                self._pos[feed.slot] = start
            raise DecodeInterrupted
        if rc != 0:
            raise RbeesError(f"llama_decode failed with code {rc}")

    supports_logprobs = True

    def logprobs(self, slot: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """Log-softmax (numpy, float64) of the logits ``slot`` was sampled from: llama.cpp
        keeps them until the next :meth:`decode`."""
        import numpy as np

        logits = self._logits(slot).astype(np.float64)
        peak = logits.max()
        norm = peak + np.log(np.exp(logits - peak).sum())
        best: list[tuple[int, float]] = []
        if top > 0:
            top = min(top, self.n_vocab)
            ids = np.argpartition(-logits, top - 1)[:top]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = [(int(i), float(logits[i] - norm)) for i in ids]
        return float(logits[token] - norm), best

    def _logits(self, slot: int) -> Any:
        """The logits ``slot`` samples from, as a numpy view of llama.cpp's buffer (valid
        until the next :meth:`decode`)."""
        import numpy as np

        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(
            self._ctx, self._logit_at[slot]), shape=(self.n_vocab,))

    def sample(self, slot: int) -> int:
        if self._argmax[slot]:
            # llama.cpp's greedy sampler copies all n_vocab logits into candidates first:
            # 48 us a token for SmolLM2's 49k against 5-7 us for numpy's argmax, which
            # breaks ties the same way (the first highest logit wins)
            return int(self._logits(slot).argmax())
        if self._grammars[slot] is not None:
            return self._sample_constrained(slot)
        return int(self._lib.llama_sampler_sample(
            self._samplers[slot], self._ctx, self._logit_at[slot]))

    def _sample_constrained(self, slot: int) -> int:
        """The next token of ``slot`` under its grammar, as llama.cpp's common sampler does
        it: sample without the grammar, keep the token when the grammar accepts it, else
        mask the whole vocabulary with the grammar and sample again. Masking all 49k tokens
        of SmolLM2 at every step cost 38% of tokens/s here; most steps now check one token.
        """
        lib, chain, grammar = self._lib, self._samplers[slot], self._grammars[slot]
        import numpy as np

        n_vocab = self.n_vocab
        if self._candidates is None or len(self._candidates) != n_vocab:
            self._candidates = np.zeros(n_vocab, dtype=np.dtype(
                [("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True))
            self._candidates["id"] = np.arange(n_vocab, dtype=np.int32)
        cur = self._candidates
        logits = self._logits(slot)

        def pick(masked: bool) -> int:
            cur["id"] = self._ids(n_vocab)
            cur["logit"] = logits
            cur["p"] = 0.0
            arr = lib.llama_token_data_array(
                cur.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)), n_vocab, -1, False)
            if masked:
                lib.llama_sampler_apply(grammar, ctypes.byref(arr))
            lib.llama_sampler_apply(chain, ctypes.byref(arr))
            return int(arr.data[arr.selected].id)

        if self._stateless[slot]:
            # No sampler of the chain keeps state (no penalties): llama.cpp's own sample
            # (its accept does nothing here) spares building the candidates in Python.
            token = int(lib.llama_sampler_sample(chain, self._ctx, self._logit_at[slot]))
        else:
            token = pick(masked=False)
        one = lib.llama_token_data(token, 1.0, 0.0)
        single = lib.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        lib.llama_sampler_apply(grammar, ctypes.byref(single))
        if single.data[0].logit == float("-inf"):
            token = pick(masked=True)
        lib.llama_sampler_accept(grammar, token)
        lib.llama_sampler_accept(chain, token)
        return token

    def _ids(self, n_vocab: int) -> Any:
        if self._id_range is None or len(self._id_range) != n_vocab:
            import numpy as np

            self._id_range = np.arange(n_vocab, dtype=np.int32)
        return self._id_range

    def end(self, slot: int) -> None:
        self._free_sampler(slot)  # the cache stays: the next job may share its prefix

    def _free_sampler(self, slot: int) -> None:
        if self._samplers[slot] is not None:
            self._lib.llama_sampler_free(self._samplers[slot])
            self._samplers[slot] = None
        if self._grammars[slot] is not None:
            self._lib.llama_sampler_free(self._grammars[slot])
            self._grammars[slot] = None

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """See :func:`rbees_backend_llamacpp.embedding.embed`."""
        if not self.supports_embedding:
            return super().embed(texts)
        from rbees_backend_llamacpp.embedding import embed

        return embed(self, texts)

    def close(self) -> None:
        lib = self._lib
        for slot in range(len(self._samplers)):
            self._free_sampler(slot)
        if self._ctx:
            lib.llama_batch_free(self._batch)
            lib.llama_free(self._ctx)
            lib.llama_model_free(self._model)
            self._ctx = None
