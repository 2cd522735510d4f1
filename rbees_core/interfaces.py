"""Small base classes for the other extension points.

Each is registered by class through its ``rbees_register_<kind>`` hook and looked up by its
``name``. Implementations keep their module cheap to import and do I/O in async methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

if TYPE_CHECKING:
    from typing import Self

    from rbees_core.config import SchedulerConfig
    from rbees_core.hosts import HostConfig
    from rbees_core.scheduling import Snapshot, Verdict


@attrs.frozen
class DownloadProgress:
    """How far a download is, as told to :meth:`ModelSource.download`'s ``progress``.

    ``stage`` is ``download`` while bytes arrive (``bytes_done`` counts bytes already on disk,
    resumed ones included) and ``verify`` while the finished file is hashed.
    """

    bytes_done: int
    bytes_total: int | None
    rate_bps: float
    stage: str = "download"


@attrs.frozen
class DownloadResult:
    """A verified model file in place.

    ``ref`` is the canonical reference that now resolves to ``path``; ``details`` holds
    source-specific facts worth recording (for ``hf``: repo, file, revision, commit, etag).
    """

    ref: str
    path: str
    size_bytes: int
    sha256: str
    source: str
    details: dict[str, Any] = attrs.field(factory=dict)


ProgressCallback = Callable[[DownloadProgress], None]


class ModelSource(ABC):
    """Resolves a model reference with a scheme (``pkg:``, ``file:``, ``hf:``) to a local path.

    ``scheme`` is the prefix before the colon. Every source resolves; a source that can also
    fetch (``hf``) sets ``can_download`` and implements :meth:`download`. Instances are made
    with no arguments wherever a reference is resolved, so construction must be cheap.
    """

    name: ClassVar[str]
    scheme: ClassVar[str]
    #: True when :meth:`download` can fetch references of this scheme.
    can_download: ClassVar[bool] = False

    @abstractmethod
    def resolve(self, ref: str) -> str | None:
        """Local path of ``ref`` (without the scheme) if it is present here, else None."""

    async def download(self, ref: str, *, sha256: str | None = None,
                       progress: ProgressCallback | None = None) -> DownloadResult:
        """Fetch ``ref`` (without the scheme) into the pool's models directory and verify it.

        Called by: :func:`rbees_core.pool.models.download` (``rbees-pool models download``
        and pool-managerd's ``POST /v2/models/download``), only when ``can_download`` is set.

        ``sha256`` is the expected digest (from the catalog); without it the source checks
        what the remote reports. ``progress`` is called with a :class:`DownloadProgress` from
        the thread doing the transfer; it must be quick and thread-safe, and an exception it
        raises aborts the download. An interrupted download keeps what it received and a
        later call resumes it; the finished file appears at its final path only once
        verified.

        Raises: :class:`rbees_core.errors.ModelNotFoundError` (no such remote file),
        :class:`rbees_core.errors.DownloadError` (network or remote failure; retriable),
        :class:`rbees_core.errors.ChecksumMismatchError` (the bad file is removed),
        :class:`rbees_core.errors.ConflictError` (the same file is being downloaded already).
        """
        from rbees_core.errors import RbeesError

        raise RbeesError(f"model source {self.name!r} cannot download {self.scheme}: references")


@attrs.frozen
class TransportResult:
    """What one ``rbees-pool`` command did on a host.

    ``exit_code`` is the remote program's own (0 ok, 1 error, 2 usage error, 130
    interrupted), so callers can propagate it; ``stdout`` and ``stderr`` hold everything it
    printed, also when it failed.
    """

    exit_code: int
    stdout: str
    stderr: str


LineCallback = Callable[[str], None]


class Transport(ABC):
    """Carries ``rbees-pool`` commands to one pool host (``ssh``, ``http``, ``local``).

    Registered by class through :func:`rbees_core.hookspecs.rbees_register_transports` and
    made by :func:`rbees_core.hosts.open_transport` with the host's
    :class:`rbees_core.hosts.HostConfig` (``name``, ``destination``, ``url``,
    ``remote_pool``, ``env``, ``connect_timeout_s`` ...). Construction is cheap and does no
    I/O: the first :meth:`run` connects, and the connection is reused until :meth:`aclose`
    (use ``async with``). One core method, like httpx's transports: :meth:`run`.

    A shared contract suite, :mod:`rbees_core.testing_transport`, checks every
    implementation the same way.
    """

    name: ClassVar[str]

    def __init__(self, host: HostConfig) -> None:
        self.host = host

    @abstractmethod
    async def run(
        self, argv: Sequence[str], *, on_line: LineCallback | None = None,
        on_stderr: LineCallback | None = None,
    ) -> TransportResult:
        """Run ``rbees-pool argv...`` on the host and wait until it ends.

        Called by: ``rbees pool ... --host H`` (``argv`` then holds ``--format json`` for
        commands that print data) and ``rbees hosts check`` (``["--version"]``).

        Each argument reaches the remote program as one argument, whatever characters it
        holds (ssh quotes each one). ``on_line`` and ``on_stderr`` get every line of the
        program's stdout and stderr, without the newline, as soon as it arrives (a download
        prints its progress that way); they run on the event loop and must be quick.

        Returns: a :class:`TransportResult`; a command that ran and failed is a result with
        its exit code, not an exception.

        Raises: :class:`rbees_core.errors.HostUnreachableError` (no connection within
        ``connect_timeout_s``), :class:`rbees_core.errors.HostKeyError` (ssh: an unknown or
        changed host key; nothing was sent), :class:`rbees_core.errors.HostAuthError`
        (credentials refused), :class:`rbees_core.errors.RemoteProgramMissingError` (no
        ``rbees-pool`` at ``remote_pool``), :class:`rbees_core.errors.UnsupportedCommandError`
        (this transport cannot carry ``argv``), :class:`rbees_core.errors.TransportError`
        (the connection broke while the command ran).
        """

    async def accept_new(self) -> str | None:
        """Trust a host met for the first time; the only way a host key becomes trusted.

        Called by: ``rbees hosts add NAME --accept-new``. The ssh transport
        connects and records the host key it has never seen in rbees' own known_hosts file
        (a *changed* key is still refused). Returns: a line saying what was recorded, or
        None when there was nothing to accept (the default, for transports without host
        keys). Raises what :meth:`run` raises.
        """
        return None

    async def aclose(self) -> None:
        """Close the connection, if one is open; calling it twice is fine."""
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class GpuInventory(ABC):
    """Reports the devices of one kind on this host (cpu, nvml, metal).

    Called by: :func:`rbees_core.pool.inventory.collect` (``rbees-pool status``,
    pool-managerd's ``/v2/state``) and the worker preflight. Probes import their library
    inside :meth:`collect`; a missing library or driver means no devices, never an error.
    """

    name: ClassVar[str]

    @abstractmethod
    def collect(self) -> list[Mapping[str, Any]]:
        """Device entries; [] when none exist.

        A GPU entry has the shape of CONTRACT section 4: ``{index, uuid, name, backend:
        "cuda"|"metal", memory_total_bytes, memory_free_bytes, memory_reserved_bytes,
        utilization (0..1), temperature_c (or None), power_w (or None)}``. The ``cpu`` probe
        returns one entry ``{index: 0, uuid, name, backend: "cpu", cores, ram_total_bytes,
        ram_free_bytes}``. ``memory_reserved_bytes`` is 0 here: only the pool knows what its
        workers hold.
        """


class Scheduler(ABC):
    """A placement policy (see :mod:`rbees_core.scheduling` for the data shapes).

    Called by rbees-orcd's dispatch loop (and by ``rbees jobs submit`` without a daemon) for
    the job at the head of the queue, on the event loop thread: :meth:`decide` must be pure
    and fast (built-in policies well under 1 ms on 100 pools x 8 workers), never do I/O, and
    never raise for a well-formed snapshot. A policy that cannot place the job returns a
    ``wait`` decision with a reason.
    """

    name: ClassVar[str]

    @abstractmethod
    def decide(self, snapshot: Snapshot) -> Verdict:
        """Decisions for ``snapshot["job"]`` with the candidates and why each one lost."""

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> Self:
        """The policy as ``[scheduler]`` configures it (rbees-orcd at start-up).

        The default takes no settings; a policy with settings (the script scheduler reads
        ``script``) overrides this and raises :class:`rbees_core.errors.ConfigError` naming
        the bad key.
        """
        return cls()

    def close(self) -> None:
        """Release what the policy holds (processes, files); the owner calls it once when
        it stops deciding. The default holds nothing."""
        return None
