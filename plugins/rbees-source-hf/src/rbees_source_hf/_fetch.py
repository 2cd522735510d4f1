"""One file from the hub: metadata, a resumable transfer, verification, atomic placement.

Runs in a worker thread (see :meth:`rbees_source_hf.HfSource.download`). The protocol
pieces come from ``huggingface_hub``: :func:`hf_hub_url` (honours ``HF_ENDPOINT``),
:func:`get_hf_file_metadata` (the ``HEAD /resolve`` call: commit, ETag, size, CDN location)
and ``file_download.http_get`` (GET with ``Range: bytes=N-``, retries, and a check of the
received size). Bytes go to a partial file named after the remote ETag, so only the same
content is ever resumed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from rbees_core.errors import (
    ChecksumMismatchError,
    ConflictError,
    DownloadError,
    ModelNotFoundError,
    RbeesError,
)
from rbees_core.files import open_private, private_dir
from rbees_core.interfaces import DownloadProgress, DownloadResult
from rbees_source_hf import HfRef

Report = Callable[[DownloadProgress], None]
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_ENDPOINT = "https://huggingface.co"
HASH_BLOCK = 4 * 1024 * 1024


def endpoint() -> str | None:
    """``HF_ENDPOINT`` read now (huggingface_hub reads it once, at import)."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


@contextmanager
def _exclusive(lock_path: Path, what: str) -> Iterator[None]:
    import fcntl

    with open_private(lock_path, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(f"{what} is already being downloaded by another process",
                                details={"model": what}) from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _bar_class(report: Report) -> type:
    """A tqdm stand-in that forwards ``http_get``'s progress to ``report``."""

    class Bar:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0,
                     **kwargs: Any) -> None:
            self.total = total
            self.n = initial
            self._first = initial
            self._began = time.monotonic()
            self._emit()

        def _emit(self) -> None:
            elapsed = time.monotonic() - self._began
            rate = (self.n - self._first) / elapsed if elapsed > 0 else 0.0
            report(DownloadProgress(bytes_done=self.n, bytes_total=self.total, rate_bps=rate))

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            self._emit()

        def close(self) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    return Bar


def _metadata(ref: HfRef, hub: str | None) -> tuple[str, str, str | None, int | None]:
    """``(location, commit, etag, size)`` of ``ref`` from ``HEAD /resolve``."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = hub or DEFAULT_ENDPOINT
    url = hf_hub_url(ref.repo_id, ref.filename, revision=ref.revision, endpoint=hub)
    try:
        meta = get_hf_file_metadata(url, endpoint=hub, retry_on_errors=True)
    except GatedRepoError as exc:
        raise RbeesError(f"{ref} is a gated repository: accept its terms on the hub and set "
                         "HF_TOKEN", details={"model": str(ref)}) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"{ref}: repository {ref.repo_id} not found on {where} (or "
                                 "private: set HF_TOKEN)", details={"model": str(ref)}) from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"{ref}: revision {ref.revision!r} not found on {where}",
                                 details={"model": str(ref)}) from exc
    except RemoteEntryNotFoundError as exc:
        raise ModelNotFoundError(f"{ref}: file {ref.filename!r} not found in {ref.repo_id} on "
                                 f"{where}", details={"model": str(ref)}) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise DownloadError(f"{ref}: {where} answered HTTP {status}",
                            details={"model": str(ref)}) from exc
    except (httpx2.HTTPError, OSError) as exc:
        raise DownloadError(f"{ref}: cannot reach {where}: {exc}",
                            details={"model": str(ref)}) from exc
    if not meta.commit_hash or not meta.etag:
        raise DownloadError(f"{ref}: {where} does not look like a Hugging Face Hub endpoint "
                            "(no X-Repo-Commit or ETag)", details={"model": str(ref)})
    return meta.location, meta.commit_hash, meta.etag, meta.size


def _digests(path: Path, size: int, report: Report) -> tuple[str, str]:
    """``(sha256, git blob sha1)`` of ``path`` in one pass."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size)  # git's object id, not security
    done = 0
    began = time.monotonic()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            sha256.update(block)
            sha1.update(block)
            done += len(block)
            elapsed = time.monotonic() - began
            report(DownloadProgress(bytes_done=done, bytes_total=size, stage="verify",
                                    rate_bps=done / elapsed if elapsed > 0 else 0.0))
    return sha256.hexdigest(), sha1.hexdigest()


