"""The plugin as rbees loads it: routes on rbees-orcd only, and an rbees kernel older than the
plugin disables the plugin (logged), never the daemon that loads it."""

from __future__ import annotations

import sys

import pytest
import rbees_api_ollama

SUBMODULES = ("chat", "common", "embed", "models")


def test_routes_on_rbees_orcd_only() -> None:
    paths = {r.path for r in rbees_api_ollama.rbees_register_routes(program="rbees-orcd")}
    assert {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/tags",
            "/api/show", "/api/ps", "/api/pull", "/api/delete", "/api/version"} <= paths
    for program in ("pool-managerd", "rbees-workerd"):
        assert rbees_api_ollama.rbees_register_routes(program=program) == []


def test_an_older_kernel_disables_the_plugin_not_the_daemon(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "rbees_core.protocols", None)  # not in that kernel
    for name in SUBMODULES:
        monkeypatch.delitem(sys.modules, f"rbees_api_ollama.{name}", raising=False)
        monkeypatch.delattr(rbees_api_ollama, name, raising=False)
    assert rbees_api_ollama.rbees_register_routes(program="rbees-orcd") == []
    logged = capsys.readouterr()
    assert "plugin_disabled" in logged.out + logged.err
