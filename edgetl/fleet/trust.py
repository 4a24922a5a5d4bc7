"""Signed fleet heads: the aggregated head is signed with the operator's Ed25519 key (the same keys as bundles,
``edgetl keys generate``); a device verifies it against its trusted public key before its promote gate sees it.

The signature covers one statement: a fixed tag, the sha256 of the head file's exact bytes, the extractor sha256 the
head was built for and the label list (JSON). A head moved to another extractor, relabelled, or changed by one byte no
longer verifies. ``OUT/head.sig`` holds the raw 64-byte signature; ``fleet.json`` names the signer (the key's
fingerprint: the first 16 hex digits of the sha256 of its raw public bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from edgetl.errors import BundleError
from edgetl.keyfiles import MAX_KEY_BYTES, read_small_file
from edgetl.signing import MAX_SIGNATURE_BYTES, crypto, load_public_key

SIGNATURE_FILE = "head.sig"
_TAG = b"edgetl fleet head v1\n"


@dataclass(frozen=True)
class HeadSignature:
    """A head's signature and the fingerprint of the key that made it."""

    signature: bytes
    signer: str


def statement(head: bytes, labels: Sequence[str], extractor_sha256: str) -> bytes:
    """The bytes a fleet-head signature covers."""
    return (_TAG + hashlib.sha256(head).hexdigest().encode() + b"\n" + extractor_sha256.encode() + b"\n"
            + json.dumps([str(c) for c in labels]).encode())


def fingerprint(public) -> str:  # type: ignore[no-untyped-def]
    """First 16 hex digits of the sha256 of an Ed25519 public key's raw bytes."""
    serialization, _ = crypto()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_head(head: bytes, labels: Sequence[str], extractor_sha256: str,
              key: str | os.PathLike[str]) -> HeadSignature:
    """Sign a head file's bytes (with its labels and extractor) with the operator's Ed25519 private key file."""
    serialization, ed25519 = crypto()
    try:
        private = serialization.load_pem_private_key(read_small_file(key, MAX_KEY_BYTES, "head-signing key"),
                                                     password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"cannot read head-signing key {key} ({exc}); create one with `edgetl keys generate`") \
            from exc
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{key} is not an Ed25519 private key; create one with `edgetl keys generate`")
    return HeadSignature(private.sign(statement(head, labels, extractor_sha256)), fingerprint(private.public_key()))


def verify_head(head: bytes, labels: Sequence[str], extractor_sha256: str, signature: bytes | None,
                trusted_key: str | os.PathLike[str], where: str) -> str:
    """Raise :class:`BundleError` unless ``signature`` is the trusted key's signature of this head; return the
    signer's fingerprint. ``where`` names the head in messages; ``signature`` None or empty: the head is unsigned."""
    public = load_public_key(trusted_key)
    from cryptography.exceptions import InvalidSignature

    if not signature:
        raise BundleError(f"fleet head {where} is not signed but this device trusts only heads signed by "
                          f"{trusted_key}; start the fleet server with --sign-key")
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise BundleError(f"fleet head {where} has a {len(signature)}-byte signature; an Ed25519 signature has 64")
    try:
        public.verify(signature, statement(head, labels, extractor_sha256))
    except InvalidSignature as exc:
        raise BundleError(f"fleet head {where} does not verify with the trusted key {trusted_key} (tampered head, "
                          "labels or extractor, or signed by another key); refusing it") from exc
    return fingerprint(public)
