"""rbees transport ``ssh``: ``rbees-pool`` on a pool host over SSH (asyncssh, imported lazily).

- The destination is ``user@host[:port]`` or an alias of ``~/.ssh/config``, whose HostName,
  Port, User, IdentityFile, UserKnownHostsFile (and the rest asyncssh reads) apply.
- Authentication by keys (IdentityFile, the default ~/.ssh/id_*) and the ssh agent; never
  passwords or prompts.
- Host keys are checked against rbees' own known_hosts (:func:`rbees_core.hosts.
  known_hosts_file`) and the user's (``UserKnownHostsFile``, default ``~/.ssh/known_hosts``).
  An unknown or changed key is refused before anything is sent, with a message saying how
  to trust it; only ``rbees hosts add NAME --accept-new`` records a new key.
- Connecting (TCP, key exchange, authentication) times out after ``connect_timeout_s``.
- The command line is ``command -v REMOTE_POOL ... || exit 127; exec [env K=V ...]
  REMOTE_POOL ARG...`` with every piece quoted by :func:`shlex.quote`, so each argument
  arrives as one argument, whatever it holds (the login shell must be a POSIX shell).

The transport (:mod:`rbees_transport_ssh.transport`) is imported when a program asks for
transports, asyncssh when a connection is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rbees_core.hookspecs import hookimpl
from rbees_core.plugins import lazy_exports

if TYPE_CHECKING:
    from rbees_core.transport import Transport
    from rbees_transport_ssh.transport import (
        MISSING_PROGRAM,
        SshTransport,
        known_hosts_pattern,
        remote_command,
    )

__all__ = ["MISSING_PROGRAM", "SshTransport", "known_hosts_pattern", "remote_command"]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "rbees_transport_ssh.transport"))


@hookimpl
def rbees_register_transports() -> list[type[Transport]]:
    from rbees_transport_ssh.transport import SshTransport

    return [SshTransport]
