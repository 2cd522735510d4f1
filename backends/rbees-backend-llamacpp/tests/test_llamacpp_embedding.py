"""Embeddings of the llama.cpp backend against llama-cpp-python's own ``Llama.embed``."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from rbees_backend_llamacpp import LlamaCppBackend
from rbees_backend_llamacpp.embedding import EMBED_SEQS, pooling_of

from rbees_core import plugins
from rbees_core.backend import LoadedModel
from rbees_core.errors import InvalidParamsError
from rbees_core.models import DEFAULT_MODEL_REF, resolve_model

TEXTS = ["Bees make honey.", "The stock market fell sharply today.",
         "Les abeilles font du miel. Café, naïve, 日本語 😀",
         "A much longer text about pollination, flowers and the hive, " * 6]


@pytest.fixture(scope="module")
def path() -> str:
    return resolve_model(plugins.make_manager(), DEFAULT_MODEL_REF)


@pytest.fixture(scope="module")
def model(path: str) -> Iterator[LoadedModel]:
    loaded = LlamaCppBackend().load(path, device="cpu", slots=1, ctx=None, threads=2,
                                    progress=lambda s, f: None, embedding=True)
    yield loaded
    loaded.close()


def cosine_distance(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return 1 - dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def test_matches_llama_cpp_pythons_own_embed(model: LoadedModel, path: str) -> None:
    """``Llama(embedding=True)`` pools as the GGUF says, and SmolLM2's GGUF says nothing
    (llama.cpp then pools nothing: one vector per token); rbees pools by mean, so the
    reference is asked for mean pooling, normalised as rbees returns its vectors."""
    import llama_cpp

    ref = llama_cpp.Llama(path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                          n_ctx=2048, n_batch=2048, n_ubatch=2048, n_threads=2, verbose=False)
    try:
        expected = ref.embed(TEXTS, normalize=True)
    finally:
        ref.close()
    got = model.embed(TEXTS)
    assert got.passes == 1
    distances = [cosine_distance(a, b) for a, b in zip(got.vectors, expected, strict=True)]
    assert max(distances) < 1e-4, distances


def test_the_ggufs_pooling_type_else_mean(model: LoadedModel) -> None:
    import llama_cpp

    lib_model = model._model  # type: ignore[attr-defined]
    assert pooling_of(llama_cpp, lib_model) == llama_cpp.LLAMA_POOLING_TYPE_MEAN
    assert llama_cpp.llama_pooling_type(model._ctx) == llama_cpp.LLAMA_POOLING_TYPE_MEAN  # type: ignore[attr-defined]


def test_many_inputs_take_as_few_passes_as_fit(model: LoadedModel) -> None:
    texts = [f"Bee number {i} visits a flower." for i in range(EMBED_SEQS + 1)]
    out = model.embed(texts)
    assert out.passes == 2  # one more input than one pass holds
    alone = model.embed(texts[-1:])
    assert cosine_distance(out.vectors[-1], alone.vectors[0]) < 1e-6
    with pytest.raises(InvalidParamsError, match="tokens; this worker embeds at most"):
        model.embed(["bee " * (model.n_batch + 10)])


def test_a_generation_model_refuses_to_embed(path: str) -> None:
    loaded = LlamaCppBackend().load(path, device="cpu", slots=1, ctx=256, threads=2,
                                    progress=lambda s, f: None)
    try:
        with pytest.raises(InvalidParamsError, match="cannot embed"):
            loaded.embed(["Bees"])
    finally:
        loaded.close()


def test_the_preflight_estimate_covers_what_an_embedding_model_holds(
        model: LoadedModel, path: str) -> None:
    estimate = LlamaCppBackend().estimate_memory(path, device="cpu", slots=4, ctx=None,
                                                 embedding=True)
    assert estimate is not None
    assert model.memory_bytes <= estimate.total_bytes <= 1.5 * model.memory_bytes
