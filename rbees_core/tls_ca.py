"""A home lab's certificate authority: what ``rbees up --tls`` and ``rbees tls issue`` make.

One CA per data directory (``$RBEES_HOME/tls/ca.pem`` and its key ``ca.key``, 0600), made on
first use and kept; each host's daemons serve a certificate it signed (``<name>.pem`` and
``<name>.key``, 0600) whose subject alternative names are the host's names and addresses
(:func:`this_host`), so that a client reaching the host by any of them can verify it. Keys
are ECDSA P-256 (fast handshakes, small files). The CA certificate is what clients trust:
``--ca-file`` / ``RBEES_CA_FILE``, or the system store (:func:`trust_hint` says how).

Uses the ``cryptography`` library, imported here only: the daemons need none of this.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import Iterable
from pathlib import Path

import attrs

from rbees_core.files import private_dir, write_private

CA_DAYS = 3650
#: at most 398 days: what browsers and Apple's TLS stack accept for a server certificate
CERT_DAYS = 397


@attrs.frozen
class Issued:
    """A certificate issued by the lab CA: its files (absolute paths) and its names."""

    ca: Path
    cert: Path
    key: Path
    names: tuple[str, ...]
    addresses: tuple[str, ...]
    fresh_ca: bool = False


def this_host() -> tuple[list[str], list[str]]:
    """This host's names (``localhost``, its host name and fully qualified name) and
    addresses (loopback and every address of its interfaces but link-local ones)."""
    names = ["localhost"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in names:
            names.append(name)
    addresses = ["127.0.0.1", "::1"]
    try:
        import psutil

        for entries in psutil.net_if_addrs().values():
            for entry in entries:
                if entry.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                text = entry.address.split("%")[0]
                try:
                    ip = ipaddress.ip_address(text)
                except ValueError:
                    continue
                if not ip.is_link_local and str(ip) not in addresses:
                    addresses.append(str(ip))
    except (ImportError, OSError):  # pragma: no cover - psutil is a dependency
        pass
    return names, addresses


def _pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)


#: x509's upper bound on a common name, in characters (RFC 5280's ub-common-name)
CN_MAX = 64


def _common_name(text: str) -> str:
    """``text`` as a certificate's common name: cut to :data:`CN_MAX` characters. Clients
    check a certificate's subject alternative names, which hold the names whole (a DNS name
    may have 253 characters); the common name only labels it for people."""
    return text[:CN_MAX]


def ensure_ca(directory: Path, *, common_name: str | None = None) -> tuple[Path, bool]:
    """The CA of ``directory`` (``ca.pem``, ``ca.key`` 0600), made when missing; the
    certificate's path and whether it was made now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, False
    private_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rbees home lab"),
        x509.NameAttribute(NameOID.COMMON_NAME, _common_name(
            common_name or f"rbees lab CA ({socket.gethostname()})"))])
    start = _now()
    public = key.public_key()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(key_path, _pem_key(key).decode())
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
    return cert_path, True


def issue(directory: Path, name: str, names: Iterable[str], addresses: Iterable[str], *,
          out: Path | None = None) -> Issued:
    """A server certificate signed by ``directory``'s CA (made when missing) for ``names``
    (DNS) and ``addresses`` (IP), written as ``<name>.pem`` (the certificate, then the CA's:
    the chain a daemon serves) and ``<name>.key`` (0600) under ``out`` (default:
    ``directory``). Raises ValueError for an address that is not one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_path, fresh = ensure_ca(directory)
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    dns = list(dict.fromkeys(names))
    ips = [ipaddress.ip_address(a) for a in dict.fromkeys(addresses)]
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    start = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rbees home lab"),
                x509.NameAttribute(NameOID.COMMON_NAME,
                                   _common_name((dns or [str(ips[0])])[0]))]))
            .issuer_name(ca_cert.subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in dns] + [x509.IPAddress(ip) for ip in ips]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_encipherment=False, key_cert_sign=False,
                crl_sign=False, content_commitment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    target = out or directory
    private_dir(target)
    cert_path, key_path = target / f"{name}.pem", target / f"{name}.key"
    write_private(key_path, _pem_key(key).decode())
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_path.read_bytes()
    write_private(cert_path, chain.decode())
    if out is not None and out.resolve() != directory.resolve():
        write_private(out / "ca.pem", ca_path.read_text())
    return Issued(ca=ca_path.resolve(), cert=cert_path.resolve(), key=key_path.resolve(),
                  names=tuple(dns), addresses=tuple(str(ip) for ip in ips), fresh_ca=fresh)


def trust_hint(ca: Path) -> str:
    """How to make clients trust the lab CA ``ca``, in a few lines for people."""
    return (f"The CA that signed the daemons' certificates is {ca}.\n"
            f"Clients on this host trust it already (rbees finds it in its data directory).\n"
            f"Elsewhere: pass --ca-file {ca.name} or set RBEES_CA_FILE (rbees, rbees-pool, "
            f"pool-managerd); SDKs: SSL_CERT_FILE={ca.name} (OpenAI's, httpx).\n"
            f"To trust it system-wide: Debian/Ubuntu: sudo cp {ca} "
            f"/usr/local/share/ca-certificates/rbees-lab-ca.crt && sudo update-ca-certificates;"
            f" Fedora: sudo cp {ca} /etc/pki/ca-trust/source/anchors/ && sudo "
            f"update-ca-trust; macOS: sudo security add-trusted-cert -d -r trustRoot -k "
            f"/Library/Keychains/System.keychain {ca}")
