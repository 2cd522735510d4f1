"""The ``ssh`` transport (:class:`SshTransport`); see :mod:`rbees_transport_ssh`."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from rbees_core.errors import (
    HostAuthError,
    HostKeyError,
    HostUnreachableError,
    InvalidParamsError,
    RemoteProgramMissingError,
    TransportError,
)
from rbees_core.hosts import Destination, HostConfig, known_hosts_file, read_lines, record_host_key
from rbees_core.schema import field
from rbees_core.transport import (
    CommandHostFields,
    LineCallback,
    Transport,
    TransportResult,
)

if TYPE_CHECKING:
    import asyncssh

#: Exit codes of a shell that could not start the program (126: not executable, 127: absent).
MISSING_PROGRAM = (126, 127)


@attrs.frozen
class SshHostFields(CommandHostFields):
    """The ssh transport's fields of a ``[hosts.NAME]`` table: ``remote_pool`` and ``env``,
    and where to connect."""

    destination: str | None = field(default=None, max_length=300,
                                    doc="user@host[:port] or an alias of ~/.ssh/config")

    def check(self) -> None:
        super().check()
        if not self.destination:
            raise InvalidParamsError("destination", "the ssh transport needs one")
        Destination.parse(self.destination)

    def where(self) -> str:
        return self.destination or "-"


def remote_command(host: HostConfig, argv: Sequence[str]) -> str:
    """The shell command line run on the host: every piece quoted, ``~/`` kept for the shell.

    It first checks, silently, that the program exists (exit 127 when it does not), so a
    missing rbees-pool is one clear error here rather than the shell's message there.
    """
    for arg in argv:
        if "\x00" in arg:
            raise InvalidParamsError("argv", "an argument contains NUL")
    fields = host.fields(SshHostFields)
    program = fields.remote_pool
    quoted = ("~/" + shlex.quote(program[2:])) if program.startswith("~/") else shlex.quote(
        program)
    env = [shlex.quote(f"{key}={value}") for key, value in sorted(fields.env.items())]
    run = " ".join(["exec", *(["env", *env] if env else []), quoted, *map(shlex.quote, argv)])
    return f"command -v {quoted} >/dev/null 2>&1 || exit 127; {run}"


def known_hosts_pattern(host: str, port: int | None) -> str:
    return host if port in (None, 22) else f"[{host}]:{port}"


class _Trust:
    """Which host keys are trusted for one connection, and what the server presented."""

    def __init__(self, user_files: list[Path], accept_new: bool) -> None:
        import asyncssh

        self.known: list[tuple[Path, asyncssh.SSHKnownHosts]] = []
        for path in [known_hosts_file(), *user_files]:
            if not path.is_file():
                continue
            try:
                self.known.append((path, asyncssh.read_known_hosts(str(path))))
            except (OSError, ValueError) as exc:
                raise HostKeyError(f"{path}: cannot read this known_hosts file: {exc}"
                                   ) from None
        self.accept_new = accept_new
        self.pattern = ""
        self.known_in: list[Path] = []
        self.presented: Any = None
        self.accepted: Any = None

    def lookup(self, host: str, addr: str, port: int | None) -> Sequence[list[Any]]:
        """asyncssh's ``known_hosts`` callable: trusted keys, CA keys and revoked keys."""
        self.pattern = known_hosts_pattern(host, port)
        merged: list[list[Any]] = [[] for _ in range(7)]
        for path, known in self.known:
            found = known.match(host, addr, port)
            if found[0] or found[1]:
                self.known_in.append(path)
            for bucket, items in zip(merged, found, strict=True):
                bucket.extend(items)
        return merged

    def client(self) -> type[asyncssh.SSHClient]:
        import asyncssh

        trust = self

        class Client(asyncssh.SSHClient):
            # asyncssh asks this only for a key that is not trusted already
            def validate_host_public_key(self, host: str, addr: str, port: int,
                                         key: asyncssh.SSHKey) -> bool:
                trust.presented = key
                if trust.accept_new and not trust.known_in:
                    trust.accepted = key
                    return True
                return False

        return Client


