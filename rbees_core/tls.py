"""TLS for the daemons and their clients (CONTRACT section 1, "TLS").

Serving: rbees-orcd, pool-managerd and rbees-workerd take ``--tls-cert`` and ``--tls-key``
(PEM files; ``[tls] cert`` / ``key`` in the config file, ``RBEES_TLS_CERT`` /
``RBEES_TLS_KEY``). :func:`server_tls` checks them before the daemon starts (both or
neither, readable, the key not readable by others, the pair loads) so that a bad file is
one line, not a traceback from uvicorn. A pool with TLS starts its workers with the same
certificate: they listen on the pool's address, which its certificate names.

Verifying: every client of a daemon (``rbees``, ``rbees-pool``, the http transport,
heartbeats, rbees-orcd's calls to pools and workers, a pool's calls to its workers, a
worker's ready callback) takes its ``verify`` from :func:`client_context`: the CA file named
by ``--ca-file`` / ``RBEES_CA_FILE`` / ``[tls] ca_file`` alone when one is named, else the
system's trust store plus, when it exists, the home-lab CA ``rbees up --tls`` made under the
data directory (:func:`home_ca`). ``--ca-file`` sets ``RBEES_CA_FILE`` for the process
(:func:`use_ca_file`), so the workers a pool starts inherit it.

A failed verification is :func:`tls_failure`'s one line, never a traceback. This module is
cheap to import (``ssl`` is loaded when a context is made); the certificates themselves
are made by :mod:`rbees_core.tls_ca` (the ``cryptography`` library).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from rbees_core.errors import ConfigError

if TYPE_CHECKING:
    import ssl

CA_ENV = "RBEES_CA_FILE"
CERT_ENV = "RBEES_TLS_CERT"
KEY_ENV = "RBEES_TLS_KEY"
#: where ``rbees up --tls`` keeps the home-lab CA and this host's certificate
TLS_DIR = "tls"


@attrs.frozen
class ServerTLS:
    """A daemon's certificate chain and key (absolute paths, checked by :func:`server_tls`)."""

    cert: str
    key: str

    def argv(self) -> list[str]:
        """The flags that give a program started here the same certificate."""
        return ["--tls-cert", self.cert, "--tls-key", self.key]


def scheme(tls: ServerTLS | bool | None) -> str:
    """``https`` when ``tls``, else ``http``."""
    return "https" if tls else "http"


def server_tls(cert: str | None, key: str | None, *, config: Any = None) -> ServerTLS | None:
    """The TLS settings of a daemon: the flags, else the config file's ``[tls]`` section
    (``RBEES_TLS_CERT`` / ``RBEES_TLS_KEY`` applied), else None (plain HTTP). Raises
    :class:`ConfigError` when only one is given, a file cannot be read, the key is readable
    by others, or the pair does not load. Called by the daemons' commands before serving."""
    section = getattr(config, "tls", None)
    cert = cert or getattr(section, "cert", None)
    key = key or getattr(section, "key", None)
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
    cert_path, key_path = Path(cert).expanduser().resolve(), Path(key).expanduser().resolve()
    for what, path in (("--tls-cert", cert_path), ("--tls-key", key_path)):
        if not path.is_file():
            raise ConfigError(f"{what} {path}: no such file")
    if key_path.stat().st_mode & stat.S_IRWXO:
        raise ConfigError(f"--tls-key {key_path} is readable by others; chmod 600 it")
    import ssl

    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_cert_chain(str(cert_path), str(key_path))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-cert {cert_path} / --tls-key {key_path} do not load: "
                          f"{getattr(exc, 'reason', None) or exc}") from exc
    return ServerTLS(cert=str(cert_path), key=str(key_path))


def use_ca_file(path: str | None) -> None:
    """Verify every daemon this process calls with the CA certificates in ``path`` (and
    those alone): sets ``RBEES_CA_FILE`` (absolute), which the programs it starts inherit.
    None leaves the environment as it is. Raises :class:`ConfigError` when the file does
    not hold a certificate. Called for ``--ca-file`` and ``[tls] ca_file``."""
    if not path:
        return
    resolved = Path(path).expanduser().resolve()
    import ssl

    try:
        ssl.create_default_context(cafile=str(resolved))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--ca-file {resolved}: not a CA certificate file "
                          f"({getattr(exc, 'strerror', None) or exc})") from exc
    os.environ[CA_ENV] = str(resolved)


def home_ca() -> Path:
    """The home-lab CA certificate ``rbees up --tls`` makes (it may not exist)."""
    from rbees_core.config import rbees_home

    return rbees_home() / TLS_DIR / "ca.pem"


_FROM_CONFIG: dict[str, str | None] = {}


def _configured_ca() -> str | None:
    explicit = os.environ.get(CA_ENV)
    if explicit:
        return explicit
    where = os.environ.get("RBEES_CONFIG", "")
    if where not in _FROM_CONFIG:  # read once per process and file
        from rbees_core.config import load_config

        try:
            _FROM_CONFIG[where] = load_config().tls.ca_file
        except ConfigError:
            _FROM_CONFIG[where] = None  # the program that reads it says what is wrong
    return _FROM_CONFIG[where]


_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def client_context() -> ssl.SSLContext:
    """The ``verify`` of every client of a daemon: the configured CA file alone, else the
    system store plus :func:`home_ca` when it exists. Made once per setting and process
    (loading a store costs milliseconds); raises :class:`ConfigError` for a CA file that
    cannot be read."""
    import ssl

    explicit = _configured_ca()
    lab = home_ca()
    extra = str(lab) if explicit is None and lab.is_file() else None
    key = (explicit, extra)
    context = _CONTEXTS.get(key)
    if context is None:
        try:
            context = ssl.create_default_context(cafile=explicit)
            if extra is not None:
                context.load_verify_locations(cafile=extra)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"CA file {explicit or extra}: cannot be read "
                              f"({getattr(exc, 'strerror', None) or exc})") from exc
        _CONTEXTS[key] = context
    return context


def tls_failure(exc: BaseException) -> str | None:
    """What went wrong with TLS in ``exc`` (an httpx error and its causes), in words; None
    when it is not a TLS failure. For the one-line errors of the command lines."""
    import ssl

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return (f"its TLS certificate is not trusted here ({current.verify_message}); "
                    f"give the CA that signed it with --ca-file or {CA_ENV}")
        if isinstance(current, ssl.SSLError):
            reason = current.reason or str(current)
            if "WRONG_VERSION_NUMBER" in str(reason) or "RECORD_LAYER" in str(reason):
                return "the TLS handshake failed: it serves plain HTTP (use an http:// URL)"
            return f"the TLS handshake failed ({reason})"
        todo += [current.__cause__, current.__context__,
                 *(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))]
    return None


def describe_unreachable(what: str, url: str, exc: BaseException) -> str:
    """``cannot reach WHAT at URL: ...`` in one line, naming a TLS failure as such."""
    why = tls_failure(exc)
    if why is not None:
        return f"cannot reach {what} at {url}: {why}"
    return f"cannot reach {what} at {url} ({type(exc).__name__})"
