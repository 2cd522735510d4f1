"""The rbees error tree and the wire error envelope.

Every error rbees raises on purpose derives from :class:`RbeesError`. Each class carries
the contract's ``code`` (UPPER_SNAKE), the HTTP ``status`` a daemon answers with, and
whether a client may retry. CLIs turn any ``RbeesError`` into one line and exit with its
``exit_status`` (1; 2 for the usage errors that say so); daemons
turn it into the envelope of CONTRACT section 1::

    RbeesError                      INTERNAL              500
    +-- InvalidParamsError          INVALID_PARAMS        400
    +-- PayloadTooLargeError        PAYLOAD_TOO_LARGE     413
    +-- UnauthenticatedError        UNAUTHENTICATED       401
    +-- NotFoundError               NOT_FOUND             404
    |   +-- ModelNotFoundError      MODEL_NOT_FOUND       404
    |       +-- ModelNotOnHostError MODEL_NOT_FOUND       409 (pool preflight)
    +-- MethodNotAllowedError       METHOD_NOT_ALLOWED    405
    +-- ConflictError               CONFLICT              409
    |   +-- NoCapacityError         NO_CAPACITY           409 (the job can never be placed)
    +-- BackendUnavailableError     BACKEND_UNAVAILABLE   409
    +-- UnavailableError            UNAVAILABLE           503 (retriable)
    |   +-- AllSlotsBusyError       ALL_SLOTS_BUSY        503 (retriable)
    |   +-- DrainingError           DRAINING              503 (retriable)
    |   +-- NotReadyError           NOT_READY             503 (retriable)
    +-- ModelLoadError              MODEL_LOAD_FAILED     500
    +-- DownloadError               DOWNLOAD_FAILED       502 (retriable)
    +-- ChecksumMismatchError       CHECKSUM_MISMATCH     502
    +-- GitError                    GIT_FAILED            500
    +-- ConfigError                 CONFIG_INVALID        500
    +-- PluginError                 PLUGIN_ERROR          500
    |   +-- UnknownPluginError      PLUGIN_ERROR          500 (no plugin of that kind and name)
    +-- TransportError              TRANSPORT_FAILED      502 (retriable)
        +-- HostUnreachableError    HOST_UNREACHABLE      502 (retriable)
        +-- HostKeyError            HOST_KEY_UNTRUSTED    502
        +-- HostAuthError           HOST_AUTH_FAILED      502
        +-- RemoteProgramMissingError  REMOTE_PROGRAM_MISSING  502
        +-- UnsupportedCommandError UNSUPPORTED_COMMAND   400
    +-- PoolCommandError            POOL_COMMAND_FAILED   502 (a pool's command failed there)

Library errors are mapped at the boundary with ``raise ... from``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar


class RbeesError(Exception):
    """Root of every deliberate rbees error.

    ``details`` travels in the envelope's ``details`` object; keep it JSON-serialisable.
    """

    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False
    #: a CLI's exit status for it (CONTRACT section 6: 1 error, 2 usage error)
    exit_status: ClassVar[int] = 1

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def envelope(self, correlation_id: str) -> dict[str, Any]:
        return envelope(
            self.code, self.message, retriable=self.retriable, details=self.details,
            correlation_id=correlation_id,
        )


class InvalidParamsError(RbeesError):
    """A request or config value broke a rule; ``details.field`` names it."""

    code = "INVALID_PARAMS"
    status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message, details={"field": field})
        self.field = field


class PayloadTooLargeError(RbeesError):
    code = "PAYLOAD_TOO_LARGE"
    status = 413


class UnauthenticatedError(RbeesError):
    code = "UNAUTHENTICATED"
    status = 401


class ForbiddenError(RbeesError):
    """The credential is valid but its scopes (or model allow-list) do not cover the route."""

    code = "FORBIDDEN"
    status = 403


class RateLimitedError(RbeesError):
    """An API key's rate limit is spent; answers carry ``Retry-After`` (whole seconds)."""

    code = "RATE_LIMITED"
    status = 429
    retriable = True

    def __init__(self, message: str, *, retry_after_s: int,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details={"retry_after_ms": retry_after_s * 1000,
                                           **(details or {})})
        self.retry_after = retry_after_s


class NotFoundError(RbeesError):
    code = "NOT_FOUND"
    status = 404


class ModelNotFoundError(NotFoundError):
    code = "MODEL_NOT_FOUND"


class ModelNotOnHostError(ModelNotFoundError):
    """A pool's preflight found no such model on its host: a conflict with the request
    (409, like the other preflight failures), not a missing API resource."""

    status = 409


class MethodNotAllowedError(RbeesError):
    code = "METHOD_NOT_ALLOWED"
    status = 405


class ConflictError(RbeesError):
    code = "CONFLICT"
    status = 409


class NoCapacityError(ConflictError):
    """The job can never be placed: no pool holds its model and no source can download it,
    or it fits no device (:mod:`rbees_core.feasibility`). Raised by ``rbees jobs submit``
    without a daemon; rbees-orcd ends such a job with this code instead."""

    code = "NO_CAPACITY"


class BackendUnavailableError(RbeesError):
    """The backend, or the device asked of it, is not usable in this installation."""

    code = "BACKEND_UNAVAILABLE"
    status = 409