class SshTransport(Transport):
    """``rbees-pool`` over one SSH connection, opened by the first :meth:`run`."""

    name: ClassVar[str] = "ssh"
    host_fields: ClassVar[type[SshHostFields]] = SshHostFields
    fields: SshHostFields

    def __init__(self, host: HostConfig) -> None:
        super().__init__(host)
        self.destination = Destination.parse(self.fields.destination or "")
        self._conn: asyncssh.SSHClientConnection | None = None
        self._accept_new = False
        self._trust: _Trust | None = None

    def _user_known_hosts(self) -> list[Path]:
        import asyncssh

        d = self.destination
        options = asyncssh.SSHClientConnectionOptions(  # config=(): ~/.ssh/config, as connect
            config=(), host=d.host, port=d.port or (), username=d.user or (), client_keys=None,
            agent_path=None)
        configured: Any = options.known_hosts  # () default, None, or file names
        if configured is None:  # UserKnownHostsFile none: only rbees' own file counts
            return []
        if not configured:
            return [Path("~/.ssh/known_hosts").expanduser()]
        return [Path(str(p)).expanduser() for p in configured]

    def _refused_key(self, exc: Exception) -> HostKeyError:
        trust = self._trust
        assert trust is not None
        name, dest = self.host.name, self.fields.destination
        key = trust.presented
        seen = (f"{key.get_algorithm()} key {key.get_fingerprint()}" if key is not None
                else "key")
        if not trust.known_in:
            return HostKeyError(
                f"{name}: {trust.pattern or dest} presented an unknown host {seen}; nothing "
                f"was sent. If that is the host's key, trust it with: rbees hosts add {name} "
                f"--accept-new")
        forget = "; ".join(f"ssh-keygen -R '{trust.pattern}' -f {shlex.quote(str(path))}"
                           for path in dict.fromkeys(trust.known_in))
        return HostKeyError(
            f"{name}: the host key of {trust.pattern} has CHANGED (it now presents a {seen}, "
            f"not the one recorded); nothing was sent. This may be an attack; if the host was "
            f"reinstalled, remove the old key ({forget}) and run: rbees hosts add {name} "
            f"--accept-new")

    async def _connection(self) -> asyncssh.SSHClientConnection:
        if self._conn is not None:
            return self._conn
        import asyncio

        import asyncssh

        d, name = self.destination, self.host.name
        self._trust = trust = _Trust(self._user_known_hosts(), self._accept_new)
        try:
            self._conn = await asyncssh.connect(
                d.host, d.port or (), username=d.user or (), known_hosts=trust.lookup,
                client_factory=trust.client(), connect_timeout=self.host.connect_timeout_s,
                password_auth=False, kbdint_auth=False)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._refused_key(exc) from None
        except asyncssh.KeyExchangeFailed as exc:
            if trust.known_in:  # the recorded key's type is no longer offered
                raise self._refused_key(exc) from None
            raise TransportError(f"{name}: ssh key exchange with {d.host} failed: "
                                 f"{exc.reason}") from None
        except asyncssh.PermissionDenied:
            raise HostAuthError(
                f"{name}: {self.fields.destination} refused authentication (tried ssh keys and "
                f"the agent); check IdentityFile in ~/.ssh/config or the host's "
                f"authorized_keys") from None
        except (OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self.host.connect_timeout_s:g} s"
            elif isinstance(exc, ConnectionRefusedError):
                reason = "connection refused"
            else:
                reason = str(exc) or type(exc).__name__
            raise HostUnreachableError(f"{name}: cannot reach {self.fields.destination}: "
                                       f"{reason}") from None
        except asyncssh.Error as exc:
            raise TransportError(f"{name}: ssh to {self.fields.destination} failed: "
                                 f"{exc.reason}") from None
        return self._conn

    async def accept_new(self) -> str | None:
        self._accept_new = True
        await self.aclose()
        await self._connection()
        trust = self._trust
        if trust is None or trust.accepted is None:
            return None
        key = trust.accepted
        line = " ".join(key.export_public_key("openssh").decode().split()[:2])
        path = record_host_key(self.host.name, trust.pattern, line)
        return (f"trusted the {key.get_algorithm()} host key {key.get_fingerprint()} of "
                f"{trust.pattern} (recorded in {path})")

    async def run(self, argv: Sequence[str], *, on_line: LineCallback | None = None,
                  on_stderr: LineCallback | None = None) -> TransportResult:
        import asyncio

        import asyncssh

        command = remote_command(self.host, argv)
        conn = await self._connection()
        try:
            proc = await conn.create_process(command, encoding="utf-8", errors="replace")
            proc.stdin.write_eof()
            out, err = await asyncio.gather(read_lines(proc.stdout, on_line),
                                            read_lines(proc.stderr, on_stderr))
            done = await proc.wait()
        except (asyncssh.Error, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise TransportError(f"{self.host.name}: the ssh connection broke: {reason}"
                                 ) from None
        code = done.exit_status if done.exit_status is not None and done.exit_status >= 0 \
            else 255
        if code in MISSING_PROGRAM:
            raise RemoteProgramMissingError(
                f"{self.host.name}: no rbees-pool at {self.fields.remote_pool!r} on "
                f"{self.fields.destination} (not found, or not executable); set its path "
                f"with: rbees hosts add {self.host.name} {self.fields.destination} "
                f"--remote-pool PATH (after rbees hosts remove {self.host.name})")
        return TransportResult(exit_code=code, stdout=out, stderr=err)

    async def forward_port(self, remote_port: int, remote_host: str = "127.0.0.1") -> Any:
        """Listen on a free port of 127.0.0.1 here and carry each connection to
        ``remote_host:remote_port`` as the host sees it (127.0.0.1: the host itself; a
        worker its pool-managerd started listens on the pool's address), through this
        transport's SSH connection
        (``rbees jobs submit`` with no daemon reaches a worker this way, so no pool port is
        opened to the network). Returns asyncssh's listener: ``get_port()`` is the local
        port, ``close()`` stops it. Raises what :meth:`run` raises."""
        import asyncssh

        conn = await self._connection()
        try:
            return await conn.forward_local_port("127.0.0.1", 0, remote_host, remote_port)
        except (asyncssh.Error, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            raise TransportError(f"{self.host.name}: cannot forward a port over ssh: "
                                 f"{reason}") from None

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            await conn.wait_closed()
