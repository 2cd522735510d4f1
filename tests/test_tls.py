"""TLS (issue 25): the home-lab CA, the daemons over HTTPS with real certificates from it,
the clients' verification and their one-line errors, the plaintext-bind warning."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rbees_core.errors import ConfigError
from rbees_core.testing import find_free_port, wait_http
from rbees_core.testing.cluster import BIN, Cluster, up
from rbees_core.tls import ServerTLS, server_tls, tls_failure, use_ca_file
from rbees_core.tls_ca import issue


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = up(tmp_path_factory.mktemp("tls") / "home", "--tls")
    yield c
    c.rbees("down")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that signed nothing the cluster serves."""
    return issue(tmp_path_factory.mktemp("other-ca"), "x", ["x"], []).ca


def ca_of(cluster: Cluster) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cluster.home / "tls" / "ca.pem"))


def test_the_lab_ca_issues_private_certificates_naming_the_host(tmp_path: Path) -> None:
    from cryptography import x509

    issued = issue(tmp_path / "tls", "gpu1", ["gpu1", "gpu1.lan"], ["10.0.0.5", "::1"])
    for path in (issued.cert, issued.key, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    cert = x509.load_pem_x509_certificates(issued.cert.read_bytes())
    assert len(cert) == 2  # the certificate, then the CA's: the chain a daemon serves
    sans = cert[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gpu1", "gpu1.lan"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    again = issue(tmp_path / "tls", "gpu2", ["gpu2"], [])
    assert again.ca == issued.ca and not again.fresh_ca and issued.fresh_ca  # one CA, kept
    assert server_tls(str(issued.cert), str(issued.key)) == ServerTLS(str(issued.cert),
                                                                        str(issued.key))


def test_a_dns_name_longer_than_a_common_name_is_certified_whole(tmp_path: Path) -> None:
    """x509 caps a common name at 64 characters, a DNS name may have 253: the name goes
    whole into the subject alternative names, which clients check, and a TLS client
    verifies it there; the common name is its first 64 characters."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    long = f"{'a' * 40}.{'b' * 40}.lan"  # 85 characters, each label under 64
    issued = issue(tmp_path / "tls", "gpu1", [long], [])
    cert = x509.load_pem_x509_certificates(issued.cert.read_bytes())[0]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [long]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == long[:64]
    context = ssl.create_default_context(cafile=str(issued.ca))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(issued.cert), str(issued.key))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=long)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # the handshake, in memory: the client checks the name
        for side in (client, srv):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(outgoing.read())
        incoming.write(s_out.read())
    client.do_handshake()  # done: raises SSLCertVerificationError on a name mismatch


def test_bad_tls_settings_are_one_clear_error(tmp_path: Path) -> None:
    issued = issue(tmp_path / "tls", "h", ["h"], [])
    other = issue(tmp_path / "tls", "o", ["o"], [])
    with pytest.raises(ConfigError, match="go together"):
        server_tls(str(issued.cert), None)
    with pytest.raises(ConfigError, match="no such file"):
        server_tls(str(tmp_path / "nope.pem"), str(issued.key))
    with pytest.raises(ConfigError, match="do not load"):
        server_tls(str(issued.cert), str(other.key))  # a key that is not the certificate's
    issued.key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        server_tls(str(issued.cert), str(issued.key))
    with pytest.raises(ConfigError, match="not a CA certificate"):
        use_ca_file(str(issued.key))


def test_the_cluster_serves_https_end_to_end_and_its_workers_too(cluster: Cluster) -> None:
    assert cluster.url.startswith("https://") and cluster.pool_url.startswith("https://")
    verify = ca_of(cluster)
    body = {"model": "smollm2", "prompt": "Bees are", "max_tokens": 4, "temperature": 0}
    accepted = httpx.post(f"{cluster.url}/v2/tasks", json=body, verify=verify, timeout=30)
    assert accepted.status_code == 202, accepted.text
    events = httpx.get(f"{cluster.url}{accepted.json()['events_url']}", verify=verify,
                       timeout=120)
    assert "event: end" in events.text, events.text[-500:]
    workers = httpx.get(f"{cluster.pool_url}/v2/workers", verify=verify,
                        timeout=10).json()["workers"]
    uri = workers[0]["uri"]  # started by a pool with TLS: HTTPS, its pool's certificate
    assert uri.startswith("https://127.0.0.1:"), workers
    assert httpx.get(f"{uri}/v2/ready", verify=verify, timeout=10).status_code in (200, 401)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{uri.replace('https', 'http')}/v2/ready", timeout=5)
    logs = {name: (cluster.home / "logs" / f"{name}.log").read_text()
            for name in ("rbees-orcd", "pool-managerd")}
    for name, text in logs.items():
        listening = [json.loads(line) for line in text.splitlines() if '"listening"' in line]
        assert listening[-1]["tls"] is True and listening[-1]["url"].startswith("https://")
        assert "plaintext_bind" not in text, name  # loopback: no warning


def test_the_cli_verifies_with_the_home_ca_and_a_wrong_ca_is_one_line(
        cluster: Cluster, other_ca: Path) -> None:
    listed = cluster.rbees("jobs", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr  # the data directory's CA: trusted here
    for args, env in ((["--ca-file", str(other_ca), "jobs", "list"], {}),
                      (["keys", "list"], {"RBEES_CA_FILE": str(other_ca)})):
        done = subprocess.run([str(BIN / "rbees"), *args], env={**cluster.env, **env},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "certificate is not trusted" in lines[0] and "--ca-file" in lines[0]
        assert "Traceback" not in done.stderr


def test_a_pool_with_a_wrong_ca_cannot_heartbeat_and_says_why(
        cluster: Cluster, other_ca: Path, tmp_path: Path) -> None:
    home = tmp_path / "pool2"
    issued = issue(cluster.home / "tls", "pool2", ["localhost"], ["127.0.0.1"])
    port = find_free_port()
    log = open(tmp_path / "pool2.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "pool-managerd"), "--bind", f"127.0.0.1:{port}", "--pool-id", "pool2",
         "--orchestrator", cluster.url, "--heartbeat-interval", "0.2",
         "--tls-cert", str(issued.cert), "--tls-key", str(issued.key),
         "--ca-file", str(other_ca)],
        env={**cluster.env, "RBEES_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_http(f"https://127.0.0.1:{port}/health", proc=proc, timeout=30,
                  verify=ca_of(cluster))
        pools = httpx.get(f"{cluster.url}/v2/pools", verify=ca_of(cluster),
                          timeout=10).json()["pools"]
        assert "pool2" not in {p["pool_id"] for p in pools}
        deadline = time.monotonic() + 15
        text = ""
        while "not trusted" not in text and time.monotonic() < deadline:
            time.sleep(0.2)
            text = (tmp_path / "pool2.log").read_text()
        assert "not trusted" in text, text[-2000:]
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_host_address_without_tls_warns_in_one_json_line(tmp_path: Path) -> None:
    port = find_free_port()
    proc = subprocess.Popen(
        [str(BIN / "rbees-orcd"), "--bind", f"0.0.0.0:{port}"],
        env={**os.environ, "RBEES_HOME": str(tmp_path), "RBEES_API_TOKEN": "t" * 32},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc, timeout=30)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    warned = [json.loads(line) for line in out.decode().splitlines()
              if '"plaintext_bind"' in line]
    assert len(warned) == 1 and warned[0]["level"] == "warning", out.decode()[-2000:]
    assert "--tls-cert" in warned[0]["hint"]


def test_tls_failures_are_named(cluster: Cluster) -> None:
    port = find_free_port()
    server = subprocess.Popen([str(BIN / "python"), "-m", "http.server", str(port),
                               "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout=30, proc=server)
        with pytest.raises(httpx.HTTPError) as plain_http:
            httpx.get(f"https://127.0.0.1:{port}/", timeout=5)
        assert "plain HTTP" in (tls_failure(plain_http.value) or "")
    finally:
        server.terminate()
        server.wait(10)
    with pytest.raises(httpx.HTTPError) as untrusted:
        httpx.get(f"{cluster.url}/health", timeout=5)  # certifi: the lab CA is not in it
    assert "not trusted" in (tls_failure(untrusted.value) or "")
    assert tls_failure(ValueError("x")) is None


def test_service_units_with_tls_serve_https_with_the_lab_certificate(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path / "user"), "RBEES_HOME": str(tmp_path / "home"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    done = subprocess.run([str(BIN / "rbees"), "service", "install", "--kind", "systemd",
                           "--no-start", "--tls", "--bind", "127.0.0.1:8181"], env=env,
                          text=True, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    units = tmp_path / "config" / "systemd" / "user"
    tls = tmp_path / "home" / "tls"
    flags = (f"--tls-cert {tls / 'server.pem'} --tls-key {tls / 'server.key'} "
             f"--ca-file {tls / 'ca.pem'}")
    assert flags in (units / "rbees-orcd.service").read_text()
    pool = (units / "rbees-pool.service").read_text()
    assert "--orchestrator https://127.0.0.1:8181" in pool and flags in pool


def test_rbees_pool_daemon_start_serves_https_and_its_status_verifies(tmp_path: Path) -> None:
    issued = issue(tmp_path / "ca", "local", ["localhost"], ["127.0.0.1"])
    env = {**os.environ, "RBEES_HOME": str(tmp_path / "home"), "RBEES_CA_FILE": str(issued.ca)}
    port = find_free_port()

    def pool(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "rbees-pool"), *args], env=env, text=True,
                              capture_output=True, timeout=60)

    started = pool("daemon", "start", "--bind", f"127.0.0.1:{port}", "--tls-cert",
                   str(issued.cert), "--tls-key", str(issued.key), "--format", "json")
    try:
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["url"] == f"https://127.0.0.1:{port}"
        status = pool("daemon", "status", "--format", "json")
        assert json.loads(status.stdout)[0]["workers"] == 0, status.stdout  # it verified
    finally:
        pool("daemon", "stop")


def test_rbees_tls_issue_names_the_bad_flag_in_one_line(tmp_path: Path) -> None:
    """A name that is no file name, an address that is none, a DNS name x509 refuses and a
    folder that cannot be written are each one line naming what is wrong, exit 1."""
    env = {**os.environ, "RBEES_HOME": str(tmp_path / "home")}
    for args, said in ((["../gpu1"], "NAME: must match"),
                       (["gpu1", "--ip", "300.1.1.1"], "--ip: "),
                       (["gpu1", "--dns", ""], "--dns: "),
                       (["gpu1", "--out", str(tmp_path / "file" / "sub")], "cannot write")):
        (tmp_path / "file").write_text("")  # a file where --out wants a folder
        done = subprocess.run([str(BIN / "rbees"), "tls", "issue", *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and said in lines[0], (args, done.stderr)
    assert not (tmp_path / "home" / "gpu1.pem").exists()  # "../gpu1" wrote beside tls/
