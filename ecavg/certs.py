"""Credentials for a Flower deployment: a TLS certificate authority, the SuperLink's certificate, and one
authentication key pair per SuperNode (``ecavg certs``).

* ``ca.crt`` / ``ca.key``: a private CA. Every SuperNode (and the ``flwr`` CLI) gets ``ca.crt`` to verify
  the SuperLink; ``ca.key`` stays offline with whoever issues certificates.
* ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, valid for the host names and IP
  addresses the SuperNodes use to reach it (subject alternative names), signed by the CA, and always for
  loopback (:data:`LOOPBACK_HOSTS`): the SuperLink's own helper (``flower-superexec``) connects to
  127.0.0.1 over TLS, and so do operators on the server host or through an SSH tunnel.
* ``nodes/edge-K`` / ``nodes/edge-K.pub``: an EC P-384 key pair in OpenSSH format per SuperNode, for
  Flower's SuperNode authentication: the public key is registered with the SuperLink
  (``flwr supernode register``), the private key never leaves the edge host.

Flower's SuperNodes do not present client certificates (no mutual TLS): the TLS certificate proves the
server to the edges, the registered key pair proves each edge to the server.

Needs the ``cryptography`` package, which Flower depends on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ecavg.errors import CertificateError

DEFAULT_DAYS = 365
# Always in the SuperLink certificate: Flower's SuperExec reaches the SuperLink's Runtime API on 127.0.0.1 (also when
# the SuperLink listens on 0.0.0.0), and a certificate without it makes every run sit in `pending` without an error.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")

@dataclass
class Credentials:
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[tuple[Path, Path]] = field(default_factory=list)  # (private key, public key) per node


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CertificateError(f"{path} exists; pass --force (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Private keys are created readable by their owner only, never world-readable even for an instant.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alternative_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise CertificateError("an empty host name was given for the server certificate")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            if address.is_unspecified:
                raise CertificateError(f"{host} is an address to listen on, not one to connect to: give the name or "
                                       "address the SuperNodes use in --superlink")
            names.append(x509.IPAddress(address))
        else:
            if any(c in host for c in "/: ") or host.startswith("-"):
                raise CertificateError(f"{host!r} is neither an IP address nor a DNS name")
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise CertificateError(f"certificates must be valid for at least 1 day, got {days}")
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # small backdate for clock skew


def server_hosts(hosts: list[str]) -> list[str]:
    """The names and addresses the SuperLink certificate covers: ``hosts``, then loopback, each once."""
    return list(dict.fromkeys([h.strip() for h in hosts] + list(LOOPBACK_HOSTS)))


def make_credentials(directory: str | Path, *, hosts: list[str], num_nodes: int = 0, days: int = DEFAULT_DAYS,
                     overwrite: bool = False) -> Credentials:
    """Write a CA, a SuperLink certificate valid for ``hosts`` and loopback (:func:`server_hosts`) and
    ``num_nodes`` SuperNode key pairs."""
    if not hosts:
        raise CertificateError("give at least one host name or IP address the SuperNodes use to reach the SuperLink")
    if num_nodes < 0:
        raise CertificateError(f"the number of node key pairs must be >= 0, got {num_nodes}")
    root = Path(directory)
    creds = Credentials(root, root / "ca.crt", root / "ca.key", root / "server.crt", root / "server.key")
    not_before, not_after = _validity(days)
    san = _subject_alternative_names(server_hosts(hosts))

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ecavg deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(creds.ca_key, _pem_key(ca_key), private=True, overwrite=overwrite)
    _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)
    _write(creds.server_key, _pem_key(server_key), private=True, overwrite=overwrite)
    _write(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False, overwrite=overwrite)
    for k in range(num_nodes):
        creds.node_keys.append(make_node_key_pair(root / "nodes" / f"edge-{k}", overwrite=overwrite))
    return creds


def make_node_key_pair(private_path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format (what Flower's SuperNode authentication reads):
    ``private_path`` and ``private_path.pub``."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True, overwrite=overwrite)
    _write(public_path, public + f" {private_path.name}\n".encode(), private=False, overwrite=overwrite)
    return private_path, public_path
