"""Which files a pool serves: ``file:`` references and plain paths stay inside the roots.

A pool takes model references from the network (pool-managerd's API) and from ``rbees-pool``
(run over SSH by ``rbees pool ... --host``). A ``file:`` reference, or a plain path, may name
only a file under the models directory (``[pool] models_dir``) or under one of the
directories of ``[sources.file] roots`` (``RBEES_SOURCES_FILE_ROOTS``, separated by ``:``),
checked after symlinks and ``..`` are resolved: ``file:/etc/passwd``, or a symlink inside a
root pointing outside it, is refused with a 400 naming the setting.

Other schemes (``pkg:``, ``hf:``) and catalog ids are not paths and pass; the catalog is the
operator's own configuration, so the ``file:`` sources it lists are trusted. A worker started
by hand (``rbees-workerd --model``) is not checked: its command line is the operator's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pluggy

from rbees_core.config import load_config
from rbees_core.errors import InvalidParamsError
from rbees_core.refs import split_scheme

SETTING = "[sources.file] roots"


class OutsideRootsError(InvalidParamsError):
    """A ``file:`` reference or path names a file outside the configured roots (400
    ``INVALID_PARAMS``; a usage error of ``rbees-pool``: exit status 2)."""

    exit_status: ClassVar[int] = 2


def roots() -> list[Path]:
    """The directories ``file:`` references may name, symlinks resolved: the models
    directory, then ``[sources.file] roots`` in their order."""
    config = load_config()
    dirs = [config.pool.models_path(), *(Path(r).expanduser() for r in config.sources.file.roots)]
    return list(dict.fromkeys(Path(os.path.realpath(d)) for d in dirs))


def local_path(pm: pluggy.PluginManager, ref: str) -> str | None:
    """The filesystem path ``ref`` names: the rest of a ``file:`` reference, a plain path;
    None for another scheme's reference, a catalog id and a bare name that names no file
    of the working directory."""
    parts = split_scheme(ref)
    if parts is not None:
        return parts[1] if parts[0] == "file" else None
    if "/" not in ref and os.sep not in ref:
        from rbees_core.catalog import configured_catalog

        # a bare name is a catalog id, or a file of the working directory if one is there
        # (an unknown name stays "not in the catalog")
        if configured_catalog(pm).get(ref) is not None or not os.path.lexists(ref):
            return None
    return ref


def confine(pm: pluggy.PluginManager, ref: str, field: str = "model") -> None:
    """Refuse ``ref`` when it names a file outside :func:`roots` (whether or not it exists:
    the answer must not tell what is on the host).

    Called by: the worker preflight (pool-managerd's ``POST /v2/workers/start``,
    ``rbees-pool worker spawn``) and :func:`rbees_core.pool.models.find` (``models info``,
    ``verify``, ``rm``). Raises :class:`OutsideRootsError` naming ``field`` and the setting.
    """
    raw = local_path(pm, ref)
    if raw is None:
        return
    real = Path(os.path.realpath(Path(raw).expanduser()))
    allowed = roots()
    if any(real == root or root in real.parents for root in allowed):
        return
    raise OutsideRootsError(
        field, f"{ref} is outside the directories a pool serves files from "
               f"({', '.join(map(str, allowed))}); to serve it, add its directory to "
               f"{SETTING} in the config file (or RBEES_SOURCES_FILE_ROOTS)")


__all__ = ["SETTING", "OutsideRootsError", "confine", "local_path", "roots"]
