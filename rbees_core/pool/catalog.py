"""The model catalog: short ids (``tinyllama``, ``smollm2``) for known model files.

The catalog ships inside this package as ``catalog.toml`` (so an installed rbees finds it);
``[pool] catalog_file`` names an extra TOML file in the same format whose entries are added,
replacing builtin entries of the same id. Entries are validated strictly with
:func:`rbees_core.schema.from_mapping`: a bad entry fails with the TOML path of its key.

Used by ``rbees-pool models ...``, :func:`rbees_core.models.resolve_model` (a catalog id is
resolved through its ``sources`` in order) and pool-managerd.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from rbees_core.errors import ConfigError, InvalidParamsError, ModelNotFoundError
from rbees_core.models import validate_ref
from rbees_core.schema import field, from_mapping, limits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ID_PATTERN = r"[A-Za-z0-9_.-]{1,128}"
#: Schemes a catalog source may use (each is a model source plugin).
SOURCE_SCHEMES = ("pkg", "file", "hf")
SHA256_PATTERN = r"[0-9a-f]{64}"


@attrs.frozen
class CatalogEntry:
    """One known model file and where to find or fetch it."""

    id: str = attrs.field(metadata=limits(pattern=ID_PATTERN, doc="short id"))
    name: str = attrs.field(metadata=limits(min_length=1, max_length=200))
    hf_repo: str = attrs.field(metadata=limits(pattern=r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+"))
    hf_file: str = attrs.field(metadata=limits(min_length=1, max_length=256,
                                               forbid=r"(^/|\.\.|\s)"))
    size_bytes: int = attrs.field(metadata=limits(minimum=1))
    context_length: int = attrs.field(metadata=limits(minimum=1, maximum=10_000_000))
    license: str = attrs.field(metadata=limits(min_length=1, max_length=64))
    sources: list[str] = attrs.field(metadata=limits(max_items=16))
    sha256: str | None = field(default=None, pattern=SHA256_PATTERN)
    revision: str = field(default="main", pattern=r"[A-Za-z0-9_.-]{1,64}")
    quantization: str | None = field(default=None, max_length=32)

    @property
    def hf_ref(self) -> str:
        """``hf:OWNER/REPO[@REVISION]/FILE`` (the revision only when it is not ``main``)."""
        at = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf:{self.hf_repo}{at}/{self.hf_file}"

    def check(self) -> None:
        """Rules across fields: sources are valid, known-scheme references."""
        if not self.sources:
            raise InvalidParamsError("sources", "must list at least one source")
        for i, ref in enumerate(self.sources):
            validate_ref(ref, f"sources[{i}]")
            scheme, sep, rest = ref.partition(":")
            if not sep or scheme not in SOURCE_SCHEMES or not rest:
                schemes = ", ".join(f"{s}:" for s in SOURCE_SCHEMES)
                raise InvalidParamsError(f"sources[{i}]",
                                         f"must be one of {schemes}... (got {ref!r})")
            if scheme == "hf" and ref != self.hf_ref:
                raise InvalidParamsError(
                    f"sources[{i}]", f"must be {self.hf_ref!r} (from hf_repo, revision, hf_file)")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Catalog:
    """The entries in file order, looked up by id or by source reference."""

    entries: tuple[CatalogEntry, ...]

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, model_id: str) -> CatalogEntry | None:
        return next((e for e in self.entries if e.id == model_id), None)

    def require(self, model_id: str) -> CatalogEntry:
        """The entry of ``model_id``; :class:`ModelNotFoundError` listing the ids otherwise."""
        entry = self.get(model_id)
        if entry is None:
            raise ModelNotFoundError(
                f"{model_id!r} is not in the model catalog (known: "
                f"{', '.join(e.id for e in self.entries)})", details={"model": model_id})
        return entry

    def by_source(self, ref: str) -> CatalogEntry | None:
        """The entry that lists ``ref`` among its sources, if any."""
        return next((e for e in self.entries if ref in e.sources), None)


def parse_catalog(text: str, origin: str) -> Catalog:
    """Parse and validate catalog TOML; :class:`ConfigError` names ``origin`` and the key."""
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
    seen: set[str] = set()
    for i, raw in enumerate(models):
        try:
            entry = from_mapping(CatalogEntry, raw, path=f"models[{i}]")
        except InvalidParamsError as exc:
            message = exc.message
            if not exc.field.startswith("models["):  # raised by check(): add the entry path
                message = f"models[{i}].{message}"
            raise ConfigError(f"{origin}: {message}", details={"key": exc.field}) from exc
        if entry.id in seen:
            raise ConfigError(f"{origin}: models[{i}].id: duplicate id {entry.id!r}")
        seen.add(entry.id)
        entries.append(entry)
    return Catalog(tuple(entries))


@functools.cache
@functools.cache
def builtin_catalog() -> Catalog:
    """The catalog shipped with rbees (``rbees_core/pool/catalog.toml``)."""
    text = (Path(__file__).parent / "catalog.toml").read_text(encoding="utf-8")
    return parse_catalog(text, "rbees_core/pool/catalog.toml")


def load_catalog(extra: str | Path | None = None) -> Catalog:
    """The builtin catalog plus the entries of ``extra`` (same id: ``extra`` wins)."""
    base = builtin_catalog()
    if extra is None:
        return base
    path = Path(extra).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the catalog file: {exc.strerror}") from exc
    added = parse_catalog(text, str(path))
    ids = {e.id for e in added}
    return Catalog(tuple(e for e in base if e.id not in ids) + added.entries)


def configured_catalog() -> Catalog:
    """The catalog as configured: builtin plus ``[pool] catalog_file``."""
    from rbees_core.config import load_config

    return load_catalog(load_config().pool.catalog_file)
