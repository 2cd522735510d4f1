"""The user's own Hugging Face cache: hf: files found there are not downloaded again, and
(``[sources.hf] download_to_hf_cache = true``) new ones can be downloaded into it. Either
way the models directory gets a symbolic link to the cache's file where a download would
have gone (:func:`_link`), so the pool records and lists it like any download.

The cache is huggingface_hub's (``models--OWNER--REPO/snapshots/COMMIT/FILE``, shared with
transformers, ``hf download`` and other tools); its location is read at each call, not at
import, so a changed ``HF_HOME`` counts: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from rbees_core.errors import ChecksumMismatchError, DownloadError, RbeesError
from rbees_core.files import private_dir
from rbees_core.interfaces import DownloadResult
from rbees_source_hf import HfRef
from rbees_source_hf._fetch import (
    DEFAULT_ENDPOINT,
    Report,
    _bar_class,
    _digests,
    _metadata,
    endpoint,
)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache of this environment, read now."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    cache = env.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def cached(ref: HfRef) -> str | None:
    """The path of ``ref`` in the user's cache (its revision's snapshot), or None. Cheap
    when the repository was never cached (huggingface_hub is imported only when it was).
    Raises nothing."""
    cache = hf_cache_dir()
    if not (cache / f"models--{ref.repo_id.replace('/', '--')}").is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(ref.repo_id, ref.filename, cache_dir=cache,
                                       revision=ref.revision)
    except (ValueError, OSError):
        return None
    return found if isinstance(found, str) else None


def _link(ref: HfRef, models_dir: Path, target: Path) -> Path:
    """A symbolic link to ``target`` where a download of ``ref`` would have gone in the
    models directory: the pool's record, listing and ``models rm`` work on it as on a
    download, nothing is written into the user's cache, and removing the link never
    removes the user's file."""
    link = models_dir / ref.relative_path()
    private_dir(link.parent)
    temporary = link.with_name(f".{link.name}.{os.getpid()}.link")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, link)
    return link


def from_cache(ref: HfRef, path: str, models_dir: Path, *, sha256: str | None,
               progress: Report) -> DownloadResult:
    """``path`` (from :func:`cached` or a download into the cache) as a download's result:
    its sha256 computed (a catalog's checksum checked; a mismatch leaves the user's file
    alone and raises :class:`ChecksumMismatchError`), then linked from ``models_dir``
    (the result's ``path``; ``details["hf_cache_file"]`` is the cache's)."""
    file = Path(path)
    size = file.stat().st_size
    actual, _ = _digests(file, size, progress)
    if sha256 and actual != sha256:
        raise ChecksumMismatchError(
            f"{ref}: the file in the Hugging Face cache ({path}) has sha256 {actual}, the "
            f"catalog expects {sha256}", details={"model": str(ref), "expected": sha256,
                                                  "actual": actual})
    snapshot = file.parents[len(Path(ref.filename).parts) - 1]
    commit = snapshot.name if snapshot.parent.name == "snapshots" else None
    link = _link(ref, models_dir, file)
    return DownloadResult(
        ref=str(ref), path=str(link), size_bytes=size, sha256=actual, source="hf",
        details={"repo": ref.repo_id, "file": ref.filename, "revision": ref.revision,
                 "commit": commit, "hf_cache_file": str(file),
                 "verified_against": "catalog" if sha256 else "none"})


def fetch_into_cache(ref: HfRef, models_dir: Path, *, sha256: str | None, progress: Report
                     ) -> DownloadResult:
    """Download ``ref`` into the user's cache with huggingface_hub (its own resume and
    locking), then check it like :func:`from_cache`. Raises the errors of
    :func:`rbees_source_hf._fetch.fetch` (not found, gated, unreachable)."""
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    hub = endpoint()
    _metadata(ref, hub)  # the same clear errors as a download into the models directory
    try:
        path = hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision,
                               cache_dir=hf_cache_dir(), endpoint=hub,
                               tqdm_class=cast(Any, _bar_class(progress)))
    except RbeesError:
        raise
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        raise DownloadError(f"{ref}: download into the Hugging Face cache failed "
                            f"({hub or DEFAULT_ENDPOINT}): {exc}",
                            details={"model": str(ref)}) from exc
    return from_cache(ref, str(path), models_dir, sha256=sha256, progress=progress)
