"""The inference backend interface.

A backend turns a model file into a :class:`LoadedModel`, which exposes the few primitives
the worker's decode loop (:mod:`rbees_core.engine`) needs: tokenize, decode a batch of
sequences, sample one token per sequence. The loop owns scheduling, streaming, stop
sequences, cancellation and metrics, so every backend gets them the same way.

Backends register classes through :func:`rbees_core.hookspecs.rbees_register_backends`.
Heavy libraries (llama_cpp, torch) are imported inside :meth:`Backend.load`, never when the
plugin module is imported.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs

if TYPE_CHECKING:
    from rbees_core.chat_template import ChatTemplate

MemoryKind = Literal["vram", "unified", "ram"]
#: Compute buffers and runtime overhead on top of weights and KV cache, when a backend
#: knows no better.
OVERHEAD_BYTES = 128 * 1024**2


@attrs.frozen
class MemoryEstimate:
    """What a model will hold on its device once loaded, predicted before loading it.

    Made by :meth:`Backend.estimate_memory`; the pool's preflight compares :attr:`total_bytes`
    with the memory the pool offers on the device (:mod:`rbees_core.pool.memory`) and
    reserves it for the worker while it loads; the pool reports the same figure for each
    model it holds (``models[].memory``), which the scheduler sizes new workers by.

    The parts a placement planner needs to offload part of a model (llama.cpp's
    ``n_gpu_layers``): :attr:`layers` repeating layers of :attr:`layer_weights_bytes` weights
    and :attr:`layer_kv_bytes` of KV cache each (:attr:`layer_bytes`), and the rest,
    :attr:`non_layer_bytes` (token embeddings, output layer, norms, compute buffers). A
    backend that cannot tell leaves :attr:`layers` 0. :attr:`kv_token_bytes` (the KV cache
    of one token of one slot, all layers) rescales the estimate to other slots and contexts
    (:meth:`scaled`) with the backend's own formula.
    """

    weights_bytes: int
    kv_cache_bytes: int = 0
    overhead_bytes: int = OVERHEAD_BYTES
    #: repeating layers (transformer blocks); 0: unknown
    layers: int = 0
    #: weights of one repeating layer (their mean, when they differ)
    layer_weights_bytes: int = 0
    #: KV cache of one layer, for every slot of the estimate
    layer_kv_bytes: int = 0
    #: KV cache of one token of one slot, every layer together; 0: unknown (not rescalable)
    kv_token_bytes: int = 0
    #: the slots and context per slot the estimate is for (0: unknown)
    slots: int = 0
    ctx: int = 0
    #: the figure a worker of this model really held, reported once it was ready, rather
    #: than a prediction (:class:`rbees_core.pool.memory.Measured`)
    measured: bool = False

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def layer_bytes(self) -> int:
        """Weights and KV cache of one repeating layer."""
        return self.layer_weights_bytes + self.layer_kv_bytes

    @property
    def non_layer_bytes(self) -> int:
        """Everything but the repeating layers: embeddings, output, compute buffers."""
        return max(0, self.total_bytes - self.layers * self.layer_bytes)

    def scaled(self, *, slots: int, ctx: int | None) -> MemoryEstimate:
        """The estimate for ``slots`` slots of ``ctx`` tokens (None: the estimate's own
        context): the KV cache rescaled by :attr:`kv_token_bytes`, the rest unchanged.
        Itself when it cannot be rescaled (unknown :attr:`kv_token_bytes` or :attr:`ctx`)
        or nothing changes. Used by the scheduler's sizing of a worker
        (:func:`rbees_core.scheduling.memory_needed`)."""
        ctx = ctx or self.ctx
        if not self.kv_token_bytes or not self.ctx or (slots, ctx) == (self.slots, self.ctx):
            return self
        kv = self.kv_token_bytes * ctx * slots
        extra = self.kv_cache_bytes - self.kv_token_bytes * self.ctx * max(self.slots, 1)
        kv += max(0, extra)  # what does not grow with tokens (an embedding's logits)
        per_layer = kv // self.layers if self.layers else 0
        return attrs.evolve(self, kv_cache_bytes=kv, layer_kv_bytes=per_layer, slots=slots,
                            ctx=ctx, measured=False)

    def to_dict(self) -> dict[str, Any]:
        """The estimate on the wire (a pool's ``models[].memory``, docs/contract.md), with
        ``total_bytes``."""
        return {**attrs.asdict(self), "total_bytes": self.total_bytes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryEstimate | None:
        """:meth:`to_dict`'s dict back (unknown keys ignored); None for anything that is not
        one (no ``weights_bytes``, a negative or non-integer part)."""
        names = {f.name for f in attrs.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        ints = [v for k, v in values.items() if k != "measured"]
        if "weights_bytes" not in values or any(
                type(v) is not int or v < 0 for v in ints):
            return None
        return cls(**values)

    @classmethod
    def snapshot_fields(cls, model: Mapping[str, Any], ctx: int | None) -> dict[str, Any]:
        """``memory`` and ``memory_bytes`` of a scheduling snapshot's model entry, from a
        pool's listing entry ``model`` (:func:`rbees_core.scheduling.snapshot_pool`): its
        estimate, and what a worker of one slot of ``ctx`` tokens needs (the least a pool
        starts: it lowers the slots until they fit), or the entry's own ``memory_bytes``."""
        memory = model.get("memory")
        estimate = cls.from_dict(memory) if isinstance(memory, Mapping) else None
        if estimate is not None:
            return {"memory": memory,
                    "memory_bytes": estimate.scaled(slots=1, ctx=ctx).total_bytes}
        held = model.get("memory_bytes")
        return {"memory_bytes": held} if type(held) is int else {}

    @classmethod
    def on_disk(cls, path: str | Path) -> MemoryEstimate:
        """The model's size on disk (a file, or every file of a folder) plus
        :data:`OVERHEAD_BYTES`: the estimate when the backend has none."""
        p = Path(path)
        size = p.stat().st_size if p.is_file() else sum(
            f.stat().st_size for f in p.rglob("*") if f.is_file())
        return cls(weights_bytes=size)


def split_device(device: str, backend: str | None = None) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; a kind alone has index 0.

    Raises :class:`rbees_core.errors.BackendUnavailableError` for a non-numeric index.
    """
    from rbees_core.errors import BackendUnavailableError

    kind, _, index = device.partition(":")
    if index and not (index.isascii() and index.isdigit()):
        raise BackendUnavailableError(f"bad device {device!r}: the index must be a number",
                                      details={"backend": backend, "device": device})
    return kind, int(index or 0)


@attrs.frozen
class SamplingParams:
    """Sampling settings of one sequence. ``temperature == 0`` means greedy.

    ``grammar`` (GBNF, as :meth:`LoadedModel.compile_grammar` returns it) restricts the
    sequence to the text the grammar accepts; only models with
    :attr:`LoadedModel.supports_grammar` are given one.

    ``repetition_penalty``, ``presence_penalty`` and ``frequency_penalty`` act as llama.cpp's
    penalties sampler does, over the last 64 generated tokens; ``min_p`` drops tokens less
    likely than ``min_p`` times the likeliest one (sampling only); ``logit_bias`` holds
    ``(token, bias)`` pairs added to the logits before anything else, a bias of -100 or less
    bans the token (its logit becomes -inf). All apply under greedy decoding too, except
    ``min_p``, ``top_k`` and ``top_p``, which cannot change the likeliest token.
    """

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    grammar: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def penalized(self) -> bool:
        """Whether any of the penalties is set (the sampler then keeps state)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


@attrs.frozen
class Embeddings:
    """What :meth:`LoadedModel.embed` returns: one unit-length vector per input text, in the
    inputs' order, the tokens each input was, and the forward passes it took (1 when every
    input fitted one batch)."""

    vectors: list[list[float]]
    tokens: list[int]
    passes: int

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


@attrs.frozen
class Feed:
    """Tokens to append to one slot's sequence in one :meth:`LoadedModel.decode` call.

    ``logits`` asks for the distribution after the last token, so that the slot can be
    sampled next.
    """

    slot: int
    tokens: Sequence[int]
    logits: bool


class DecodeInterrupted(Exception):
    """:meth:`LoadedModel.decode` (called with ``interruptible=True``) stopped part-way
    because :meth:`LoadedModel.interrupt` was called: nothing of the pass's feeds is in
    any slot's cache, and the engine feeds them again."""


class LoadedModel(ABC):
    """One model in memory serving ``slots`` sequences at once.

    Called only from the worker's single decode thread; implementations need no locking.
    Raise :class:`rbees_core.errors.RbeesError` subclasses for failures a client should see.
    """

    #: Tokens one slot can hold (prompt plus generated).
    n_ctx_slot: int
    #: Bytes this model holds on its device, for accounting.
    memory_bytes: int
    memory_kind: MemoryKind
    #: Most tokens one :meth:`decode` call may carry; bounds how long one step takes.
    n_batch: int = 256
    #: Whether a slot's cache survives :meth:`end` so that the next job in the slot can
    #: reuse the common prefix (then :meth:`begin` is called with ``keep``).
    prefix_cache: bool = False
    #: The model's chat template when :meth:`render_chat` renders through the kernel's
    #: renderer; its :attr:`~rbees_core.chat_template.ChatTemplate.capabilities` say whether
    #: it shows tools, tool calls, a system message. None: no template, or not a Jinja one.
    chat_template: ChatTemplate | None = None
    #: Whether :meth:`begin` honours :attr:`SamplingParams.grammar`; the worker refuses a
    #: grammar or JSON schema for a model without (a 400 naming the backend that can).
    supports_grammar: bool = False
    #: Tokens in the model's vocabulary (``logit_bias`` ids must be below it); 0: unknown.
    n_vocab: int = 0
    #: Whether :meth:`logprobs` works; the worker refuses ``logprobs`` for a model without
    #: (a 400 naming the backend that can).
    supports_logprobs: bool = False

    def logprobs(self, slot: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
        """The log probability of ``token`` in the distribution ``slot`` was last sampled
        from (log-softmax of the raw logits, before penalties, bias or temperature), and the
        ``top`` likeliest tokens of it as ``(token, logprob)``, likeliest first.

        Called by the engine right after :meth:`sample` of a job that asked for logprobs,
        never for other jobs (so they pay nothing). Only when :attr:`supports_logprobs`.
        """
        from rbees_core.errors import InvalidParamsError

        raise InvalidParamsError("logprobs", "this backend cannot report logprobs")

    #: Whether :meth:`set_threads` works: its pool can then move cores between workers.
    supports_threads: bool = False

    def set_threads(self, threads: int) -> None:
        """Decode with ``threads`` threads from the next :meth:`decode` on (the worker's
        pool halved its CPU set for another worker, or gave cores back). Called only by the
        engine's decode thread, between steps. By default refused (a 400): a backend
        without it keeps the threads it was loaded with."""
        from rbees_core.errors import InvalidParamsError

        raise InvalidParamsError("threads", "this backend cannot change its thread count")

    #: Whether :meth:`decode` takes ``interruptible=True``: :meth:`interrupt` (from another
    #: thread) then stops that pass part-way and it raises :class:`DecodeInterrupted`.
    supports_interrupt: bool = False

    def interrupt(self) -> None:  # noqa: B027 - optional
        """From any thread: stop the interruptible :meth:`decode` in flight, or, when none
        is, the next one as it starts (a plain :meth:`decode` forgets the stop). The engine
        calls it when an interactive job arrives while it builds or runs a pass of batch
        jobs' tokens only. Nothing by default."""

    #: Whether :meth:`embed` works: the model was loaded with ``embedding=True`` by a backend
    #: that can embed (:attr:`Backend.embeds`).
    supports_embedding: bool = False

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed ``texts`` (at least one, none empty): one vector each, pooled as the model
        says (mean when it says nothing) and normalised to unit length, as llama-server's
        ``/v1/embeddings`` returns them. All inputs go into one forward pass when they fit
        the model's batch; :attr:`Embeddings.passes` says how many it took.

        Called by rbees-workerd's ``POST /v2/embed`` (an embedding worker, started with
        ``--embedding``), one call at a time, never while :meth:`decode` runs. Raises
        :class:`rbees_core.errors.InvalidParamsError` (a 400, field ``input``) for an input
        of no tokens or one longer than the batch, and, by default, for a backend that
        cannot embed (naming the one that can).
        """
        from rbees_core.errors import InvalidParamsError

        raise InvalidParamsError("input", "this backend cannot embed; run the model on the "
                                 "llamacpp backend for embeddings")

    def compile_grammar(self, *, json_schema: Mapping[str, Any] | None = None,
                        grammar: str | None = None) -> str:
        """The GBNF grammar for :attr:`SamplingParams.grammar` that accepts exactly the JSON
        documents valid under ``json_schema`` (or checks and returns ``grammar``, GBNF).

        Called by the worker once per job that asks for structured output, before the job
        is queued; only when :attr:`supports_grammar`. Raises
        :class:`rbees_core.errors.InvalidParamsError` (a 400) for a schema or grammar it
        cannot use.
        """
        from rbees_core.errors import InvalidParamsError

        raise InvalidParamsError("json_schema", "this backend cannot constrain output")

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Tokens of ``text``, with the model's BOS handling, special tokens parsed."""

    @abstractmethod
    def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text of chat ``messages`` in the model's own template, ready for
        generation when ``add_generation_prompt``.

        ``messages`` are OpenAI chat messages (``content`` a string, None or a list of parts;
        ``tool_calls`` with ``function.arguments`` as a JSON string; ``tool`` messages);
        ``tools`` OpenAI tool objects; ``kwargs`` further template variables
        (``enable_thinking``...). Backends with a Jinja template render through
        :class:`rbees_core.chat_template.ChatTemplate`, so every backend renders alike.

        Called by the worker once per chat request. Raises
        :class:`rbees_core.errors.InvalidParamsError` on ``messages`` (a 400 naming the
        model) when the model has no template or its template refuses or fails.
        """

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The raw bytes a token stands for (possibly part of a UTF-8 character)."""

    @abstractmethod
    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT...)."""

    @abstractmethod
    def begin(self, slot: int, params: SamplingParams) -> None:
        """Start a fresh sequence in ``slot``: empty its cache, set up its sampler.

        Models with :attr:`prefix_cache` are called as ``begin(slot, params, keep=n)``
        when the first ``n`` tokens of the new prompt are those already in the slot's
        cache: keep them, drop the rest, continue at position ``n``, and return how many
        tokens were kept (fewer when the cache cannot be cut there).
        """

    @abstractmethod
    def decode(self, feeds: Sequence[Feed]) -> None:
        """Evaluate all ``feeds`` together (one batched forward pass where possible). A
        model with :attr:`supports_interrupt` is also called as ``decode(feeds,
        interruptible=True)``."""

    @abstractmethod
    def sample(self, slot: int) -> int:
        """Sample the next token of ``slot`` from its last logits and record it."""

    @abstractmethod
    def end(self, slot: int) -> None:
        """Release what the job in ``slot`` holds (a :attr:`prefix_cache` model keeps the
        slot's cache); the slot may be reused by :meth:`begin`."""

    def close(self) -> None:  # noqa: B027 - optional
        """Free the model."""


class Backend(ABC):
    """An inference backend, registered by class and looked up by ``name``.

    ``devices`` lists the device kinds the backend knows; :meth:`available_devices` says which
    of them this installation can really use. Asking :meth:`load` for another one raises
    :class:`rbees_core.errors.BackendUnavailableError`.
    """

    name: ClassVar[str]
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    #: Whether slots > 1 share one batched forward pass.
    batched: ClassVar[bool] = False
    #: Whether :meth:`load` takes ``embedding=True`` (a model for
    #: :meth:`LoadedModel.embed`); backends without it are never passed the argument.
    embeds: ClassVar[bool] = False
    #: Whether :meth:`load` takes ``n_gpu_layers`` and ``tensor_split`` (a model larger than
    #: one GPU: :func:`offload_args`); backends without them are never passed them.
    offloads: ClassVar[bool] = False
    #: Whether :meth:`load` takes ``rpc``: ``HOST:PORT`` endpoints of llama.cpp RPC servers
    #: whose devices hold part of the model (a sharded worker, rbees-workerd ``--rpc``)
    shards: ClassVar[bool] = False

    @classmethod
    def available_devices(cls) -> list[str]:
        """Device kinds usable here (``cpu``, ``cuda``, ``metal``, ``mps``)."""
        return ["cpu"]

    def estimate_memory(self, path: str, *, device: str, slots: int, ctx: int | None
                        ) -> MemoryEstimate | None:
        """Memory ``path`` will hold on ``device`` once loaded for ``slots`` sequences of
        ``ctx`` tokens each (None: the context :meth:`load` would choose), without loading
        it: read headers and metadata only, this runs before a worker starts.

        Called by: the pool's worker preflight (:func:`rbees_core.pool.workers.preflight`,
        for ``rbees-pool worker spawn`` and pool-managerd's ``POST /v2/workers/start``),
        which refuses a worker that does not fit with ``INSUFFICIENT_RAM``/``_VRAM``. The
        default, None, means the backend cannot tell: the pool then counts the model's
        size on disk (:meth:`MemoryEstimate.on_disk`).

        Raises: :class:`rbees_core.errors.ModelLoadError` when the file cannot be a model
        of this backend (a damaged header). Backends with :attr:`embeds` also take
        ``embedding: bool`` (as :meth:`load`): the memory of an embedding worker.
        """
        return None

    @abstractmethod
    def load(
        self,
        path: str,
        *,
        device: str,
        slots: int,
        ctx: int | None,
        threads: int | None,
        progress: Callable[[str, float], None],
    ) -> LoadedModel:
        """Load ``path`` on ``device`` for ``slots`` concurrent sequences.

        ``device`` is a kind with an optional index (``cuda:1``). ``ctx`` is the context per
        slot (None: the model's training context, capped by the backend). ``progress`` is
        called with ``(stage, fraction)`` as loading advances. Runs in a worker thread.
        Backends with :attr:`embeds` also take ``embedding: bool`` (keyword, default False):
        True loads the model for :meth:`LoadedModel.embed` (rbees-workerd ``--embedding``),
        and then it need not generate. Backends with :attr:`offloads` also take
        ``n_gpu_layers`` (the repeating layers on the GPU, the rest in RAM; None: all) and
        ``tensor_split`` (each GPU's share of the model, by index; None: one GPU).
        """


def offload_args(backend: Backend, device: str, n_gpu_layers: int | None,
                 tensor_split: Sequence[float] | None,
                 rpc: Sequence[str] = ()) -> dict[str, Any]:
    """The keywords of :meth:`Backend.load` for a model larger than one GPU (rbees-workerd
    ``--n-gpu-layers``/``--tensor-split``, :mod:`rbees_core.planning`): none when neither
    is set, or on the CPU (where no layer is on a GPU: ``--n-gpu-layers 0`` is accepted).
    With ``rpc`` (``--rpc``: RPC servers of other devices, a sharded worker) ``rpc`` and
    ``tensor_split`` (this device's share first, then each server's; None: by their free
    memory), on any device. Raises :class:`rbees_core.errors.BackendUnavailableError` when
    the backend cannot offload (no :attr:`Backend.offloads`) or shard (no
    :attr:`Backend.shards`). Called by rbees-workerd before it loads."""
    if rpc:
        if not type(backend).shards:
            from rbees_core.errors import BackendUnavailableError

            raise BackendUnavailableError(
                f"backend {backend.name!r} cannot shard a model over RPC servers (--rpc); "
                "llamacpp can", details={"backend": backend.name, "device": device})
        return {"rpc": tuple(rpc), "tensor_split": tuple(tensor_split) if tensor_split
                else None}
    if n_gpu_layers is None and not tensor_split:
        return {}
    if device.split(":", 1)[0] == "cpu":
        if tensor_split or n_gpu_layers:
            from rbees_core.errors import InvalidParamsError

            raise InvalidParamsError("--n-gpu-layers" if n_gpu_layers else "--tensor-split",
                                     "a worker on the CPU holds no layer on a GPU")
        return {}
    if not type(backend).offloads:
        from rbees_core.errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"backend {backend.name!r} cannot split a model across GPUs or offload part of it "
            "(--n-gpu-layers, --tensor-split); llamacpp can",
            details={"backend": backend.name, "device": device})
    return {"n_gpu_layers": n_gpu_layers,
            "tensor_split": tuple(tensor_split) if tensor_split else None}
