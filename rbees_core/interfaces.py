"""Small base classes for the other extension points (transports: :mod:`rbees_core.transport`).

Each is registered by class through its ``rbees_register_<kind>`` hook and looked up by its
``name``. Implementations keep their module cheap to import and do I/O in async methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

# the transport interface lives in rbees_core.transport; these names stay importable here
from rbees_core.transport import LineCallback, Transport, TransportResult

if TYPE_CHECKING:
    from typing import Self

    from rbees_core.api.pool import CpuEntry, DownloadProgress, GpuEntry
    from rbees_core.config import SchedulerConfig
    from rbees_core.scheduling import Snapshot, Verdict

__all__ = ["DownloadProgress", "DownloadResult", "GpuInventory", "LineCallback", "ModelSource",
           "ProgressCallback", "Scheduler", "Transport", "TransportResult"]


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


ProgressCallback = Callable[["DownloadProgress"], None]


def __getattr__(name: str) -> Any:
    """``DownloadProgress`` (an api type, :mod:`rbees_core.api.pool`) stays importable from
    here without every plugin's loading importing the api types."""
    if name == "DownloadProgress":
        from rbees_core.api.pool import DownloadProgress

        return DownloadProgress
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

    @classmethod
    def catalog_fields(cls) -> type[Any] | None:
        """The attrs class of the keys this source adds to a model catalog entry (``hf``:
        ``hf_repo``, ``hf_file``, ``revision``), limits in field metadata as for
        :func:`rbees_core.schema.from_mapping`; None (the default) when it adds none.

        Called by: the model catalog (:mod:`rbees_core.catalog`), which parses these keys
        with this class when an entry lists a reference of this scheme or uses one of them
        (a required key missing is then an error). The keys stay flat in the catalog file.
        A method rather than an attribute, so that the class may live in a module imported
        only when a catalog is read.
        """
        return None

    @classmethod
    def validate_ref(cls, rest: str, field: str = "model") -> None:
        """Check a reference of this scheme whose common syntax already passed.

        Called by: the model catalog (:mod:`rbees_core.catalog`) for each of an entry's
        sources of this scheme. ``rest`` is the reference without the scheme; ``field``
        names it in the error. The default accepts every non-empty ``rest``.

        Raises: :class:`rbees_core.errors.InvalidParamsError` naming ``field`` when this
        source could never resolve ``rest``.
        """
        if not rest:
            from rbees_core.errors import InvalidParamsError

            raise InvalidParamsError(field, f"{cls.scheme}: needs a reference after the colon")

    @classmethod
    def check_catalog_ref(cls, rest: str, fields: Any | None, field: str) -> None:
        """Rules between a catalog entry's reference of this scheme and the entry's own
        keys of this source (``fields``, an instance of :meth:`catalog_fields`, or None when
        the class declares none).

        Called by: the model catalog, after :meth:`validate_ref`. The ``hf`` source requires
        the reference that ``hf_repo``, ``revision`` and ``hf_file`` name. The default
        checks nothing. Raises: :class:`rbees_core.errors.InvalidParamsError` naming
        ``field``.
        """
        return None

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


class GpuInventory(ABC):
    """Reports the devices of one kind on this host (cpu, nvml, metal).

    Called by: :func:`rbees_core.pool.inventory.collect` (``rbees-pool status``,
    pool-managerd's ``/v2/state``) and the worker preflight. Probes import their library
    inside :meth:`collect`; a missing library or driver means no devices, never an error.
    """

    name: ClassVar[str]

    @abstractmethod
    def collect(self) -> Sequence[GpuEntry | CpuEntry]:
        """Device entries; [] when none exist.

        A GPU is a :class:`rbees_core.api.pool.GpuEntry` (CONTRACT section 4: index, uuid,
        name, backend ``cuda``/``metal``, memory total and free, utilization 0..1,
        temperature and power or None). The ``cpu`` probe returns one
        :class:`rbees_core.api.pool.CpuEntry` (cores, RAM total and free, the CPU's name).
        Reserved memory is 0 here: only the pool knows what its workers hold. Import
        :mod:`rbees_core.api.pool` inside this method, not when the plugin module loads.
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

    def metrics(self) -> Any | None:
        """The policy's own Prometheus series: a ``prometheus_client`` collector (a
        ``CollectorRegistry`` will do) that rbees-orcd registers on its registry once,
        after :meth:`from_config`, so ``GET /metrics`` shows them (the script scheduler's
        ``rbees_scheduler_script_failures_total``). None (the default): none."""
        return None
