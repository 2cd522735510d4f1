"""A real OpenSSH server on loopback, for tests of the ssh transport (and the BDD runner).

:class:`SshServer` generates its own host key and one authorised client key in a directory,
writes an ``sshd_config`` (a free port on 127.0.0.1, no PAM, keys only, ``StrictModes no``)
and runs ``/usr/sbin/sshd -D -e`` until :meth:`SshServer.stop`. It logs in as the user running
the tests (root included: ``PermitRootLogin prohibit-password``). Commands run with sshd's
minimal environment, so a test passes what the remote side needs (``RBEES_HOME``,
``HF_ENDPOINT``) through the host's ``env`` setting, and names the remote ``rbees-pool`` by
path (:func:`venv_rbees_pool`).

The ``rbees_sshd`` fixture of :mod:`rbees_core.testing` starts one per test session. A
missing ``sshd`` is a failure, never a skip: ``.ci/run`` installs openssh-server.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from rbees_core.testing.processes import ManagedProcess, find_free_port

SSHD = "/usr/sbin/sshd"
MISSING_SSHD = (f"{SSHD} is missing: the ssh transport is tested against a real OpenSSH server "
                "(.ci/run installs openssh-server; here: apt-get install -y openssh-server)")


def venv_rbees_pool() -> str:
    """The ``rbees-pool`` of the running interpreter's environment."""
    return str(Path(sys.executable).with_name("rbees-pool"))


def generate_key(path: Path, comment: str = "rbees-test") -> str:
    """An ed25519 key pair at ``path`` and ``path.pub``; returns the public key line."""
    path.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, capture_output=True, timeout=30)
    return Path(f"{path}.pub").read_text().strip()


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (sshd's per-connection processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@attrs.define
class SshServer:
    """One running sshd. ``host_key`` is its public host key line (``ssh-ed25519 AAAA...``);
    ``client_key`` the private key it accepts for :attr:`user`."""

    root: Path
    port: int
    user: str
    host_key: str
    client_key: Path
    process: ManagedProcess | None = None
    address: str = "127.0.0.1"

    @classmethod
    def start(cls, root: Path, *, timeout: float = 15.0, address: str = "127.0.0.1",
              port: int | None = None, prefix: Sequence[str] = ()) -> SshServer:
        """Generate keys and config under ``root`` and start sshd; fails when sshd is missing.

        ``address`` and ``port`` are where it listens (a free loopback port by default);
        ``prefix`` runs it inside something, e.g. ``ip netns exec mac`` for a simulated host.
        """
        if not os.access(SSHD, os.X_OK):
            raise RuntimeError(MISSING_SSHD)
        if shutil.which("ssh-keygen") is None:
            raise RuntimeError("ssh-keygen is missing (it comes with openssh-client)")
        root.mkdir(parents=True, exist_ok=True)
        host_key = generate_key(root / "ssh_host_ed25519_key", "rbees-test-host")
        client_pub = generate_key(root / "client_ed25519", "rbees-test-client")
        (root / "authorized_keys").write_text(client_pub + "\n")
        port = port or find_free_port()
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}",
            f"ListenAddress {address}",
            f"HostKey {root / 'ssh_host_ed25519_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            f"PidFile {root / 'sshd.pid'}",
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UseDNS no",
            "PrintMotd no",
            "MaxStartups 50:30:100",
            "MaxSessions 50",
            "LogLevel VERBOSE",
            "",
        ]))
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        server = cls(root=root, port=port, user=getpass.getuser(), host_key=host_key,
                     client_key=root / "client_ed25519", address=address)
        argv = [*prefix, SSHD, "-D", "-e", "-f", str(config)]
        with open(root / "sshd.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        server.process = ManagedProcess(argv=argv, proc=proc, log_path=root / "sshd.log")
        server._wait_banner(timeout)
        return server

    def _wait_banner(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not answer on port {self.port}:\n{self.log()}")

    def log(self) -> str:
        return self.process.log() if self.process is not None else ""

    @property
    def known_hosts_pattern(self) -> str:
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"

    def known_hosts_line(self, key: str | None = None) -> str:
        """A known_hosts line for this server (with another ``key`` to fake a changed one)."""
        return f"{self.known_hosts_pattern} {key or self.host_key}\n"

    def ssh_config(self, alias: str, *, identity: Path | None = None,
                   known_hosts: Path | None = None, port: int | None = None) -> str:
        """A ``~/.ssh/config`` block naming this server ``alias``."""
        lines = [f"Host {alias}", f"    HostName {self.address}", f"    Port {port or self.port}",
                 f"    User {self.user}", f"    IdentityFile {identity or self.client_key}"]
        if known_hosts is not None:
            lines.append(f"    UserKnownHostsFile {known_hosts}")
        return "\n".join(lines) + "\n"

    def sessions(self) -> list[int]:
        """The sshd processes serving connections right now."""
        return children_of(self.process.pid) if self.process is not None else []

    def wait_no_sessions(self, timeout: float = 5.0) -> list[int]:
        """Wait until no connection is being served; returns those left after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := self.sessions()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
