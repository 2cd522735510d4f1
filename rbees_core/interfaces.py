"""Small base classes for the other extension points.

Each is registered by class through its ``rbees_register_<kind>`` hook and looked up by its
``name``. Implementations keep their module cheap to import and do I/O in async methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs


class ModelSource(ABC):
    """Resolves a model reference with a scheme (``pkg:``, ``file:``, ``hf:``) to a local path.

    ``scheme`` is the prefix before the colon. A source that also fetches (hf) downloads in
    :meth:`fetch`; local sources only resolve.
    """

    name: ClassVar[str]
    scheme: ClassVar[str]

    @abstractmethod
    def resolve(self, ref: str) -> str | None:
        """Local path of ``ref`` (without the scheme) if it is present here, else None."""


@attrs.frozen
class TransportResult:
    exit_code: int
    stdout: str
    stderr: str


class Transport(ABC):
    """Runs ``rbees-pool`` commands on a pool host (ssh, http, local).

    One core method, like httpx's transports: :meth:`run` executes one command, passes each
    stdout line to ``on_line`` as it arrives, and returns the exit code and output.
    """

    name: ClassVar[str]

    @abstractmethod
    async def run(
        self, argv: Sequence[str], *, on_line: Callable[[str], None] | None = None
    ) -> TransportResult:
        """Run ``rbees-pool argv...`` on the host."""


class GpuInventory(ABC):
    """Reports the devices of one kind on this host (cpu, nvml, metal)."""

    name: ClassVar[str]

    @abstractmethod
    def collect(self) -> list[Mapping[str, Any]]:
        """Device entries in the shape of CONTRACT section 4; [] when none exist."""


class Scheduler(ABC):
    """A placement policy: given a read-only snapshot, returns decisions."""

    name: ClassVar[str]

    @abstractmethod
    def decide(self, snapshot: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """Decisions (dispatch, start_worker, stop_worker, wait) for ``snapshot``."""
