from __future__ import annotations

from pathlib import Path

import pluggy
import pytest
from rbees_source_file import FileSource

from rbees_core import plugins
from rbees_core.errors import ModelNotFoundError
from rbees_core.models import resolve_model


def test_loads_through_its_entry_point(rbees_pm: pluggy.PluginManager) -> None:
    assert plugins.model_sources(rbees_pm)["file"] is FileSource
    names = {p.name for p in plugins.list_plugins(rbees_pm)}
    assert "source-file" in names


def test_file_refs_and_plain_paths_resolve(rbees_pm: pluggy.PluginManager,
                                          tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    folder = tmp_path / "hf-folder"
    folder.mkdir()
    assert resolve_model(rbees_pm, f"file:{model}") == str(model)
    assert resolve_model(rbees_pm, f"file:{folder}") == str(folder)
    assert resolve_model(rbees_pm, str(model)) == str(model)


def test_a_missing_file_is_model_not_found(rbees_pm: pluggy.PluginManager,
                                           tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        resolve_model(rbees_pm, f"file:{tmp_path / 'absent.gguf'}")


def test_without_the_plugin_the_scheme_is_unknown(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("RBEES_DISABLED_PLUGINS", "source-file")
    pm = plugins.make_manager()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="no model source handles file:"):
        resolve_model(pm, f"file:{tmp_path / 'm.gguf'}")
