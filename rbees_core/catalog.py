"""The model catalog: short ids (``qwen2.5-7b``, ``smollm2``) for known model files.

The catalog ships inside this package as ``catalog.toml`` (so an installed rbees finds it);
``[pool] catalog_file`` names an extra TOML file in the same format whose entries are added,
replacing builtin entries of the same id. Entries are validated strictly with
:func:`rbees_core.schema.from_mapping`: a bad entry fails with the TOML path of its key.

**Ids.** An id is ``FAMILY-SIZE[-VARIANT]``, lower case: the Ollama ``name:tag`` of the same
model with the ``:`` turned into ``-`` (``qwen2.5:7b`` is ``qwen2.5-7b``,
``llama3.2:1b`` is ``llama3.2-1b``, ``nomic-embed-text:v1.5`` is
``nomic-embed-text-v1.5``); a second quantization of a model appends it
(``llama3.1-8b-q8``). An id has no ``:``, because ``NAME:REST`` is a model reference
(``hf:...``, ``pkg:...``; :mod:`rbees_core.refs`) and ``gemma3:4b`` would read as scheme
``gemma3``. Each entry's ``aliases`` list the other names it answers to: its Ollama names
(``qwen2.5:7b``; a bare family name and ``NAME:latest`` where Ollama's default tag is this
model) and the ids of earlier catalogs (``qwen``, ``llama32``). :meth:`Catalog.get`
resolves an alias to its entry; everything that stores or compares models uses the entry's
:attr:`CatalogEntry.id` (rbees-orcd renames a job's alias to the id on admission).
An alias may contain ``:`` but must not start with an installed source's scheme.

The catalog knows only the fields every entry has (:class:`CatalogEntry`). Each entry lists
model references in ``sources``; the model source plugin of each reference's scheme checks
that reference (:meth:`rbees_core.interfaces.ModelSource.validate_ref`) and owns the keys it
declares in :meth:`~rbees_core.interfaces.ModelSource.catalog_fields` (``hf``: ``hf_repo``,
``hf_file``, ``revision``), which stay flat in the TOML file and in :meth:`CatalogEntry.to_dict`.
A reference whose scheme no installed source handles is kept unchecked, with the keys no
installed source claims, so that one catalog file serves hosts with different plugins; on an
entry whose schemes are all installed, an unclaimed key is an unknown field.

``size_bytes`` and ``sha256`` are optional: a download takes the file's size and LFS sha256
from the hub's metadata and verifies the file against them (``rbees-source-hf``).
:meth:`Catalog.search` finds entries by id, alias, name, family, tags, kind and size class
(``rbees-pool models search``).

Used by :func:`rbees_core.models.resolve_model` (a catalog id is resolved through its
``sources`` in order), ``rbees-pool models ...``, pool-managerd and rbees-orcd.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from rbees_core import plugins
from rbees_core.errors import ConfigError, InvalidParamsError, ModelNotFoundError
from rbees_core.refs import split_scheme, validate_ref
from rbees_core.schema import check_string, field, from_mapping, limits

if TYPE_CHECKING:
    import pluggy

    from rbees_core.interfaces import ModelSource

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ID_PATTERN = r"[A-Za-z0-9_.-]{1,128}"
#: Aliases may carry an Ollama tag (``qwen2.5:7b``).
ALIAS_PATTERN = r"[A-Za-z0-9_.][A-Za-z0-9_.:-]{0,127}"
SHA256_PATTERN = r"[0-9a-f]{64}"
#: Size classes by parameter count (billions): below each bound, that class.
SIZE_CLASSES: tuple[tuple[float, str], ...] = (
    (4.0, "small"), (14.0, "medium"), (40.0, "large"), (float("inf"), "xlarge"))
#: Model sources by scheme, as :func:`rbees_core.plugins.model_sources` gives them.
Sources = Mapping[str, "type[ModelSource]"]


@attrs.frozen
class CatalogEntry:
    """One known model file and where to find or fetch it.

    ``kind`` says what a worker of it serves: ``chat`` (generation) or ``embedding`` (an
    embedding worker, ``rbees-workerd --embedding``). ``checked`` says where the entry's
    repository and file name were checked (a model card URL). ``source_fields`` holds, by
    scheme, what each installed source made of its own keys (an instance of its
    ``catalog_fields`` class); ``unchecked`` holds the keys that belong to sources not
    installed here, as they were written.
    """

    id: str = attrs.field(metadata=limits(pattern=ID_PATTERN, doc="short id"))
    name: str = attrs.field(metadata=limits(min_length=1, max_length=200))
    context_length: int = attrs.field(metadata=limits(minimum=1, maximum=10_000_000))
    license: str = attrs.field(metadata=limits(min_length=1, max_length=64))
    sources: list[str] = attrs.field(metadata=limits(max_items=16))
    size_bytes: int | None = field(default=None, minimum=1)
    sha256: str | None = field(default=None, pattern=SHA256_PATTERN)
    quantization: str | None = field(default=None, max_length=32)
    kind: Literal["chat", "embedding"] = "chat"
    family: str | None = field(default=None, pattern=r"[a-z0-9][a-z0-9_.-]{0,63}")
    parameters_b: float | None = field(default=None, minimum=0.001, maximum=100_000)
    tags: list[str] = field(factory=list, max_items=16, item_max_length=32,
                            forbid=r"[^a-z0-9_.-]")
    aliases: list[str] = field(factory=list, max_items=16, item_max_length=128)
    checked: str | None = field(default=None, max_length=300, forbid=r"\s")
    source_fields: Mapping[str, Any] = attrs.field(factory=dict)
    unchecked: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def core_keys(cls) -> tuple[str, ...]:
        """The keys every entry has, whatever its sources."""
        return tuple(f.name for f in attrs.fields(cls)
                     if f.name not in ("source_fields", "unchecked"))

    @property
    def size_class(self) -> str | None:
        """``small`` (< 4B parameters), ``medium`` (< 14B), ``large`` (< 40B) or ``xlarge``;
        None when the parameter count is not recorded."""
        if self.parameters_b is None:
            return None
        return next(name for bound, name in SIZE_CLASSES if self.parameters_b < bound)

    def names(self) -> tuple[str, ...]:
        """The id, then the aliases."""
        return (self.id, *self.aliases)

    def to_dict(self) -> dict[str, Any]:
        """The entry as one flat mapping, as it is written in the TOML file (plus defaults
        and the derived ``size_class``)."""
        out = {key: getattr(self, key) for key in self.core_keys()}
        for key in ("sources", "tags", "aliases"):
            out[key] = list(out[key])
        out["size_class"] = self.size_class
        for fields in self.source_fields.values():
            out.update(attrs.asdict(fields))
        out.update(self.unchecked)
        return out


@attrs.frozen
class Catalog:
    """The entries in file order, looked up by id, alias or source reference."""

    entries: tuple[CatalogEntry, ...]
    _by_name: dict[str, CatalogEntry] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        by_name: dict[str, CatalogEntry] = {}
        for entry in reversed(self.entries):  # the first entry that names it wins
            for alias in entry.aliases:
                by_name[alias] = entry
        by_name.update((e.id, e) for e in self.entries)  # an id beats any alias
        object.__setattr__(self, "_by_name", by_name)

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, model_id: str) -> CatalogEntry | None:
        """The entry whose id or alias is ``model_id``; None when none is."""
        return self._by_name.get(model_id)

    def require(self, model_id: str) -> CatalogEntry:
        """The entry of ``model_id``; :class:`ModelNotFoundError` listing the ids otherwise."""
        entry = self.get(model_id)
        if entry is None:
            raise ModelNotFoundError(
                f"{model_id!r} is not in the model catalog (known: "
                f"{', '.join(e.id for e in self.entries)})", details={"model": model_id})
        return entry

    def canonical(self, model: str) -> str:
        """The id of the entry ``model`` names (an id or alias); ``model`` itself otherwise."""
        entry = self.get(model)
        return entry.id if entry is not None else model

    def by_source(self, ref: str) -> CatalogEntry | None:
        """The entry that lists ``ref`` among its sources, if any."""
        return next((e for e in self.entries if ref in e.sources), None)

    def search(self, text: str) -> list[CatalogEntry]:
        """The entries matching ``text``, best first (:func:`search_rows`). Called by
        ``rbees-pool models search``."""
        by_id = {e.id: e for e in self.entries}
        return [by_id[row["id"]] for row in search_rows([e.to_dict() for e in self.entries],
                                                          text)]


#: The keys of a catalog row that a search looks in.
SEARCHED_KEYS = ("id", "aliases", "name", "family", "tags", "kind", "size_class",
                 "quantization")


def search_rows(rows: Sequence[Mapping[str, Any]], text: str) -> list[Mapping[str, Any]]:
    """The catalog rows (:meth:`CatalogEntry.to_dict`, as ``rbees-pool models catalog
    --format json`` prints them) matching every word of ``text``: each a case-insensitive
    substring of the row's id, aliases, name, family, tags, kind, size class or
    quantization. An exact id or alias comes first, then ids and aliases that start with
    the text, then the rest in catalog order; an empty ``text`` matches every row.

    Called by :meth:`Catalog.search` and by ``rbees pool models search --host``, which
    searches the catalog rows a host sent (keys a host does not send match nothing)."""
    words = text.lower().split()
    query = " ".join(words)

    def values(row: Mapping[str, Any], key: str) -> list[str]:
        value = row.get(key)
        items = value if isinstance(value, list) else [value]
        return [str(v).lower() for v in items if v not in (None, "")]

    def rank(row: Mapping[str, Any]) -> int:
        names = values(row, "id") + values(row, "aliases")
        if query in names:
            return 0
        return 1 if any(n.startswith(query) for n in names) else 2

    found = []
    for row in rows:
        haystack = " ".join(v for key in SEARCHED_KEYS for v in values(row, key))
        if all(w in haystack for w in words):
            found.append(row)
    return sorted(found, key=rank)  # stable: catalog order within a rank


def parse_entry(raw: Any, path: str, sources: Sources) -> CatalogEntry:
    """One ``[[models]]`` table; :class:`InvalidParamsError` names the key under ``path``.

    Called by :func:`parse_catalog`. ``sources`` are the installed model sources by scheme:
    each checks its references and parses the keys of its ``catalog_fields``.
    """
    if not isinstance(raw, Mapping):
        raise InvalidParamsError(path, "must be a table")
    core_keys = set(CatalogEntry.core_keys())
    classes = {scheme: fields for scheme, cls in sources.items()
               if (fields := cls.catalog_fields()) is not None}
    claimed = {scheme: attrs.fields_dict(fields) for scheme, fields in classes.items()}
    taken = core_keys.union(*claimed.values())
    unchecked = {k: v for k, v in raw.items() if k not in taken}
    listed = raw.get("sources")
    refs_seen = [r for r in listed if isinstance(r, str)] if isinstance(listed, list) else []
    schemes = {parts[0] for parts in map(split_scheme, refs_seen) if parts is not None}
    # keys no installed source claims may belong to a source installed elsewhere, but only
    # when the entry lists a scheme no installed source handles; otherwise they are typos
    if unchecked and not schemes - set(sources):
        raise InvalidParamsError(f"{path}.{next(iter(unchecked))}", "unknown field")
    entry = from_mapping(CatalogEntry, {k: v for k, v in raw.items() if k in core_keys},
                         path=path)
    if not entry.sources:
        raise InvalidParamsError(f"{path}.sources", "must list at least one source")
    for i, alias in enumerate(entry.aliases):
        where = f"{path}.aliases[{i}]"
        check_string(alias, where, {"pattern": ALIAS_PATTERN})
        parts = split_scheme(alias)
        if alias == entry.id or (parts is not None and parts[0] in sources):
            raise InvalidParamsError(where, f"{alias!r} is the entry's id or a model "
                                            "reference, not an alias")
    refs: list[tuple[str, str, str]] = []  # (field, scheme, rest)
    for i, ref in enumerate(entry.sources):
        where = f"{path}.sources[{i}]"
        validate_ref(ref, where)
        parts = split_scheme(ref)
        if parts is None or not parts[1]:
            raise InvalidParamsError(where, f"must be SCHEME:REFERENCE (got {ref!r})")
        refs.append((where, *parts))
    owned: dict[str, Any] = {}
    for scheme, names in claimed.items():
        mine = {k: v for k, v in raw.items() if k in names}
        if mine or scheme in schemes:
            owned[scheme] = from_mapping(classes[scheme], mine, path=path)
    for where, scheme, rest in refs:
        if scheme in sources:
            sources[scheme].validate_ref(rest, where)
            sources[scheme].check_catalog_ref(rest, owned.get(scheme), where)
    return attrs.evolve(entry, source_fields=owned, unchecked=unchecked)


def parse_catalog(text: str, origin: str, sources: Sources) -> Catalog:
    """Parse and validate catalog TOML; :class:`ConfigError` names ``origin`` and the key.

    ``sources`` are the installed model sources by scheme
    (:func:`rbees_core.plugins.model_sources`).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"models"}
    if unknown:
        raise ConfigError(f"{origin}: {sorted(unknown)[0]}: unknown key")
    models = data.get("models", [])
    if not isinstance(models, list):
        raise ConfigError(f"{origin}: models: must be an array of tables")
    entries: list[CatalogEntry] = []
    seen: dict[str, str] = {}  # id or alias -> the id of the entry that has it
    for i, raw in enumerate(models):
        try:
            entry = parse_entry(raw, f"models[{i}]", sources)
        except InvalidParamsError as exc:
            raise ConfigError(f"{origin}: {exc.message}", details={"key": exc.field}) from exc
        if entry.id in seen:
            raise ConfigError(f"{origin}: models[{i}].id: duplicate id {entry.id!r}"
                              + ("" if seen[entry.id] == entry.id
                                 else f" (an alias of {seen[entry.id]!r})"))
        for j, alias in enumerate(entry.aliases):
            if alias in seen:
                raise ConfigError(f"{origin}: models[{i}].aliases[{j}]: {alias!r} already "
                                  f"names {seen[alias]!r}")
        seen.update((name, entry.id) for name in entry.names())
        entries.append(entry)
    return Catalog(tuple(entries))


