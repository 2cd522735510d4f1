"""The programs running on the lab's hosts, started on demand and kept for the whole run."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import attrs
import httpx

from rbees_core.testing.hosts import ORCHESTRATOR, POOLS, Lab, SimHost
from rbees_core.testing.hub import FakeHub
from rbees_core.testing.ssh import SshServer, generate_key, venv_rbees_pool

#: the programs rbees runs on a host
RBEES_PROGRAMS = ("rbees-orcd", "pool-managerd", "rbees-workerd", "rbees-pool", "rbees")
#: heartbeats every half second: "unavailable after 3 missed" is then 1.5 s
HEARTBEAT_S = 0.5
GIT_ENV = {"GIT_AUTHOR_NAME": "rbees lab", "GIT_AUTHOR_EMAIL": "lab@rbees.invalid",
           "GIT_COMMITTER_NAME": "rbees lab", "GIT_COMMITTER_EMAIL": "lab@rbees.invalid"}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "protocol.file.allow=always", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **GIT_ENV})
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout.strip()


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


@attrs.define
class World:
    lab: Lab
    root: Path
    sshd: dict[str, SshServer] = attrs.field(factory=dict)
    daemons: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    hub: FakeHub | None = None
    ssh_hosts_added: bool = False
    #: when (monotonic) this world last started rbees-orcd
    orcd_started_at: float = 0.0
    #: the daemons serve HTTPS (:meth:`use_tls`); each host's certificate and key, the CA
    tls: bool = False
    certs: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    ca_file: str | None = None

    def host(self, name: str) -> SimHost:
        return self.lab.hosts[name]

    @property
    def blep(self) -> SimHost:
        return self.host(ORCHESTRATOR)

    @property
    def token(self) -> str:
        return self.lab.token

    # -- programs --------------------------------------------------------------------------

    def blep_env(self, **extra: str) -> dict[str, str]:
        return self.blep.env(RBEES_ORCHESTRATOR_URL=self.blep.orcd_url, **extra)

    def run_on(self, name: str, program: str, *args: str, token: bool = True,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:
        host = self.host(name)
        env = self.blep_env() if name == ORCHESTRATOR else host.env()
        if not token:
            env.pop("RBEES_API_TOKEN", None)
        return host.run(program, *args, env=env, timeout=timeout)

    def verify(self) -> ssl.SSLContext | bool:
        """What this process's own calls to the daemons verify with: the lab CA over TLS."""
        if self.tls and self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        return True

    def use_tls(self, on: bool) -> None:
        """Serve every daemon over HTTPS (``on``) or plain HTTP from now on: the running
        daemons are stopped when that changes (the next :meth:`ensure_cluster` starts
        them). The certificates come from the CA on blep (``rbees tls issue``, once)."""
        if on == self.tls:
            return
        for key in [k for k in self.daemons if k == "orcd" or k.startswith("pool:")]:
            self.kill(key, signal.SIGTERM)
        if on and not self.certs:
            for name, host in self.lab.hosts.items():
                out = self.root / f"tls-{name}"
                done = self.run_on(ORCHESTRATOR, "rbees", "tls", "issue", name, "--dns", name,
                                   "--ip", host.address, "--out", str(out))
                assert done.returncode == 0, done.stderr
                self.certs[name] = (str(out / f"{name}.pem"), str(out / f"{name}.key"))
                self.ca_file = str(out / "ca.pem")
        self.tls = on
        for host in self.lab.hosts.values():
            host.tls = on

    def tls_flags(self, name: str) -> list[str]:
        if not self.tls:
            return []
        cert, key = self.certs[name]
        assert self.ca_file is not None
        return ["--tls-cert", cert, "--tls-key", key, "--ca-file", self.ca_file]

    def http(self, method: str, url: str, *, token: str | None = "right",
             **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token == "right":
            headers["Authorization"] = f"Bearer {self.token}"
        elif token == "wrong":
            headers["Authorization"] = "Bearer " + "0" * 32
        return httpx.request(method, url, headers=headers, timeout=kwargs.pop("timeout", 60),
                             verify=self.verify(), **kwargs)

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # -- hub, ssh ----------------------------------------------------------------------------

    def ensure_hub(self) -> FakeHub:
        if self.hub is None:
            self.hub = FakeHub(host=self.lab.hub_address).start()
        return self.hub

    def ensure_ssh_hosts(self) -> None:
        """sshd on each pool host, blep's key authorised, and the hosts added on blep with
        ``rbees hosts add --accept-new``: what an operator does once."""
        if self.ssh_hosts_added:
            return
        key = self.blep.user_home / ".ssh" / "id_ed25519"
        public = generate_key(key, "blep")
        hub = self.ensure_hub()
        for name in POOLS:
            host = self.host(name)
            server = SshServer.start(self.root / f"sshd-{name}", address=host.address,
                                     port=host.ssh_port, prefix=host.prefix())
            (server.root / "authorized_keys").write_text(public + "\n")
            self.sshd[name] = server
            checkout = self.root / name / "checkout"
            port = "" if host.ssh_port == 22 else f":{host.ssh_port}"
            done = self.run_on(
                ORCHESTRATOR, "rbees", "hosts", "add", name, f"{server.user}@{host.address}{port}",
                "--remote-pool", venv_rbees_pool(), "--accept-new", "--connect-timeout", "3",
                "--env", f"RBEES_HOME={host.home}", "--env", f"HOME={host.user_home}",
                "--env", f"HF_ENDPOINT={hub.endpoint}", "--env", f"RBEES_API_TOKEN={self.token}",
                "--env", f"RBEES_POOL_CHECKOUT={checkout}")
            assert done.returncode == 0, done.stderr
        self.ssh_hosts_added = True

    # -- daemons -----------------------------------------------------------------------------

    def _spawn(self, key: str, host: SimHost, program: str, *args: str,
               env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{key.replace(':', '-')}.log", "ab")  # noqa: SIM115
        if env is None:
            env = self.blep_env() if host.name == ORCHESTRATOR else host.env(
                HF_ENDPOINT=self.ensure_hub().endpoint)
        self.daemons[key] = host.popen(program, *args, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _alive(self, key: str) -> bool:
        proc = self.daemons.get(key)
        return proc is not None and proc.poll() is None

    def start_orcd(self, *extra: str) -> None:
        """rbees-orcd on blep (``extra``: more options, e.g. ``--keep-alive 3s``)."""
        blep = self.blep
        self._spawn("orcd", blep, "rbees-orcd", "--bind", f"{blep.address}:{blep.orcd_port}",
                    "--heartbeat-interval", str(HEARTBEAT_S), "--idle-timeout", "120",
                    *self.tls_flags(ORCHESTRATOR), *extra)
        self.wait_health(blep.orcd_url, "orcd")
        self.orcd_started_at = time.monotonic()

    def wait_health(self, url: str, key: str, timeout: float = 30) -> None:
        def up() -> bool:
            if not self._alive(key):
                raise AssertionError(f"{key} exited: {self.log(key)[-2000:]}")
            try:
                return httpx.get(f"{url}/health", timeout=1,
                                 verify=self.verify()).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, f"{key} at {url}")

    def log(self, key: str) -> str:
        path = self.root / f"{key.replace(':', '-')}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_pool(self, name: str, **environ: str) -> None:
        """pool-managerd on ``name`` (``environ``: more variables, ``RBEES_POOL_...``)."""
        host = self.host(name)
        self.ensure_hub()
        self._spawn(f"pool:{name}", host, "pool-managerd", "--bind",
                    f"{host.address}:{host.pool_port}", "--pool-id", name,
                    "--orchestrator", self.blep.orcd_url,
                    "--heartbeat-interval", str(HEARTBEAT_S), "--health-interval", "0.5",
                    *self.tls_flags(name),
                    env=host.env(HF_ENDPOINT=self.ensure_hub().endpoint, **environ))
        self.wait_health(host.pool_url, f"pool:{name}")

    def pools(self) -> dict[str, str]:
        answer = self.http("GET", f"{self.blep.orcd_url}/v2/pools", timeout=5)
        return {p["pool_id"]: p["status"] for p in answer.json()["pools"]}

    def ensure_cluster(self, tls: bool = False) -> None:
        self.use_tls(tls)
        if not self._alive("orcd"):
            self.start_orcd()
        for name in POOLS:
            if not self._alive(f"pool:{name}"):
                self.start_pool(name)
        wait_until(lambda: all(self.pools().get(n) == "ready" for n in POOLS), 30,
                   "both pools ready in the orchestrator")
        # settled: past rbees-orcd's start-up grace (3 heartbeat intervals), in which it
        # lets its pools report in and judges no job unplaceable (NO_CAPACITY)
        settled = self.orcd_started_at + 3 * HEARTBEAT_S + 0.1
        time.sleep(max(0.0, settled - time.monotonic()))

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.daemons.get(key)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(30)

    def pool_workers(self, name: str) -> list[dict[str, Any]]:
        answer = self.http("GET", f"{self.host(name).pool_url}/v2/workers", timeout=10)
        return list(answer.json()["workers"])

    def rbees_processes(self) -> list[tuple[int, str, str]]:
        """(pid, program, host) of every live rbees program whose RBEES_HOME is one of the
        lab hosts' homes: what runs "on" a simulated host (the hosts share one pid space;
        zombies of the daemons this process started are dead, not left)."""
        import psutil

        homes = {str(host.home): name for name, host in self.lab.hosts.items()}
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                words = [Path(a).name for a in (proc.info["cmdline"] or [])[:2]]
                program = next((w for w in words if w in RBEES_PROGRAMS), None)
                if program is None or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                home = proc.environ().get("RBEES_HOME", "")
            except psutil.Error:
                continue
            if home in homes:
                found.append((proc.pid, program, homes[home]))
        return found

    def close(self) -> None:
        for key in list(self.daemons):
            self.kill(key, signal.SIGTERM)
        for name in POOLS:  # workers started over SSH, with no daemon
            host = self.host(name)
            host.run("rbees-pool", "worker", "stop", "--all", "--grace", "1", timeout=60)
        for server in self.sshd.values():
            server.stop()
        if self.hub is not None:
            self.hub.stop()
        self.lab.destroy()
