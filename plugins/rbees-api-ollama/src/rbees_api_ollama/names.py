"""Ollama's model names (``name:tag``) over rbees' catalog ids and model references.

An Ollama client names a model ``name:tag`` (``smollm2:latest``, ``qwen2.5:7b``), maybe with
its registry's prefix (``registry.ollama.ai/library/``), or ``hf.co/OWNER/REPO:QUANT`` for a
Hugging Face repository. rbees knows catalog ids (``smollm2``, ``qwen2.5-7b``: Ollama's name
with ``-`` for ``:``), their aliases (``qwen2.5:7b``, ``qwen2.5``, ``NAME:latest``), and
references (``hf:OWNER/REPO/FILE``, ``pkg:...``). :meth:`Names.to_rbees` turns a name a client
sent into what rbees' jobs take, trying in order:

1. a reference whose scheme an installed model source handles (``hf:...``), as it is;
2. the name without the registry prefix, then with ``:latest`` dropped (``smollm2:latest``
   -> ``smollm2``) or added (``qwen2.5`` -> ``qwen2.5:latest``), then with its ``:`` as
   ``-`` (``qwen2.5:7b`` -> ``qwen2.5-7b``), each as a catalog id or alias (exact, then
   case-insensitively) or a model some pool holds under that name;
3. ``hf.co/OWNER/REPO[:QUANT]``: the catalog entry with a source in that repository whose
   quantization is ``QUANT`` (without one, or ``latest``: ``Q4_K_M`` as Ollama picks, else
   the first such entry);
4. otherwise the name unchanged, for rbees-orcd to refuse with a 404 naming it.

:meth:`Names.to_ollama` is the other way, for ``/api/tags`` and ``/api/ps``: a catalog entry
shows its first Ollama alias (one with a tag, ``smollm2:135m``), else ``ID:latest``; a
reference of a catalog entry shows the entry's name, any other reference itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from rbees_core.catalog import Catalog, CatalogEntry
from rbees_core.refs import split_scheme

LATEST = "latest"
#: prefixes Ollama clients may put before a name of Ollama's own registry
REGISTRY_PREFIXES = ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/")
#: prefixes of Ollama's Hugging Face names (``hf.co/OWNER/REPO:QUANT``)
HF_PREFIXES = ("hf.co/", "huggingface.co/")
#: the quantization Ollama picks in a Hugging Face repository when the name gives none
DEFAULT_QUANT = "Q4_K_M"


def aliases(entry: CatalogEntry) -> tuple[str, ...]:
    """The entry's other names (its catalog ``aliases``)."""
    found: Any = getattr(entry, "aliases", None) or ()
    return (found,) if isinstance(found, str) else tuple(str(a) for a in found)


@attrs.frozen
class Names:
    """The mapping over one catalog and the schemes of the installed model sources.

    Made once per rbees-orcd app by the plugin's routes (the catalog is read once, as
    rbees-orcd's admission reads it); ``held`` arguments are the ids and references the
    pools' heartbeats show now.
    """

    catalog: Catalog
    schemes: frozenset[str]

    def is_ref(self, name: str) -> bool:
        """Whether ``name`` is a reference of an installed model source (``hf:...``)."""
        parts = split_scheme(name)
        return parts is not None and parts[0] in self.schemes

    def to_rbees(self, name: str, held: Iterable[str] = ()) -> str:
        """The catalog id or reference an Ollama ``name`` means (see the module); the name
        itself when nothing matches. Never raises."""
        name = name.strip()
        if self.is_ref(name):
            return name
        bare = name
        for prefix in REGISTRY_PREFIXES:
            if bare.startswith(prefix):
                bare = bare[len(prefix):]
                break
        lowered = bare.lower()
        for prefix in HF_PREFIXES:
            if lowered.startswith(prefix):
                found = self._hf(bare[len(prefix):])
                return found if found is not None else name
        held_set = set(held)
        for candidate in _candidates(bare):
            entry = self._entry(candidate)
            if entry is not None:
                return entry.id
            if candidate in held_set:
                return candidate
        return name

    def to_ollama(self, model: str) -> str:
        """The name Ollama's listings show for a catalog id or a reference."""
        entry = self.catalog.get(model) or self.catalog.by_source(model)
        if entry is not None:
            tagged = [a for a in aliases(entry)
                      if ":" in a and not a.endswith(f":{LATEST}") and not self.is_ref(a)]
            return tagged[0] if tagged else f"{entry.id}:{LATEST}"
        if self.is_ref(model):
            return model
        return model if ":" in model else f"{model}:{LATEST}"

    def entry(self, name: str, held: Iterable[str] = ()) -> CatalogEntry | None:
        """The catalog entry an Ollama name means, if any."""
        model = self.to_rbees(name, held)
        return self.catalog.get(model) or self.catalog.by_source(model)

    def _entry(self, candidate: str) -> CatalogEntry | None:
        entry = self.catalog.get(candidate)
        if entry is not None:
            return entry
        folded = candidate.casefold()
        for entry in self.catalog:
            if entry.id.casefold() == folded or folded in (a.casefold() for a in aliases(entry)):
                return entry
        return None

    def _hf(self, rest: str) -> str | None:
        """The catalog id of ``OWNER/REPO[:QUANT]``, if the catalog has that repository."""
        repo, _, quant = rest.partition(":")
        prefix = f"hf:{repo.strip('/')}/".casefold()
        entries = [e for e in self.catalog
                   if any(s.casefold().startswith(prefix) for s in e.sources)]
        if not entries:
            return None
        wanted = (quant if quant and quant != LATEST else DEFAULT_QUANT).casefold()
        for entry in entries:
            if (entry.quantization or "").casefold() == wanted:
                return entry.id
        if quant and quant != LATEST:
            return None
        return entries[0].id


def _candidates(name: str) -> list[str]:
    """``name`` and its forms with ``:latest`` dropped or added, and with ``:`` as ``-``
    (the catalog's ids)."""
    out = [name]
    base, sep, tag = name.rpartition(":")
    if sep and tag == LATEST and base:
        out.append(base)
    elif not sep:
        out.append(f"{name}:{LATEST}")
    elif base:
        out.append(f"{base}-{tag}")
    return out


__all__ = ["DEFAULT_QUANT", "LATEST", "Names", "aliases"]
