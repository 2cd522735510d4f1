"""The pool hosts that ``rbees`` drives, and the transport that reaches each.

Hosts are kept in one TOML file, :func:`hosts_file`: ``$RBEES_HOME/hosts.toml`` when
``RBEES_HOME`` is set, else ``~/.config/rbees/hosts.toml`` (beside ``config.toml``).
``rbees hosts add|remove`` write it; it can be edited by hand::

    [hosts.mac]                             # rbees pool status --host mac
    transport = "ssh"                       # ssh (default), http or local
    destination = "me@mac.local:2222"       # ssh: user@host[:port], or a ~/.ssh/config alias
    remote_pool = "/opt/rbees/bin/rbees-pool"   # default: rbees-pool on the remote PATH
    env = { RBEES_HOME = "/data/rbees" }    # environment of rbees-pool on the host
    connect_timeout_s = 10

    [hosts.gpu1]
    transport = "http"                      # pool-managerd's API (CONTRACT section 4)
    url = "http://gpu1.lan:9200"
    token_file = "~/.config/rbees/gpu1.token"   # chmod 600

SSH host keys that ``rbees hosts add --accept-new`` trusted are kept in rbees' own
known_hosts file, :func:`known_hosts_file`, in the same directory; keys in the user's own
known_hosts files (``~/.ssh/known_hosts``, or ``UserKnownHostsFile``) are trusted too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from rbees_core import plugins
from rbees_core.errors import ConfigError, InvalidParamsError, NotFoundError
from rbees_core.files import open_private, write_private
from rbees_core.schema import from_mapping
from rbees_core.transport import (
    COMMON_KEYS,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_REMOTE_POOL,
    HostConfig,
    Transport,
)

if TYPE_CHECKING:
    from rbees_core.pool_client import PoolClient

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ALL", "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_REMOTE_POOL", "Destination",
           "HostConfig", "forget_host_keys", "host_fields_types", "host_from_table",
           "hosts_dir", "hosts_file", "known_hosts_file", "load_hosts", "open_pool_client",
           "open_transport", "read_lines", "record_host_key", "save_hosts", "select_hosts",
           "where"]
#: ``--host all`` means every configured host.
ALL = "all"
_DESTINATION = re.compile(
    r"(?:(?P<user>[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63})@)?"
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]{1,253}))"
    r"(?::(?P<port>[0-9]{1,5}))?")


def hosts_dir() -> Path:
    """``$RBEES_HOME`` when set, else the config directory (``$XDG_CONFIG_HOME/rbees``,
    ``~/.config/rbees``): where hosts.toml and rbees' own known_hosts live."""
    from rbees_core.config import config_dir

    home = os.environ.get("RBEES_HOME")
    return Path(home) if home else config_dir()


def hosts_file() -> Path:
    return hosts_dir() / "hosts.toml"


def known_hosts_file() -> Path:
    """rbees' own known_hosts (OpenSSH format), written only by ``hosts add --accept-new``."""
    return hosts_dir() / "known_hosts"