def fetch(ref: HfRef, models_dir: Path, *, sha256: str | None, progress: Report
          ) -> DownloadResult:
    """Download ``ref`` into ``models_dir``, resuming a partial file, and verify it."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    hub = endpoint()
    final = models_dir / ref.relative_path()
    partial_dir = models_dir / ".partial" / ref.relative_path().parent
    location, commit, etag, size = _metadata(ref, hub)
    lfs_sha256 = etag if etag and SHA256.match(etag) else None
    if sha256 and lfs_sha256 and sha256 != lfs_sha256:
        raise ChecksumMismatchError(
            f"{ref}: the hub's file has sha256 {lfs_sha256}, the catalog expects {sha256}; "
            "not downloading", details={"model": str(ref)})
    tag = (lfs_sha256 or etag or "unknown")[:16]
    partial = partial_dir / f"{final.name}.{tag}.part"

    with _exclusive(partial_dir / f"{final.name}.lock", str(ref)):
        for stale in partial_dir.glob(f"{final.name}.*.part"):
            if stale != partial:
                stale.unlink(missing_ok=True)
        have = partial.stat().st_size if partial.exists() else 0
        if size is not None and have > size:
            partial.unlink()
            have = 0
        if size is not None:
            free = shutil.disk_usage(partial_dir).free
            if free < size - have:
                raise RbeesError(f"{ref}: needs {(size - have) / 2**20:.0f} MiB more, "
                                 f"{free / 2**20:.0f} MiB free in {partial_dir}")
        headers = build_hf_headers()
        resolve_url = hub or DEFAULT_ENDPOINT
        if _origin(location) != _origin(resolve_url):
            headers.pop("authorization", None)  # signed CDN urls must not get the token
        try:
            with open_private(partial, "ab") as f:
                http_get(location, f, resume_size=have, headers=headers, expected_size=size,
                         displayed_filename=ref.filename,
                         tqdm_class=cast(Any, _bar_class(progress)))
        except RbeesError:
            raise
        except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
            got = partial.stat().st_size if partial.exists() else 0
            raise DownloadError(
                f"{ref}: download interrupted at {got} of {size or '?'} bytes ({exc}); run it "
                "again to resume", details={"model": str(ref), "bytes_done": got}) from exc
        got = partial.stat().st_size
        progress(DownloadProgress(bytes_done=got, bytes_total=size, rate_bps=0.0))
        actual, git_sha1 = _digests(partial, got, progress)
        expected = sha256 or lfs_sha256
        ok = actual == expected if expected else (git_sha1 == etag if etag and SHA1.match(etag)
                                                  else None)
        if ok is False:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatchError(
                f"{ref}: downloaded file does not match its checksum (expected "
                f"{expected or 'git ' + str(etag)}, got {actual}); removed it",
                details={"model": str(ref), "expected": expected or etag, "actual": actual})
        private_dir(final.parent)
        os.replace(partial, final)
    return DownloadResult(
        ref=str(ref), path=str(final), size_bytes=got, sha256=actual, source="hf",
        details={"repo": ref.repo_id, "file": ref.filename, "revision": ref.revision,
                 "commit": commit, "etag": etag, "endpoint": hub or DEFAULT_ENDPOINT,
                 "verified_against": "catalog" if sha256 else (
                     "lfs-sha256" if lfs_sha256 else ("git-sha1" if ok else "none"))})