class UnavailableError(RbeesError):
    """Temporarily unable to serve; answers carry ``Retry-After``."""

    code = "UNAVAILABLE"
    status = 503
    retriable = True
    retry_after_s: ClassVar[int] = 1

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        details = {"retry_after_ms": self.retry_after_s * 1000, **(details or {})}
        super().__init__(message, details=details)


class AllSlotsBusyError(UnavailableError):
    code = "ALL_SLOTS_BUSY"


class DrainingError(UnavailableError):
    code = "DRAINING"
    retry_after_s = 5


class NotReadyError(UnavailableError):
    code = "NOT_READY"


class ModelLoadError(RbeesError):
    code = "MODEL_LOAD_FAILED"


class DownloadError(RbeesError):
    """Fetching a model failed on the way (network, remote answer); trying again may work.

    What was already received is kept, so a retry resumes where this one stopped.
    """

    code = "DOWNLOAD_FAILED"
    status = 502
    retriable = True


class ChecksumMismatchError(RbeesError):
    """A model file's content does not match its known sha256; the bad file was removed."""

    code = "CHECKSUM_MISMATCH"
    status = 502


class GitError(RbeesError):
    """A git operation on the pool's checkout failed or was refused (dirty tree, no remote)."""

    code = "GIT_FAILED"


class ConfigError(RbeesError):
    """Invalid configuration; the message starts with the TOML path of the bad key."""

    code = "CONFIG_INVALID"


class PluginError(RbeesError):
    code = "PLUGIN_ERROR"


class UnknownPluginError(PluginError):
    """No registered class of ``kind`` is called ``name``; the message lists those that are.

    Raised by :func:`rbees_core.plugins.lookup`. Where the contract gives the case its own
    code (a worker's or pool's unknown backend is ``BACKEND_UNAVAILABLE``, an unknown
    reference scheme ``MODEL_NOT_FOUND``) the caller maps it with ``raise ... from``, keeping
    the message. ``context`` (a host, a flag) starts the message when given.
    """

    def __init__(self, kind: str, name: str, installed: Iterable[str], *,
                 missing: str = "no {kind} named {name!r} is installed",
                 context: str | None = None) -> None:
        self.kind, self.name, self.installed = kind, name, sorted(installed)
        message = (f"{missing.format(kind=kind, name=name)} "
                   f"(installed: {', '.join(self.installed) or 'none'})")
        super().__init__(f"{context}: {message}" if context else message,
                         details={"kind": kind, "name": name, "installed": self.installed})


class TransportError(RbeesError):
    """A pool host could not be driven: the connection or the transport failed, not the
    command (a command that ran and failed is a result with its exit code)."""

    code = "TRANSPORT_FAILED"
    status = 502
    retriable = True


class HostUnreachableError(TransportError):
    """No connection to the host within its connect timeout (refused, no route, no answer)."""

    code = "HOST_UNREACHABLE"


class HostKeyError(TransportError):
    """The host's SSH key is unknown, changed or revoked; nothing was sent to it."""

    code = "HOST_KEY_UNTRUSTED"
    retriable = False


class HostAuthError(TransportError):
    """The host refused our credentials (ssh keys and agent, or the API token)."""

    code = "HOST_AUTH_FAILED"
    retriable = False


class RemoteProgramMissingError(TransportError):
    """The host has no ``rbees-pool`` at the configured path."""

    code = "REMOTE_PROGRAM_MISSING"
    retriable = False


class UnsupportedCommandError(TransportError):
    """The host's transport cannot carry this command (the http transport maps only some)."""

    code = "UNSUPPORTED_COMMAND"
    status = 400
    retriable = False


class PoolCommandError(RbeesError):
    """A pool host ran a command and it failed there, with an error whose class is not
    known here (``rbees-pool`` exited non-zero: its one error line is the message).
    ``exit_code`` is the remote program's (1 error, 2 usage error, 130 interrupted), so
    ``rbees pool`` exits with it."""

    code = "POOL_COMMAND_FAILED"
    status = 502

    def __init__(self, message: str, *, exit_code: int = 1,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.exit_code = exit_code


def _subclasses(cls: type[RbeesError]) -> list[type[RbeesError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def from_envelope(code: str, message: str, *, details: dict[str, Any] | None = None
                  ) -> RbeesError:
    """The error another rbees program reported (an envelope, or a JSON ``error`` event):
    the first class of this module's tree with ``code`` that takes ``(message, details=)``,
    else a :class:`PoolCommandError` with ``{"code": code}`` in its details. Called by the
    pool clients (:mod:`rbees_core.pool_client`).

    Only this module's classes are candidates: subclasses defined elsewhere (pool-core's)
    exist only once their module is imported, and the answer must not depend on that."""
    for cls in _subclasses(RbeesError):
        if cls.code == code and cls is not RbeesError and cls.__module__ == __name__:
            try:
                return cls(message, details=details)
            except TypeError:  # another constructor (InvalidParamsError)
                break
    return PoolCommandError(message, details={**(details or {}), "code": code})


def envelope(
    code: str,
    message: str,
    *,
    retriable: bool = False,
    details: dict[str, Any] | None = None,
    correlation_id: str,
) -> dict[str, Any]:
    """Build the error envelope of CONTRACT section 1."""
    body: dict[str, Any] = {"code": code, "message": message, "retriable": retriable}
    if details:
        body["details"] = details
    body["correlation_id"] = correlation_id
    return {"error": body}
