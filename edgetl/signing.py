"""Ed25519 signatures over the bundle manifest (which covers every file by sha256).

``manifest.sig`` holds the raw 64-byte signature of ``manifest.json``'s exact bytes. Keys are PEM files: the private
key (PKCS#8, written with mode 0600) and ``KEY.pub`` (SubjectPublicKeyInfo). Uses the ``cryptography`` package.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgetl.errors import BundleError, RuntimeMissingError

SIGNATURE = "manifest.sig"


def _crypto():  # type: ignore[no-untyped-def]
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise RuntimeMissingError("signatures need the cryptography package: pip install cryptography") from exc
    return serialization, ed25519


def generate_keys(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new Ed25519 private key to ``out`` (0600) and its public key to ``out.pub``; refuse to overwrite."""
    serialization, ed25519 = _crypto()
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
    """Sign ``bundle/manifest.json`` with the private key file ``key``; write ``bundle/manifest.sig``."""
    serialization, ed25519 = _crypto()
    try:
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot read private key {key} ({exc}); create one with `edgetl keys generate`") from exc
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{key} is not an Ed25519 private key; create one with `edgetl keys generate`")
    path = Path(bundle) / SIGNATURE
    path.write_bytes(private.sign((Path(bundle) / "manifest.json").read_bytes()))
    return path


def verify_signature(bundle: Path, manifest_bytes: bytes, public_key: str | os.PathLike[str]) -> None:
    """Raise :class:`BundleError` unless ``manifest.sig`` is a valid signature of ``manifest_bytes`` by the key."""
    serialization, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        public = serialization.load_pem_public_key(Path(public_key).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot read trusted public key {public_key} ({exc})") from exc
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise BundleError(f"trusted key {public_key} is not an Ed25519 public key")
    sig_path = bundle / SIGNATURE
    if not sig_path.is_file():
        raise BundleError(f"bundle {bundle} is not signed but a trusted key is required; sign it on the host "
                          "(edgetl export … --sign KEY or edgetl bundle sign)")
    try:
        public.verify(sig_path.read_bytes(), manifest_bytes)
    except InvalidSignature as exc:
        raise BundleError(f"bundle {bundle} has a bad signature for the trusted key {public_key} (tampered manifest "
                          "or signed by another key); refusing it") from exc
