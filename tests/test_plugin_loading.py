"""How the plugin manager finds and loads entry points: as importlib.metadata would, without
importing it, and without importing the plugins' implementations."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbees_core import plugins
from rbees_core.hookspecs import hookimpl

PLUGIN = textwrap.dedent("""
    from rbees_core.hookspecs import hookimpl

    @hookimpl
    def rbees_register_schedulers():
        return []
""")
DIST_FILES = {
    "rbees_extra_plugin.py": PLUGIN,
    "rbees_extra_plugin-2.5.dist-info/METADATA":
        "Metadata-Version: 2.1\nName: rbees-extra-plugin\nVersion: 2.5\n",
    "rbees_extra_plugin-2.5.dist-info/entry_points.txt":
        "# a comment\n[console_scripts]\nextra = rbees_extra_plugin:main\n\n"
        "[rbees]\nextra-plugin = rbees_extra_plugin\n",
}


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RBEES_DISABLED_PLUGINS", raising=False)
    monkeypatch.delenv("RBEES_DISABLE_PLUGIN_AUTOLOAD", raising=False)


@pytest.fixture
def forget_extra_plugin() -> Iterator[None]:
    yield
    sys.modules.pop("rbees_extra_plugin", None)


def metadata_entry_points(group: str) -> list[tuple[str, str, str]]:
    """What pluggy's own loader meets, in its order."""
    return [(ep.name, ep.value, str(dist._path))  # type: ignore[attr-defined]
            for dist in importlib.metadata.distributions()
            for ep in dist.entry_points if ep.group == group]


@pytest.mark.parametrize("group", ["rbees", "console_scripts", "pytest11"])
def test_entry_points_are_those_importlib_metadata_finds(group: str) -> None:
    assert plugins.installed_entry_points(group) == metadata_entry_points(group)


def test_a_distribution_directory_on_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              forget_extra_plugin: object) -> None:
    for name, text in DIST_FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = plugins.installed_entry_points("rbees")
    assert found is not None and found == metadata_entry_points("rbees")
    assert found[0] == ("extra-plugin", "rbees_extra_plugin",
                        str(tmp_path / "rbees_extra_plugin-2.5.dist-info"))
    pm = plugins.make_manager()
    info = {p.name: p for p in plugins.list_plugins(pm)}
    assert info["extra-plugin"].version == "2.5"
    assert info["extra-plugin"].hooks == ["rbees_register_schedulers"]
    assert info["backend-llamacpp"].version == plugins.distribution_version(
        "rbees-backend-llamacpp")
    assert [d.metadata["Name"] for p, d in pm.list_plugin_distributions()
            if p is pm.get_plugin("extra-plugin")] == ["rbees-extra-plugin"]


def test_a_zip_on_the_path_is_left_to_importlib_metadata(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_extra_plugin: object) -> None:
    archive = tmp_path / "extra.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, text in DIST_FILES.items():
            zipped.writestr(name, text)
    monkeypatch.syspath_prepend(str(archive))
    assert plugins.installed_entry_points("rbees") is None
    pm = plugins.make_manager()
    info = {p.name: p for p in plugins.list_plugins(pm)}
    assert info["extra-plugin"].version == "2.5"
    assert "backend-llamacpp" in info


def test_another_distribution_finder_is_left_to_importlib_metadata(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Finder:
        @staticmethod
        def find_distributions(context: object = None) -> list[object]:
            return []

    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, Finder])
    assert plugins.installed_entry_points("rbees") is None
    assert "backend-llamacpp" in dict(plugins.make_manager().list_name_plugin())


def test_an_entry_point_names_a_module_or_an_object() -> None:
    assert plugins.load_entry_point("rbees_core.hookspecs") is sys.modules["rbees_core.hookspecs"]
    assert plugins.load_entry_point("rbees_core.hookspecs : hookimpl [extra]") is hookimpl
    assert plugins.load_entry_point("rbees_core:plugins.make_manager") is plugins.make_manager
    with pytest.raises(ModuleNotFoundError):
        plugins.load_entry_point("rbees_no_such_module")


def test_loading_the_plugins_imports_none_of_their_implementations() -> None:
    code = textwrap.dedent("""
        import sys
        from rbees_core import plugins

        pm = plugins.make_manager()
        assert pm.get_plugin("transport-ssh") is not None
        heavy = ["importlib.metadata", "rbees_core.backend", "rbees_core.hosts",
                 "rbees_core.scheduling", "rbees_core.api.pool", "rbees_core.config",
                 "rbees_backend_llamacpp.backend", "rbees_backend_torch.backend",
                 "rbees_transport_http.transport", "rbees_transport_local.transport",
                 "rbees_transport_ssh.transport", "rbees_scheduler_builtin.policies",
                 "rbees_scheduler_script.scheduler", "logging", "asyncio"]
        print(",".join(m for m in heavy if m in sys.modules))
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RBEES_DISABLED_PLUGINS", "RBEES_DISABLE_PLUGIN_AUTOLOAD")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_a_plugin_names_its_classes_without_importing_them() -> None:
    import rbees_scheduler_builtin
    from rbees_scheduler_builtin.policies import DEFAULT_POLICY, LeastLoaded

    assert rbees_scheduler_builtin.LeastLoaded is LeastLoaded
    assert rbees_scheduler_builtin.DEFAULT_POLICY == DEFAULT_POLICY == "least-loaded"
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        rbees_scheduler_builtin.Nothing  # noqa: B018


def test_the_distributions_are_those_pluggys_own_loader_records() -> None:
    """The fast loader keeps its own list (pluggy's is private); what the list methods give
    must be what pluggy's own loader gives for the same plugins."""
    import pluggy

    from rbees_core import hookspecs

    ours = plugins.make_manager()
    theirs = pluggy.PluginManager(hookspecs.PROJECT)
    theirs.add_hookspecs(hookspecs)
    theirs.load_setuptools_entrypoints(plugins.ENTRY_POINT_GROUP)

    def named(pm: pluggy.PluginManager, pairs: list[tuple[object, object]]) -> list[tuple]:
        names = {id(plugin): name for name, plugin in pm.list_name_plugin()}
        return sorted((names[id(plugin)], str(getattr(dist, "_path", dist)))
                      for plugin, dist in pairs)

    assert named(ours, ours.list_plugin_distributions()) == named(
        theirs, theirs.list_plugin_distributions())
    facades = {(d.project_name, d.version) for _, d in ours.list_plugin_distinfo()}
    assert facades == {(d.project_name, d.version) for _, d in theirs.list_plugin_distinfo()}
    assert ("rbees-backend-llamacpp", plugins.distribution_version("rbees-backend-llamacpp")
            ) in facades