@attrs.frozen
class Destination:
    """``user@host[:port]`` as ssh takes it; ``host`` may be a ``~/.ssh/config`` alias."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = _DESTINATION.fullmatch(text)
        if not match or text.startswith("-"):
            raise InvalidParamsError("destination", f"{text!r} is not user@host[:port] or a "
                                     "host alias")
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 1 <= port <= 65535:
            raise InvalidParamsError("destination", f"port {port} is not 1..65535")
        return cls(host=match["v6"] or match["host"], user=match["user"], port=port)


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


def host_fields_types(pm: pluggy.PluginManager | None = None) -> dict[str, type[Any]]:
    """Each installed transport's :attr:`~rbees_core.transport.Transport.host_fields`, by
    transport name (with the installed plugins when ``pm`` is None)."""
    if pm is None:
        pm = plugins.make_manager(plugins.builtin_plugins())
    return {name: cls.host_fields for name, cls in plugins.transports(pm).items()}


def host_from_table(name: str, table: Mapping[str, Any], fields: Mapping[str, type[Any]],
                    *, path: str = "") -> HostConfig:
    """The host of a ``[hosts.NAME]`` table, its options checked by its transport's
    ``fields`` type (a transport not installed: unchecked, until it is used). Raises
    :class:`InvalidParamsError` naming the key."""
    if "name" in table:
        raise InvalidParamsError("name", "unknown field (the table's key is the name)")
    common = {key: table[key] for key in COMMON_KEYS if key in table}
    options = {key: value for key, value in table.items() if key not in COMMON_KEYS}
    host = from_mapping(HostConfig, {**common, "name": name}, path=path)
    host = HostConfig(host.name, host.transport, host.connect_timeout_s, options)
    checker = fields.get(host.transport)
    if checker is not None:
        from_mapping(checker, options, path=path)
    return host


def load_hosts(path: Path | None = None, *, pm: pluggy.PluginManager | None = None,
               check: bool = True) -> dict[str, HostConfig]:
    """Every configured host by name; none when the file does not exist. Each host's
    options are checked by its transport (the installed ones, or those of ``pm``), unless
    ``check`` is False (a caller that only counts hosts: no plugins are loaded). Raises
    :class:`ConfigError` naming the file and the TOML path of a bad value."""
    path = path or hosts_file()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(data) - {"hosts"}
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown section (only [hosts.NAME])")
    tables = data.get("hosts", {})
    fields = host_fields_types(pm) if tables and check else {}
    found: dict[str, HostConfig] = {}
    for name, table in tables.items():
        where = f"hosts.{name}"
        try:
            if not isinstance(table, dict):
                raise InvalidParamsError("", "must be a table")
            found[name] = host_from_table(name, table, fields, path=where)
        except InvalidParamsError as exc:
            message = exc.message if exc.message.startswith(where) else f"{where}: {exc.message}"
            raise ConfigError(f"{path}: {message}", details={"key": exc.field}) from exc
    return found


def save_hosts(hosts: Mapping[str, HostConfig], path: Path | None = None) -> Path:
    """Write every host to the hosts file (mode 600: it may name token files)."""
    path = path or hosts_file()
    lines = ["# rbees pool hosts: `rbees hosts list|add|remove|check`", ""]
    for name in sorted(hosts):
        lines.append(f"[hosts.{json.dumps(name)}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in hosts[name].to_toml_table().items()]
        lines.append("")
    return write_private(path, "\n".join(lines))


def _key_marker(name: str) -> str:
    return f"rbees-host={name}"


def record_host_key(name: str, pattern: str, key: str) -> Path:
    """Append ``pattern key`` to rbees' known_hosts, marked as trusted for host ``name``
    (the marker is the entry's comment, so OpenSSH reads the file too)."""
    path = known_hosts_file()
    with open_private(path, "a") as out:
        out.write(f"{pattern} {key} {_key_marker(name)}\n")
    return path


def forget_host_keys(name: str) -> int:
    """Drop the keys recorded for host ``name`` from rbees' known_hosts; returns how many."""
    path = known_hosts_file()
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.split()[-1:] != [_key_marker(name)]]
    if len(kept) != len(lines):
        write_private(path, "".join(kept))
    return len(lines) - len(kept)


def select_hosts(name: str, hosts: Mapping[str, HostConfig] | None = None) -> list[HostConfig]:
    """The host called ``name``, or every host for ``all``; :class:`NotFoundError` if none."""
    hosts = load_hosts() if hosts is None else hosts
    if name == ALL:
        if not hosts:
            raise NotFoundError(f"no hosts configured in {hosts_file()} "
                                "(add one: rbees hosts add NAME DESTINATION)")
        return [hosts[n] for n in sorted(hosts)]
    if name not in hosts:
        known = ", ".join(sorted(hosts)) or "none"
        raise NotFoundError(f"no host named {name!r} (configured: {known}; "
                            "add one: rbees hosts add NAME DESTINATION)",
                            details={"host": name})
    return [hosts[name]]


def open_transport(pm: pluggy.PluginManager, host: HostConfig) -> Transport:
    """A transport of the kind ``host`` names, not yet connected (use ``async with``).
    Raises :class:`~rbees_core.errors.UnknownPluginError` when that kind is not installed."""
    cls = plugins.lookup(pm, plugins.TRANSPORTS, host.transport, context=f"host {host.name!r}")
    return cls(host)


def where(pm: pluggy.PluginManager, host: HostConfig) -> str:
    """The host as people name it (its destination, its URL, ``this host``), as its
    transport tells; the transport's name when it is not installed or the table is bad."""
    try:
        return open_transport(pm, host).where
    except (ConfigError, InvalidParamsError):
        return host.transport


@contextlib.asynccontextmanager
async def open_pool_client(pm: pluggy.PluginManager, host: HostConfig
                           ) -> AsyncIterator[PoolClient]:
    """The typed client of ``host``'s pool (:mod:`rbees_core.pool_client`), over its
    transport; the transport is closed when the block ends. Raises
    :class:`~rbees_core.errors.UnknownPluginError` for a transport that is not installed,
    then what the client raises."""
    async with open_transport(pm, host) as transport:
        yield transport.pool_client()


async def read_lines(stream: AsyncIterable[str | bytes], sink: Callable[[str], None] | None
                     ) -> str:
    """Everything ``stream`` yields, passing each line (newline stripped) to ``sink`` as it
    arrives; for transports that read a program's output line by line."""
    chunks: list[str] = []
    async for raw in stream:
        if not raw:  # asyncssh's reader may yield "" at the end of the stream
            continue
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        chunks.append(line)
        if sink is not None:
            sink(line.rstrip("\r\n"))
    return "".join(chunks)
