"""A loopback stand-in for the Hugging Face Hub's file protocol, for tests.

It speaks what ``huggingface_hub`` (2.x, ``file_download.py``) uses to fetch one file:

- ``HEAD|GET /{repo}/resolve/{revision}/{filename}``. A regular (git) file answers 200 with
  ``X-Repo-Commit``, ``ETag`` (the git blob sha1) and ``Content-Length``. An LFS file answers
  302 to a second origin standing for the CDN, with ``X-Repo-Commit``, ``X-Linked-Etag`` (its
  sha256) and ``X-Linked-Size``; a different origin makes the client stop there, as with the
  real hub's CDN redirects, and fetch the ``Location`` without the token.
- ``HEAD|GET /cdn/{sha256}`` on the CDN origin: the bytes, with ``Accept-Ranges`` and
  ``Range: bytes=N-`` / ``bytes=N-M`` answered 206 with ``Content-Range``.
- Unknown repos, revisions and files answer 404 with ``X-Error-Code`` ``RepoNotFound``,
  ``RevisionNotFound`` or ``EntryNotFound``.

Every request is recorded (:attr:`FakeHub.requests`), so a test can see a resumed download's
``Range`` header. ``throttle_bps`` slows the CDN down so a download can be interrupted
midway. Used by the ``fake_hub`` fixture of :mod:`rbees_core.testing`; point ``HF_ENDPOINT``
at :attr:`FakeHub.endpoint`.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import attrs

DEFAULT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def git_blob_sha1(content: bytes) -> str:
    """The git object id of ``content`` (what the hub sends as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@attrs.define
class HubFile:
    """One file in a fake repo. ``advertised_sha256`` differing from the content's sha256
    makes the hub serve a corrupted file."""

    content: bytes
    lfs: bool = True
    advertised_sha256: str | None = None

    @property
    def sha256(self) -> str:
        return self.advertised_sha256 or hashlib.sha256(self.content).hexdigest()


@attrs.frozen
class SeenRequest:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub, role: str) -> None:
        self.hub = hub
        self.role = role
        super().__init__((hub.host, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client killed mid-transfer is part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        hub = self.server.hub
        hub.requests.append(SeenRequest(self.server.role, self.command, self.path,
                                        {k.lower(): v for k, v in self.headers.items()}))
        try:
            if self.server.role == "cdn":
                self._cdn(body=body)
            else:
                self._resolve(body=body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, code: str, status: int = 404) -> None:
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _resolve(self, *, body: bool) -> None:
        hub = self.server.hub
        match = _RESOLVE.match(unquote(self.path.split("?", 1)[0]))
        if not match:
            self._error("RepoNotFound")
            return
        repo, rev, name = match["repo"], match["rev"], match["file"]
        if repo not in hub.repos:
            self._error("RepoNotFound")
            return
        if rev not in (hub.revision, hub.commit):
            self._error("RevisionNotFound")
            return
        file = hub.repos[repo].get(name)
        if file is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if file.lfs:
            self.send_response(302)
            self.send_header("Location", f"{hub.cdn_endpoint}/cdn/{file.sha256}")
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(len(file.content)))
            self.send_header("ETag", f'"{git_blob_sha1(file.sha256.encode())}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_bytes(file.content, etag=git_blob_sha1(file.content), body=body,
                         extra={"X-Repo-Commit": hub.commit})

    def _cdn(self, *, body: bool) -> None:
        hub = self.server.hub
        sha = self.path.split("?", 1)[0].rpartition("/")[2]
        file = next((f for files in hub.repos.values() for f in files.values()
                     if f.lfs and f.sha256 == sha), None)
        if file is None or not self.path.startswith("/cdn/"):
            self._error("EntryNotFound")
            return
        self._send_bytes(file.content, etag=sha, body=body, throttle=True)

    def _send_bytes(self, content: bytes, *, etag: str, body: bool, throttle: bool = False,
                    extra: dict[str, str] | None = None) -> None:
        start, end = 0, len(content) - 1
        ranged = _RANGE.match(self.headers.get("Range", ""))
        if ranged:
            start = int(ranged[1])
            end = min(int(ranged[2]), end) if ranged[2] else end
            if start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(content)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(206 if ranged else 200)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if not body:
            return
        view = memoryview(content)[start:end + 1]
        step = 64 * 1024
        began = time.monotonic()
        for offset in range(0, len(view), step):
            self.wfile.write(view[offset:offset + step])
            rate = self.server.hub.throttle_bps if throttle else None
            if rate:
                ahead = (offset + step) / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)


class FakeHub:
    """Two loopback HTTP servers (hub and CDN) serving :class:`HubFile` s from memory."""

    def __init__(self, *, commit: str = DEFAULT_COMMIT, revision: str = "main",
                 throttle_bps: float | None = None, host: str = "127.0.0.1") -> None:
        self.host = host  # another address serves simulated hosts (rbees_core.testing.hosts)
        self.commit = commit
        self.revision = revision
        self.throttle_bps = throttle_bps
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.requests: list[SeenRequest] = []
        self._servers = [_Server(self, "hub"), _Server(self, "cdn")]
        self._threads: list[threading.Thread] = []

    def add(self, repo: str, filename: str, content: bytes, *, lfs: bool = True,
            advertised_sha256: str | None = None) -> HubFile:
        file = HubFile(content=content, lfs=lfs, advertised_sha256=advertised_sha256)
        self.repos.setdefault(repo, {})[filename] = file
        return file

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self._servers[0].server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://{self.host}:{self._servers[1].server_address[1]}"

    def ranges(self) -> list[str]:
        """The ``Range`` headers of the CDN GETs so far."""
        return [r.headers["range"] for r in self.requests
                if r.server == "cdn" and r.method == "GET" and "range" in r.headers]

    def start(self) -> FakeHub:
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"fake-hub-{server.role}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)


@contextmanager
def running_hub(**kwargs: Any) -> Iterator[FakeHub]:
    hub = FakeHub(**kwargs).start()
    try:
        yield hub
    finally:
        hub.stop()
