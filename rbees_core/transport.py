"""The transport extension point: how ``rbees`` reaches a pool host (``ssh``, ``http``,
``local``, or a plugin's).

A transport is registered by class through
:func:`rbees_core.hookspecs.rbees_register_transports` and made by
:func:`rbees_core.hosts.open_transport` for one ``[hosts.NAME]`` of hosts.toml. What the
rest of rbees uses is its :meth:`Transport.pool_client`, one typed
:class:`rbees_core.pool_client.PoolClient`. A transport that can run a program on the host
implements :meth:`Transport.run` and gets a
:class:`~rbees_core.pool_client.command.CommandPoolClient` (``rbees-pool ... --format
json``) for free; one that speaks an API (``http``) returns its own client instead.

Each transport owns its settings of the host table: :attr:`Transport.host_fields` is an
attrs type (checked with :func:`rbees_core.schema.from_mapping` when hosts.toml is read);
:class:`HostConfig` keeps the common ones (``transport``, ``connect_timeout_s``) and the
rest as ``options``. :class:`CommandHostFields` are those of a transport that runs
``rbees-pool`` (``remote_pool``, ``env``).
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import attrs

from rbees_core.api.common import ID_PATTERN
from rbees_core.schema import field

if TYPE_CHECKING:
    from typing import Self

    from rbees_core.pool_client import PoolClient

T = TypeVar("T")
LineCallback = Callable[[str], None]
DEFAULT_REMOTE_POOL = "rbees-pool"
DEFAULT_CONNECT_TIMEOUT_S = 10.0
#: The keys of a ``[hosts.NAME]`` table that every host has; the others are ``options``.
COMMON_KEYS = ("transport", "connect_timeout_s")


@attrs.frozen(init=False)
class HostConfig:
    """One ``[hosts.NAME]`` table: what every host has, and ``options``, the settings of its
    transport (the transport's :attr:`Transport.host_fields` type reads them).

    ``HostConfig(name="mac", destination="me@mac")`` takes the options as keywords too, so
    a table reads as it is written. Read from hosts.toml by :func:`rbees_core.hosts.
    load_hosts`, which checks the options against the transport's fields.
    """

    name: str = field(pattern=ID_PATTERN)
    transport: str = field(default="ssh", pattern=r"[a-z][a-z0-9_-]{0,31}",
                           doc="ssh, http or local (or a transport plugin's name)")
    connect_timeout_s: float = field(default=DEFAULT_CONNECT_TIMEOUT_S, minimum=0.1,
                                     maximum=600)
    options: dict[str, Any] = field(factory=dict, doc="the transport's own settings")

    def __init__(self, name: str, transport: str = "ssh",
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 options: Mapping[str, Any] | None = None, **more: Any) -> None:
        self.__attrs_init__(name, transport, float(connect_timeout_s),  # type: ignore[attr-defined]
                            {**(options or {}), **more})

    def fields(self, cls: type[T]) -> T:
        """The options as ``cls`` (a transport's :attr:`~Transport.host_fields`), checked:
        :class:`rbees_core.errors.InvalidParamsError` names the bad key."""
        from rbees_core.schema import from_mapping

        return from_mapping(cls, self.options)

    def to_toml_table(self) -> dict[str, Any]:
        """The table as stored under ``[hosts.NAME]``: the transport, the options as given,
        the connect timeout when it is not the default."""
        out: dict[str, Any] = {"transport": self.transport, **self.options}
        if self.connect_timeout_s != DEFAULT_CONNECT_TIMEOUT_S:
            out["connect_timeout_s"] = self.connect_timeout_s
        return out


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


@attrs.frozen
class NoHostFields:
    """The host fields of a transport that has none of its own."""

    def where(self) -> str:
        """The host as people name it (a destination, a URL), for listings."""
        return "this host"


@attrs.frozen
class CommandHostFields:
    """The host fields of a transport that runs ``rbees-pool`` there (``local``, ``ssh``)."""

    remote_pool: str = field(default=DEFAULT_REMOTE_POOL, min_length=1, max_length=4096,
                             forbid=r"[\x00\n\r]", doc="the rbees-pool program on the host")
    env: dict[str, str] = field(factory=dict, doc="environment of rbees-pool on the host")

    def where(self) -> str:
        return "this host"

    def check(self) -> None:
        import re

        from rbees_core.errors import InvalidParamsError

        for key, value in self.env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise InvalidParamsError("env", f"{key!r} is not a variable name")
            if not isinstance(value, str) or "\x00" in value:
                raise InvalidParamsError(f"env.{key}", "must be a string without NUL")


class Transport(ABC):
    """Carries the pool operations to one pool host (``ssh``, ``http``, ``local``).

    Made by :func:`rbees_core.hosts.open_transport` with the host's
    :class:`rbees_core.hosts.HostConfig`. Construction is cheap and does no I/O: the first
    operation connects, and the connection is reused until :meth:`aclose` (use ``async with``).

    A transport implements :meth:`run` (then :meth:`pool_client` runs ``rbees-pool``
    through it) or overrides :meth:`pool_client`. A shared contract suite,
    :mod:`rbees_core.testing.transport`, checks every implementation the same way.
    """

    name: ClassVar[str]
    #: The attrs type of this transport's own fields of a ``[hosts.NAME]`` table.
    host_fields: ClassVar[type[Any]] = NoHostFields

    def __init__(self, host: HostConfig) -> None:
        self.host = host
        #: The host's options as :attr:`host_fields` (checked when hosts.toml was read;
        #: :class:`rbees_core.errors.InvalidParamsError` here for a table made in code).
        self.fields = host.fields(self.host_fields)

    @property
    def where(self) -> str:
        """The host as people name it: its destination, its URL, or ``this host``."""
        where = getattr(self.fields, "where", None)
        return str(where()) if callable(where) else "this host"

    def pool_client(self) -> PoolClient:
        """The typed client of the pool on this host.

        Called by: ``rbees pool ... --host``, ``rbees hosts check``, M0. The default runs
        ``rbees-pool ... --format json`` through :meth:`run`
        (:class:`rbees_core.pool_client.command.CommandPoolClient`); it lives as long as the
        transport (close the transport, not the client). Raises nothing itself.
        """
        from rbees_core.pool_client.command import CommandPoolClient

        return CommandPoolClient(self.run, name=self.host.name, kind=self.name)

    async def run(
        self, argv: Sequence[str], *, on_line: LineCallback | None = None,
        on_stderr: LineCallback | None = None,
    ) -> TransportResult:
        """Run ``rbees-pool argv...`` on the host and wait until it ends.

        Called by: :class:`~rbees_core.pool_client.command.CommandPoolClient` (``argv``
        holds ``--format json`` for commands that print data). Each argument reaches the
        remote program as one argument, whatever characters it holds (ssh quotes each one).
        ``on_line`` and ``on_stderr`` get every line of the program's stdout and stderr,
        without the newline, as soon as it arrives (a download prints its progress that
        way); they run on the event loop and must be quick.

        Returns: a :class:`TransportResult`; a command that ran and failed is a result with
        its exit code, not an exception.

        Raises: :class:`rbees_core.errors.HostUnreachableError` (no connection within
        ``connect_timeout_s``), :class:`rbees_core.errors.HostKeyError` (ssh: an unknown or
        changed host key; nothing was sent), :class:`rbees_core.errors.HostAuthError`
        (credentials refused), :class:`rbees_core.errors.RemoteProgramMissingError` (no
        ``rbees-pool`` at ``remote_pool``), :class:`rbees_core.errors.UnsupportedCommandError`
        (this transport runs no programs: the default), :class:`rbees_core.errors.
        TransportError` (the connection broke while the command ran).
        """
        from rbees_core.errors import UnsupportedCommandError

        raise UnsupportedCommandError(f"{self.host.name}: the {self.name} transport runs no "
                                      "programs on the host; use its pool_client()")

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
