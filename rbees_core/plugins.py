"""The plugin manager factory and typed lookups of registered classes.

Load order: blocked names (``RBEES_DISABLED_PLUGINS``, comma-separated entry-point or
plugin names) -> the program's builtin plugins -> entry points of group ``rbees`` (off when
``RBEES_DISABLE_PLUGIN_AUTOLOAD`` is set) -> ``check_pending()``, so a misspelled hook
implementation fails at start-up instead of being silently ignored.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import attrs
import pluggy

from rbees_core import hookspecs
from rbees_core.errors import PluginError

T = TypeVar("T")
ENTRY_POINT_GROUP = "rbees"


def disabled_plugins() -> set[str]:
    raw = os.environ.get("RBEES_DISABLED_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def make_manager(builtins: Iterable[tuple[str, object]] = (), *, autoload: bool | None = None
                 ) -> pluggy.PluginManager:
    """A fresh plugin manager with the hookspecs, ``builtins`` and the installed plugins.

    ``builtins`` are ``(name, plugin)`` pairs. ``autoload`` None follows
    ``RBEES_DISABLE_PLUGIN_AUTOLOAD``. Raises :class:`PluginError` when a plugin fails to
    load or implements a hook that does not exist.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    for name, plugin in builtins:
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
    if autoload is None:
        autoload = not os.environ.get("RBEES_DISABLE_PLUGIN_AUTOLOAD")
    if autoload:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as exc:  # a broken third-party plugin must say so clearly
            raise PluginError(f"failed to load a plugin of group {ENTRY_POINT_GROUP!r}: {exc}"
                              ) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return pm


def builtin_plugins() -> list[tuple[str, object]]:
    """Plugins every program carries (none yet beyond those found by entry point)."""
    return []


@attrs.frozen
class PluginInfo:
    name: str
    version: str | None
    hooks: list[str]


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Name, distribution version and implemented hooks of every registered plugin."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(id(plugin))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append(PluginInfo(name=name, version=dist.version if dist else None, hooks=hooks))
    return sorted(out, key=lambda p: p.name)


def _registry(pm: pluggy.PluginManager, results: list[list[Any]], key: str, kind: str
              ) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for batch in results:
        for cls in batch or []:
            ident = getattr(cls, key)
            if ident in found and found[ident] is not cls:
                raise PluginError(f"two {kind}s named {ident!r}: {found[ident]!r} and {cls!r}")
            found[ident] = cls
    return found


def backends(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Registered backend classes by name."""
    return _registry(pm, pm.hook.rbees_register_backends(), "name", "backend")


def model_sources(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Registered model source classes by scheme."""
    return _registry(pm, pm.hook.rbees_register_model_sources(), "scheme", "model source")


def transports(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Registered transport classes by name."""
    return _registry(pm, pm.hook.rbees_register_transports(), "name", "transport")


def gpu_inventories(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Registered GPU inventory classes by name."""
    return _registry(pm, pm.hook.rbees_register_gpu_inventories(), "name", "GPU inventory")


def schedulers(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Registered scheduler classes by name."""
    return _registry(pm, pm.hook.rbees_register_schedulers(), "name", "scheduler")


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
