"""Ed25519 signatures over the bundle manifest (which covers every file by sha256); ECDSA keys sign and verify in the
OpenSSF model-signing format instead (:mod:`edgetl.openssf`).

``manifest.sig`` holds the raw 64-byte signature of ``manifest.json``'s exact bytes. Keys are PEM files: the private
key (PKCS#8, written with mode 0600) and ``KEY.pub`` (SubjectPublicKeyInfo). Uses the ``cryptography`` package.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgetl.errors import BundleError, RuntimeMissingError
from edgetl.keyfiles import MAX_KEY_BYTES, read_small_file

SIGNATURE = "manifest.sig"
MAX_SIGNATURE_BYTES = 1024  #: the raw signature is 64 bytes


def crypto():  # type: ignore[no-untyped-def]
    """The ``cryptography`` modules edgetl signs with: ``(serialization, ed25519)``; a one-line error without it."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise RuntimeMissingError("signatures need the cryptography package: pip install cryptography") from exc
    return serialization, ed25519


def generate_keys(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``out`` (0600) and its public key to ``out.pub``; refuse to overwrite."""
    serialization, ed25519 = crypto()
    out = Path(out)
    pub = out.with_name(out.name + ".pub")
    for path in (out, pub):
        if path.exists():
            raise BundleError(f"{path} exists; refusing to overwrite a key — choose another --out")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return out, pub


def sign_bundle(bundle: str | os.PathLike[str], key: str | os.PathLike[str]) -> Path:
    """Sign ``bundle/manifest.json`` with the private key file ``key``; write ``bundle/manifest.sig``. An ECDSA key
    writes an OpenSSF model-signing signature, ``bundle/model.sig``, instead (:mod:`edgetl.openssf`)."""
    serialization, ed25519 = crypto()
    from edgetl import openssf

    if openssf.is_ec_key(key, private=True):
        return openssf.sign_bundle(bundle, key)
    try:
        private = serialization.load_pem_private_key(read_small_file(key, MAX_KEY_BYTES, "private key"),
                                                     password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"cannot read private key {key} ({exc}); create one with `edgetl keys generate`") from exc
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{key} is not an Ed25519 private key; create one with `edgetl keys generate`")
    path = Path(bundle) / SIGNATURE
    path.write_bytes(private.sign((Path(bundle) / "manifest.json").read_bytes()))
    return path


def load_public_key(public_key: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    """The Ed25519 public key in the PEM file ``public_key`` (read with a size limit)."""
    serialization, ed25519 = crypto()
    data = read_small_file(public_key, MAX_KEY_BYTES, "trusted public key")
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"cannot read trusted public key {public_key} ({exc})") from exc
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise BundleError(f"trusted key {public_key} is not an Ed25519 public key")
    return public


def verify_manifest(signature: bytes | None, manifest_bytes: bytes, public_key: str | os.PathLike[str],
                    where: str) -> None:
    """Raise :class:`BundleError` unless ``signature`` is a valid signature of ``manifest_bytes`` by the key
    (``where`` names the bundle or archive in messages; ``signature`` None: the bundle is not signed)."""
    public = load_public_key(public_key)
    from cryptography.exceptions import InvalidSignature

    if signature is None:
        raise BundleError(f"bundle {where} is not signed but a trusted key is required; sign it on the host "
                          "(edgetl export … --sign KEY or edgetl bundle sign)")
    try:
        public.verify(signature, manifest_bytes)
    except InvalidSignature as exc:
        raise BundleError(f"bundle {where} has a bad signature for the trusted key {public_key} (tampered manifest "
                          "or signed by another key); refusing it") from exc


def verify_signature(bundle: Path, manifest_bytes: bytes, public_key: str | os.PathLike[str]) -> None:
    """Raise :class:`BundleError` unless ``manifest.sig`` is a valid signature of ``manifest_bytes`` by the key (an
    ECDSA key: unless ``model.sig`` is a valid OpenSSF signature of the bundle's files, this manifest included)."""
    crypto()
    from edgetl import openssf

    if openssf.is_ec_key(public_key):
        openssf.verify_bundle(bundle, manifest_bytes, public_key)
        return
    load_public_key(public_key)  # a bad key is reported before a missing signature
    sig_path = bundle / SIGNATURE
    signature = read_small_file(sig_path, MAX_SIGNATURE_BYTES, "signature") if sig_path.is_file() else None
    verify_manifest(signature, manifest_bytes, public_key, str(bundle))
