"""No key or token in any log a test run wrote (issue 25): a session-end scan.

The pytest plugin (:mod:`rbees_core.testing`) collects the secrets of the run:

- every credential rbees mints has a shape (:data:`SHAPES`: API keys ``rbk_``, join tokens
  ``rbj_``, control tokens ``rbc_``, worker tokens ``rbw_``): found by shape, wherever it is;
- operator tokens are free text: the plugin notes the ``RBEES_API_TOKEN`` of every process
  the run starts (its environment, ``--env RBEES_API_TOKEN=`` arguments), the files named by
  ``RBEES_API_TOKEN_FILE``, the credential files the daemons write (``*.control``,
  ``*.callback``, ``*.join``, ``*token*``), and whatever a test hands to :func:`remember`.

At the end of the session every log file under the run's temporary directory (``*.log``,
``*.err``, ``*stderr*``) and every test's captured stderr and log records are searched for
them; a hit fails the run (exit status 1) with one line per leak naming the file and the
secret's first characters, never the secret. ``RBEES_LEAK_SCAN=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

#: the shapes of the credentials rbees mints (rbees_core.auth, rbees_core.pool.credentials)
SHAPES = re.compile(r"rbk_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}|rbj_[A-Za-z0-9_.-]+_[0-9a-f]{64}"
                    r"|rbc_[0-9a-f]{64}|rbw_[A-Za-z0-9_.-]+_[0-9a-f]{48}")
LOG_NAMES = re.compile(r"(\.log|\.err|stderr[^/]*)$")
SECRET_FILES = re.compile(r"(\.control|\.callback|\.join|token[^/]*)$")
MIN_LENGTH = 16  # shorter free-text tokens are refused by the daemons anyway
MAX_LOG_BYTES = 64 * 2**20

_known: set[str] = set()


def remember(secret: str | None) -> None:
    """Count ``secret`` among the run's secrets (a token a test made up)."""
    if secret and len(secret) >= MIN_LENGTH:
        _known.add(secret)


def known() -> frozenset[str]:
    return frozenset(_known)


@attrs.frozen
class Leak:
    where: str
    secret: str

    def line(self) -> str:
        return f"{self.where}: holds a secret ({self.secret[:6]}...)"


def harvest(root: Path) -> set[str]:
    """The credential files under ``root``: their single-line contents."""
    found: set[str] = set()
    for path in _files(root, SECRET_FILES):
        try:
            if path.stat().st_size > 4096:
                continue
            text = path.read_text(errors="replace").strip()
        except OSError:
            continue
        if text and "\n" not in text and " " not in text and len(text) >= MIN_LENGTH:
            found.add(text)
    return found


def _files(root: Path, pattern: re.Pattern[str]) -> Iterator[Path]:
    for folder, _, names in os.walk(root):
        for name in names:
            if pattern.search(name):
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink():
                    yield path


def search(text: str, secrets: Iterable[str]) -> set[str]:
    """The secrets in ``text``: any of ``secrets``, and anything of a credential's shape."""
    hits = {m.group(0) for m in SHAPES.finditer(text)}
    hits |= {s for s in secrets if s in text}
    return hits


def scan(root: Path, texts: Iterable[tuple[str, str]] = (),
         secrets: Iterable[str] = ()) -> list[Leak]:
    """Every leak in the log files under ``root`` and in ``texts`` (``(where, text)``)."""
    every = set(secrets) | harvest(root)
    leaks = []
    for path in _files(root, LOG_NAMES):
        try:
            if path.stat().st_size > MAX_LOG_BYTES:
                continue
            text = path.read_text(errors="replace")
        except OSError:
            continue
        leaks += [Leak(str(path), s) for s in sorted(search(text, every))]
    for where, text in texts:
        leaks += [Leak(where, s) for s in sorted(search(text, every))]
    return leaks


# -- the plugin ----------------------------------------------------------------------------

_captured: list[tuple[str, str]] = []
_original_init: Any = None


def _note_process(args: Any, env: Any) -> None:
    environ = env if env is not None else os.environ
    remember(environ.get("RBEES_API_TOKEN"))
    token_file = environ.get("RBEES_API_TOKEN_FILE")
    if token_file:
        with contextlib.suppress(OSError):
            remember(Path(token_file).read_text().strip())
    words = [args] if isinstance(args, str | bytes) else list(args or [])
    for word in words:
        if isinstance(word, str) and "RBEES_API_TOKEN=" in word:
            remember(word.split("RBEES_API_TOKEN=", 1)[1].split()[0].strip("'\""))


def enabled() -> bool:
    return os.environ.get("RBEES_LEAK_SCAN", "1") != "0"


def configure(config: pytest.Config) -> None:
    """Start noting the secrets of the processes the run starts."""
    global _original_init
    if not enabled() or _original_init is not None:
        return
    _original_init = subprocess.Popen.__init__

    def init(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        with contextlib.suppress(Exception):  # noting must never break a test's process
            _note_process(args, kwargs.get("env"))
        _original_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = init  # type: ignore[method-assign]


def unconfigure() -> None:
    global _original_init
    if _original_init is not None:
        subprocess.Popen.__init__ = _original_init  # type: ignore[method-assign]
        _original_init = None


def note_report(report: pytest.TestReport) -> None:
    """Keep a test's captured stderr and log records for the scan."""
    if not enabled():
        return
    for name, text in report.sections:
        if "stderr" in name or "log" in name:
            _captured.append((f"{report.nodeid} ({name})", text))


def finish(session: pytest.Session) -> None:
    """Scan the run's logs; a leak fails the run."""
    if not enabled():
        return
    remember(os.environ.get("RBEES_API_TOKEN"))
    try:
        root = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return
    leaks = scan(Path(root), _captured, known())
    if not leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["secrets in the logs of this run (rbees_core.testing.leaks):",
             *(leak.line() for leak in leaks[:50])]
    if reporter is not None:
        reporter.write_sep("=", "leaked secrets", red=True)
        for line in lines:
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
