"""rbees plugin: ``hf:OWNER/REPO[@REVISION]/FILE`` model files from the Hugging Face Hub.

Cheap to import (every rbees command loads it): ``huggingface_hub`` and asyncio are imported
inside :meth:`HfSource.download`, the transfer lives in :mod:`rbees_source_hf._fetch`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import attrs

from rbees_core.errors import InvalidParamsError, RbeesError
from rbees_core.hookspecs import hookimpl
from rbees_core.interfaces import DownloadResult, ModelSource, ProgressCallback

if TYPE_CHECKING:
    from rbees_core.api.pool import DownloadProgress
    from rbees_source_hf._catalog import HfCatalogFields

_NAME = r"[A-Za-z0-9_.-]+"
_REF = re.compile(rf"^(?P<owner>{_NAME})/(?P<repo>{_NAME})(?:@(?P<rev>{_NAME}))?/(?P<file>.+)$")


@attrs.frozen
class HfRef:
    """A parsed ``hf:`` reference (without the scheme)."""

    repo_id: str
    filename: str
    revision: str = "main"

    @classmethod
    def parse(cls, ref: str) -> HfRef | None:
        match = _REF.match(ref)
        if not match:
            return None
        file = match["file"]
        parts = file.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\\" in file:
            return None
        return cls(repo_id=f"{match['owner']}/{match['repo']}", filename=file,
                   revision=match["rev"] or "main")

    def __str__(self) -> str:
        at = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf:{self.repo_id}{at}/{self.filename}"

    def relative_path(self) -> Path:
        """Where the file lives under the models directory."""
        owner, repo = self.repo_id.split("/")
        folder = repo if self.revision == "main" else f"{repo}@{self.revision}"
        return Path("hf", owner, folder, *self.filename.split("/"))


class DownloadCancelledError(RbeesError):
    """The caller stopped the download; what arrived is kept for a later resume."""

    code = "DOWNLOAD_CANCELLED"


class HfSource(ModelSource):
    """Files of Hugging Face Hub repositories, cached under the pool's models directory, or
    taken from (and, when configured, downloaded into) the user's Hugging Face cache."""

    name: ClassVar[str] = "hf"
    scheme: ClassVar[str] = "hf"
    can_download: ClassVar[bool] = True

    @classmethod
    def catalog_fields(cls) -> type[HfCatalogFields]:
        from rbees_source_hf._catalog import HfCatalogFields

        return HfCatalogFields

    @classmethod
    def validate_ref(cls, rest: str, field: str = "model") -> None:
        if HfRef.parse(rest) is None:
            raise InvalidParamsError(field, f"hf:{rest} is not hf:OWNER/REPO[@REVISION]/FILE")

    @classmethod
    def check_catalog_ref(cls, rest: str, fields: HfCatalogFields | None, field: str) -> None:
        if fields is not None and f"hf:{rest}" != fields.ref:
            raise InvalidParamsError(
                field, f"must be {fields.ref!r} (from hf_repo, revision, hf_file)")

    def __init__(self, models_dir: str | Path | None = None, *,
                 use_hf_cache: bool | None = None,
                 download_to_hf_cache: bool | None = None) -> None:
        """``models_dir``: where downloads go (default: the pool's models directory).
        ``use_hf_cache`` / ``download_to_hf_cache``: see ``[sources.hf]``
        (:class:`rbees_core.config.HfSourceConfig`; read from the config when None)."""
        self._models_dir = Path(models_dir) if models_dir is not None else None
        self._use_hf_cache = use_hf_cache
        self._download_to_hf_cache = download_to_hf_cache

    def _settings(self) -> tuple[bool, bool]:
        if self._use_hf_cache is None or self._download_to_hf_cache is None:
            from rbees_core.config import load_config

            hf = load_config().sources.hf
            if self._use_hf_cache is None:
                self._use_hf_cache = hf.use_hf_cache
            if self._download_to_hf_cache is None:
                self._download_to_hf_cache = hf.download_to_hf_cache
        return self._use_hf_cache, self._download_to_hf_cache

    @property
    def models_dir(self) -> Path:
        if self._models_dir is None:
            from rbees_core.config import load_config

            self._models_dir = load_config().pool.models_path()
        return self._models_dir

    def resolve(self, ref: str) -> str | None:
        parsed = HfRef.parse(ref)
        if parsed is None:
            return None
        path = self.models_dir / parsed.relative_path()
        if path.is_file():
            return str(path)
        if self._settings()[0]:  # the user's Hugging Face cache, before any download
            from rbees_source_hf._cache import cached

            return cached(parsed)
        return None

    async def download(self, ref: str, *, sha256: str | None = None,
                       progress: ProgressCallback | None = None) -> DownloadResult:
        self.validate_ref(ref)
        parsed = HfRef.parse(ref)
        assert parsed is not None
        import asyncio
        import threading

        from rbees_source_hf._fetch import fetch

        cancelled = threading.Event()

        def report(update: DownloadProgress) -> None:
            if cancelled.is_set():
                raise DownloadCancelledError(f"download of {parsed} cancelled")
            if progress is not None:
                progress(update)

        use_cache, into_cache = self._settings()
        try:
            if use_cache or into_cache:
                from rbees_source_hf import _cache

                found = _cache.cached(parsed)
                if found is not None:
                    return await asyncio.to_thread(_cache.from_cache, parsed, found,
                                                   self.models_dir, sha256=sha256,
                                                   progress=report)
                if into_cache:
                    return await asyncio.to_thread(_cache.fetch_into_cache, parsed,
                                                   self.models_dir, sha256=sha256,
                                                   progress=report)
            return await asyncio.to_thread(fetch, parsed, self.models_dir, sha256=sha256,
                                           progress=report)
        except asyncio.CancelledError:
            cancelled.set()  # the transfer thread stops at its next progress report
            raise


@hookimpl
def rbees_register_model_sources() -> list[type[ModelSource]]:
    return [HfSource]