BUILTIN = Path(__file__).with_name("catalog.toml")


@functools.lru_cache(maxsize=8)
def _builtin(sources: tuple[tuple[str, type[ModelSource]], ...]) -> Catalog:
    text = BUILTIN.read_text(encoding="utf-8")
    return parse_catalog(text, "rbees_core/catalog.toml", dict(sources))


def builtin_catalog(pm: pluggy.PluginManager) -> Catalog:
    """The catalog shipped with rbees (``rbees_core/catalog.toml``), read once per set of
    installed model sources."""
    return _builtin(tuple(sorted(plugins.model_sources(pm).items())))


def load_catalog(pm: pluggy.PluginManager, extra: str | Path | None = None) -> Catalog:
    """The builtin catalog plus the entries of ``extra`` (same id: ``extra`` wins)."""
    base = builtin_catalog(pm)
    if extra is None:
        return base
    path = Path(extra).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the catalog file: {exc.strerror}") from exc
    added = parse_catalog(text, str(path), plugins.model_sources(pm))
    ids = {e.id for e in added}
    return Catalog(tuple(e for e in base if e.id not in ids) + added.entries)


def configured_catalog(pm: pluggy.PluginManager) -> Catalog:
    """The catalog as configured: builtin plus ``[pool] catalog_file``."""
    from rbees_core.config import load_config

    return load_catalog(pm, load_config().pool.catalog_file)


__all__ = ["Catalog", "CatalogEntry", "builtin_catalog", "configured_catalog",
           "load_catalog", "parse_catalog", "parse_entry", "search_rows"]
