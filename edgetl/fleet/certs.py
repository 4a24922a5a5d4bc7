"""Certificates and keys for a fleet on Flower's deployment engine (``edgetl fleet certs``), made with ``cryptography``.

One call writes, under ``OUT``:

- ``ca.crt`` / ``ca.key``: a private certificate authority (ECDSA P-384). Every device gets ``ca.crt`` (its SuperNode
  verifies the SuperLink with it: ``--root-certificates``), and so does the operator's ``flwr`` CLI
  (``root-certificates`` in its connection). Keep ``ca.key`` offline.
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, for the names and addresses given
  (``localhost`` and ``127.0.0.1`` by default; add the server's DNS name or IP for a real fleet).
- ``nodes/NAME`` / ``nodes/NAME.pub``: one node-authentication key pair per device (ECDSA P-384 in OpenSSH format, as
  Flower's SuperNode authentication expects). The device keeps ``NAME`` (``--auth-supernode-private-key``); the
  operator registers ``NAME.pub`` with the SuperLink (``flwr supernode register``). A SuperLink started with
  ``--enable-supernode-auth`` refuses every device whose public key is not registered.

The operator's head-signing key is the Ed25519 bundle key (``edgetl keys generate``), not one of these.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from edgetl.errors import DataError, RuntimeMissingError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class NodeKey(NamedTuple):
    """A device's node-authentication key pair: the private key it keeps and the public key the SuperLink registers."""

    private: Path
    public: Path


@dataclass(frozen=True)
class FleetCerts:
    """Paths written by :func:`make_certs`."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, NodeKey] = field(default_factory=dict)  #: name → its key pair


@dataclass(frozen=True)
class _Crypto:
    """The parts of ``cryptography`` used here."""

    x509: Any
    hashes: Any
    serialization: Any
    ec: Any
    eku: Any  #: ``ExtendedKeyUsageOID``
    oid: Any  #: ``NameOID``


def _crypto() -> _Crypto:
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise RuntimeMissingError("fleet certificates need the cryptography package: pip install cryptography") \
            from exc
    return _Crypto(x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _sans(hosts: Sequence[str]):  # type: ignore[no-untyped-def]
    x509 = _crypto().x509
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certs(out: str | os.PathLike[str], hosts: Sequence[str] = ("localhost", "127.0.0.1"),
               nodes: Sequence[str] = (), days: int = 365) -> FleetCerts:
    """Write a CA, a SuperLink certificate for ``hosts`` and one node-auth key pair per name in ``nodes``.

    Refuses to overwrite an existing file (a second call with new ``nodes`` only adds their key pairs when the CA and
    server files exist already)."""
    crypto = _crypto()
    out = Path(out)
    _check_request(out, hosts, nodes, days)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nodes").mkdir(exist_ok=True)
    certs = FleetCerts(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key")
    authority = (certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key)
    if not all(p.exists() for p in authority):
        for path in authority:
            if path.exists():
                raise DataError(f"{path} exists but the CA/server set is incomplete; remove it or choose another "
                                "folder")
        _write_authority(crypto, certs, hosts, days)
    for name in nodes:
        certs.node_keys[name] = _write_node_key(crypto, out / "nodes", name)
    return certs


def _check_request(out: Path, hosts: Sequence[str], nodes: Sequence[str], days: int) -> None:
    if not hosts:
        raise DataError("the SuperLink certificate needs at least one host name or IP address (--host)")
    for name in nodes:
        if not _NAME.match(name):
            raise DataError(f"node name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if days < 1:
        raise DataError(f"certificate validity must be at least 1 day, found {days}")
    for folder in (out, out / "nodes"):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise DataError(f"{folder} exists and is not a folder (or is a link); name a new or existing certificate "
                            "folder")


def _write_authority(crypto: _Crypto, certs: FleetCerts, hosts: Sequence[str], days: int) -> None:
    """A new CA and the SuperLink's certificate signed by it, valid from five minutes ago for ``days`` days."""
    x509, oid, serialization = crypto.x509, crypto.oid, crypto.serialization
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_private = crypto.ec.generate_private_key(crypto.ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(oid.COMMON_NAME, "edgetl fleet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_private.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_private.public_key()), critical=False)
          .sign(ca_private, crypto.hashes.SHA256()))
    server_private = crypto.ec.generate_private_key(crypto.ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(oid.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_private.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
              .add_extension(_sans(hosts), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([crypto.eku.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()),
                             critical=False)
              .sign(ca_private, crypto.hashes.SHA256()))
    pem, pkcs8, none = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    _write_private(certs.ca_key, ca_private.private_bytes(pem, pkcs8, none))
    _write_private(certs.server_key, server_private.private_bytes(pem, pkcs8, none))
    certs.ca_cert.write_bytes(ca.public_bytes(pem))
    certs.server_cert.write_bytes(server.public_bytes(pem))


def _write_node_key(crypto: _Crypto, folder: Path, name: str) -> NodeKey:
    """A new ECDSA P-384 key pair in OpenSSH format: ``folder/name`` (0600) and ``folder/name.pub``."""
    serialization = crypto.serialization
    key = NodeKey(folder / name, folder / f"{name}.pub")
    if key.private.exists() or key.public.exists():
        raise DataError(f"{key.private} exists; refusing to overwrite a device key — choose another node name")
    private = crypto.ec.generate_private_key(crypto.ec.SECP384R1())
    _write_private(key.private, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))
    key.public.write_bytes(private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b" " +
                           name.encode() + b"\n")
    return key
