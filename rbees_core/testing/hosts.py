"""The hosts of the design, simulated on one machine: for the BDD features (``bdd-runner``).

A :class:`Lab` holds three hosts: ``blep`` runs the orchestrator, ``mac`` and
``workstation`` are pools. In ``netns`` mode (root, with ``ip``) each host is a network
namespace of the same name with its own address on a bridge (:data:`SUBNET`), joined by a
veth pair whose outer end :meth:`Lab.link` can take down: a cut cable, as the pool's peers
see it. Every daemon then listens on its host's address on the standard ports (8080, 9200,
22) and needs the lab's API token, as it would across a real network.

Where namespaces cannot be made, the lab runs in ``loopback`` mode: the same hosts share
127.0.0.1 with distinct ports, and a cut link is simulated by freezing the host's processes
(SIGSTOP), which looks the same to its peers: silence. :attr:`Lab.mode` says which.

Hosts share the file system, so each has its own ``RBEES_HOME`` and ``HOME`` under the lab's
folder; :meth:`SimHost.env` is the environment of a program run on that host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from rbees_core.testing.processes import find_free_port

#: ``RBEES_BDD_LAB=N`` (0-9) gives a lab its own subnet, bridge and namespace names, so
#: two runs on one machine (two worktrees) do not tear down each other's hosts; 0 is the
#: default and keeps the plain names (``mac``, ``10.213.0.11``).
LAB_INDEX = int(os.environ.get("RBEES_BDD_LAB", "0") or 0) % 10
SUBNET = f"10.213.{LAB_INDEX}"
BRIDGE = f"rbees-lab{LAB_INDEX}"
GATEWAY = f"{SUBNET}.1"
#: host name -> last octet of its address in netns mode
HOSTS = {"blep": 10, "mac": 11, "workstation": 12}
ORCHESTRATOR = "blep"
POOLS = ("mac", "workstation")
BIN = Path(sys.executable).parent
#: where a run's :meth:`Lab.describe` is kept, for bdd-runner's report
LAB_DESCRIPTION = pytest.StashKey[str]()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


def _namespace(name: str) -> str:
    return name if LAB_INDEX == 0 else f"lab{LAB_INDEX}-{name}"


def _veth(name: str) -> str:
    return (f"rb-{name}" if LAB_INDEX == 0 else f"rb{LAB_INDEX}-{name}")[:15]


def netns_possible() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no `ip` program (iproute2)"
    probe = f"rbees-probe{LAB_INDEX}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@attrs.define
class SimHost:
    """One simulated host: its name, address, ports, and its own state folders."""

    name: str
    address: str
    namespace: str | None
    home: Path
    user_home: Path
    orcd_port: int
    pool_port: int
    ssh_port: int
    token: str
    frozen: list[int] = attrs.field(factory=list)
    #: its daemons serve HTTPS (a certificate for its address from the lab's CA on blep)
    tls: bool = False

    @property
    def veth(self) -> str:
        return _veth(self.name)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def orcd_url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.orcd_port}"

    @property
    def pool_url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.pool_port}"

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a program on this host: its RBEES_HOME and HOME, the token,
        and nothing of the caller's RBEES_* or ssh agent."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RBEES_", "SSH_")) and k not in ("HF_ENDPOINT",)}
        env.update(RBEES_HOME=str(self.home), HOME=str(self.user_home),
                   RBEES_API_TOKEN=self.token, COLUMNS="200", NO_COLOR="1")
        env.update(extra)
        return env

    def argv(self, program: str, *args: str) -> list[str]:
        exe = str(BIN / program) if (BIN / program).exists() else program
        return [*self.prefix(), exe, *args]

    def run(self, program: str, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``program`` on this host and wait for it."""
        return subprocess.run(self.argv(program, *args), env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout, input=stdin,
                              stdin=None if stdin is not None else subprocess.DEVNULL)

    def popen(self, program: str, *args: str, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(program, *args), env=env or self.env(), **kwargs)


@attrs.define
class Lab:
    """The three hosts, in ``netns`` or ``loopback`` mode (see the module docstring)."""

    root: Path
    mode: str
    why_loopback: str | None
    token: str
    hosts: dict[str, SimHost]

    @classmethod
    def create(cls, root: Path, *, mode: str = "auto") -> Lab:
        """Make the hosts under ``root``. ``mode``: ``auto`` (netns when possible), ``netns``
        (fail when impossible) or ``loopback``."""
        why = "asked for" if mode == "loopback" else netns_possible()
        if mode == "netns" and why:
            raise RuntimeError(f"network namespaces cannot be made here: {why}")
        token = secrets.token_hex(16)
        hosts = {}
        for name, octet in HOSTS.items():
            netns = why is None
            home, user_home = root / name / "rbees", root / name / "home"
            (home / "run").mkdir(parents=True, exist_ok=True)
            (user_home / ".ssh").mkdir(parents=True, exist_ok=True)
            hosts[name] = SimHost(
                name=name, address=f"{SUBNET}.{octet}" if netns else "127.0.0.1",
                namespace=_namespace(name) if netns else None, home=home, user_home=user_home,
                orcd_port=8080 if netns else find_free_port(),
                pool_port=9200 if netns else find_free_port(),
                ssh_port=22 if netns else find_free_port(), token=token)
        lab = cls(root=root, mode="netns" if why is None else "loopback", why_loopback=why,
                  token=token, hosts=hosts)
        if lab.mode == "netns":
            lab._make_network()
        return lab

    @property
    def hub_address(self) -> str:
        """Where a server of the test process itself is reachable from every host."""
        return GATEWAY if self.mode == "netns" else "127.0.0.1"

    def _make_network(self) -> None:
        self.destroy_network()
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in self.hosts.values():
            assert host.namespace is not None
            _ip("netns", "add", host.namespace)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns",
                host.namespace)
            _ip("link", "set", host.veth, "master", BRIDGE, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")

    def destroy_network(self) -> None:
        """Remove the namespaces and the bridge (left over from a killed run, too)."""
        for name in HOSTS:
            _ip("netns", "del", _namespace(name), check=False)
            _ip("link", "del", _veth(name), check=False)
        _ip("link", "del", BRIDGE, check=False)

    def link(self, name: str, up: bool, pids: Sequence[int] = ()) -> None:
        """Cut (``up=False``) or restore the host's link. In loopback mode the host's
        processes ``pids`` are frozen and thawed instead."""
        host = self.hosts[name]
        if self.mode == "netns":
            _ip("link", "set", host.veth, "up" if up else "down")
            return
        if not up:
            host.frozen = list(pids)
        for pid in host.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT if up else signal.SIGSTOP)
        if up:
            host.frozen = []

    def describe(self) -> str:
        if self.mode == "netns":
            where = ", ".join(f"{h.name} {h.address}" for h in self.hosts.values())
            return f"hosts in network namespaces: {where}"
        return f"hosts on loopback with distinct ports ({self.why_loopback})"

    def destroy(self) -> None:
        for host in self.hosts.values():
            self.link(host.name, True)
        if self.mode == "netns":
            self.destroy_network()
