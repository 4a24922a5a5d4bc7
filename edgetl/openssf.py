"""Signatures in the OpenSSF model-signing format (``model_signing`` v1.x, key-based), written and checked offline.

The format (what ``model_signing sign key`` writes and ``model_signing verify key`` checks): a Sigstore bundle (JSON,
media type ``application/vnd.dev.sigstore.bundle.v0.3+json``) whose DSSE envelope holds an in-toto statement
(predicate type ``https://model_signing/signature/v1.0``) listing every file of the model with its sha256
(``resources``), how the files were chosen (``serialization``: method ``files``, the ignored paths) and, as the
subject's digest, the sha256 of all file digests concatenated in name order. The envelope is signed with ECDSA
(P-256/SHA-256, P-384/SHA-384 or P-521/SHA-512) over the DSSE pre-authentication encoding; the bundle names the key by
the sha256 of its PEM public key (``verificationMaterial.publicKey.hint``), with no transparency-log entry.

Written here with the ``cryptography`` package, because the ``model-signing`` library cannot be installed beside this
project's locked packages (it needs pydantic >= 2.12 / typing-extensions >= 4.14.1 through sigstore-models); its tool,
installed elsewhere, verifies these signatures (tested when it is on ``PATH`` or ``EDGETL_MODEL_SIGNING``).
``model_signing`` accepts elliptic-curve keys only, so an OpenSSF signature needs an ECDSA key
(``edgetl keys generate --type ecdsa-p256``); edgetl's Ed25519 manifest signature (:mod:`edgetl.signing`) is unchanged.

A bundle directory's signature is ``BUNDLE/model.sig`` and leaves out ``state/`` (device state), ``manifest.sig`` and
itself; a single file ``F`` (an exported graph) is signed into ``F.sig``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgetl.errors import BundleError

SIGNATURE = "model.sig"
MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
#: what model_signing leaves out of every directory by default (its --ignore-git-paths)
GIT_PATHS = (".git", ".gitattributes", ".gitignore", ".github")
#: left out of a bundle's signature: the device state, edgetl's own signature and this one
BUNDLE_IGNORED = ("state", "manifest.sig", SIGNATURE)
MAX_SIGNATURE_BYTES = 4 << 20


def _ec() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec


def _hash_for(key: Any) -> Any:
    from cryptography.hazmat.primitives import hashes

    size = key.curve.key_size
    if size not in (256, 384, 521):
        raise BundleError(f"elliptic curve {key.curve.name} is not one model_signing accepts (P-256, P-384, P-521)")
    return {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[size]


def is_ec_key(path: str | os.PathLike[str], private: bool = False) -> bool:
    """Whether the PEM key file ``path`` (private or public; with ``private``, a private one) holds an elliptic-curve
    key."""
    from cryptography.hazmat.primitives import serialization

    from edgetl.keyfiles import MAX_KEY_BYTES, read_small_file

    try:
        data = read_small_file(path, MAX_KEY_BYTES, "key")
    except BundleError:  # unreadable: the caller's own key loading reports it in its words
        return False
    try:
        key: Any = serialization.load_pem_public_key(data) if b"PUBLIC KEY" in data else \
            serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return False
    ec = _ec()
    return isinstance(key, (ec.EllipticCurvePrivateKey,) if private else
                      (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey))


def generate_ec_keys(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new ECDSA P-256 private key to ``out`` (PKCS#8 PEM, mode 0600) and its public key to ``out.pub``."""
    from cryptography.hazmat.primitives import serialization

    ec = _ec()
    out = Path(out)
    pub = out.with_name(out.name + ".pub")
    for path in (out, pub):
        if path.exists():
            raise BundleError(f"{path} exists; refusing to overwrite a key — choose another --out")
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return out, pub


def _files(root: Path, ignored: tuple[str, ...]) -> dict[str, str]:
    """Relative POSIX name → sha256 of every regular file under ``root`` (``{".": digest}`` for a file), leaving out
    the ``ignored`` relative paths (files or whole folders). Links are refused, as model_signing does by default."""
    from edgetl.registry import sha256_file

    if root.is_symlink():
        raise BundleError(f"{root} is a link; sign the file or folder itself")
    if root.is_file():
        return {".": sha256_file(root)}
    if not root.is_dir():
        raise BundleError(f"{root} does not exist; nothing to sign or verify")
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if (rel_dir / d).as_posix() not in ignored)
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if rel in ignored:
                continue
            path = Path(dirpath) / name
            if path.is_symlink():
                raise BundleError(f"{path} is a link; the OpenSSF signature covers regular files only")
            found[rel] = sha256_file(path)
    return found


def _root_digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(bytes.fromhex(files[name]))
    return h.hexdigest()


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of an in-toto payload."""
    return f"DSSEv1 {len(PAYLOAD_TYPE)} {PAYLOAD_TYPE} {len(payload)} ".encode() + payload


def _key_hint(public: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(public.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def default_signature(path: str | os.PathLike[str]) -> Path:
    """``DIR/model.sig`` for a folder, ``FILE.sig`` for a file."""
    path = Path(path)
    return path / SIGNATURE if path.is_dir() else path.with_name(path.name + ".sig")


def _ignored(path: Path, signature: Path, extra: tuple[str, ...]) -> tuple[str, ...]:
    names = set(GIT_PATHS) | set(extra)
    if path.is_dir():
        try:
            names.add(signature.resolve().relative_to(path.resolve()).as_posix())
        except ValueError:
            pass
    return tuple(sorted(names))


def sign_path(path: str | os.PathLike[str], private_key: str | os.PathLike[str],
              signature: str | os.PathLike[str] | None = None, ignore: tuple[str, ...] = ()) -> Path:
    """Sign a model folder or file with an EC private key (PEM); write the OpenSSF signature (default
    :func:`default_signature`) and return its path. ``ignore``: relative paths left out (a folder's)."""
    from cryptography.hazmat.primitives import serialization

    from edgetl.keyfiles import MAX_KEY_BYTES, read_small_file

    path = Path(path)
    sig_path = Path(signature) if signature is not None else default_signature(path)
    try:
        key = serialization.load_pem_private_key(read_small_file(private_key, MAX_KEY_BYTES, "private key"),
                                                 password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"cannot read private key {private_key} ({exc}); create one with `edgetl keys generate "
                          "--type ecdsa-p256`") from exc
    ec = _ec()
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BundleError(f"{private_key} is not an elliptic-curve private key; OpenSSF model signing takes ECDSA "
                          "keys: edgetl keys generate --out KEY --type ecdsa-p256")
    ignored = _ignored(path, sig_path, ignore) if path.is_dir() else GIT_PATHS
    files = _files(path, ignored if path.is_dir() else ())
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": path.resolve().name, "digest": {"sha256": _root_digest(files)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                              "ignore_paths": list(ignored)},
            "resources": [{"name": name, "algorithm": "sha256", "digest": files[name]} for name in sorted(files)],
        },
    }
    payload = json.dumps(statement, indent=2).encode("utf-8")
    sig = key.sign(_pae(payload), ec.ECDSA(_hash_for(key)))
    bundle = {
        "mediaType": MEDIA_TYPE,
        "verificationMaterial": {"publicKey": {"hint": _key_hint(key.public_key())}, "tlogEntries": []},
        "dsseEnvelope": {"payload": base64.b64encode(payload).decode("ascii"), "payloadType": PAYLOAD_TYPE,
                         "signatures": [{"sig": base64.b64encode(sig).decode("ascii"), "keyid": ""}]},
    }
    tmp = sig_path.with_name(f".{sig_path.name}.tmp")
    tmp.write_text(json.dumps(bundle, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, sig_path)
    return sig_path


def _public_key(public_key: str | os.PathLike[str]) -> Any:
    from cryptography.hazmat.primitives import serialization

    from edgetl.keyfiles import MAX_KEY_BYTES, read_small_file

    try:
        public = serialization.load_pem_public_key(read_small_file(public_key, MAX_KEY_BYTES, "trusted public key"))
    except (ValueError, TypeError) as exc:
        raise BundleError(f"cannot read trusted public key {public_key} ({exc})") from exc
    if not isinstance(public, _ec().EllipticCurvePublicKey):
        raise BundleError(f"trusted key {public_key} is not an elliptic-curve public key (OpenSSF model signing)")
    return public


def verify_statement(signature: bytes, public_key: str | os.PathLike[str], where: str) -> tuple[dict[str, str],
                                                                                              tuple[str, ...]]:
    """Check an OpenSSF signature file's bytes against an EC public key (PEM): the envelope's signature, the key hint
    and the statement's own consistency. Returns (signed name → sha256, ignored paths); :class:`BundleError`
    otherwise (``where`` names the signature in messages)."""
    from cryptography.exceptions import InvalidSignature

    public = _public_key(public_key)
    ec = _ec()
    try:
        bundle = json.loads(signature)
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"], validate=True)
        sig = base64.b64decode(envelope["signatures"][0]["sig"], validate=True)
        hint = bundle.get("verificationMaterial", {}).get("publicKey", {}).get("hint")
        if bundle.get("mediaType") != MEDIA_TYPE or envelope.get("payloadType") != PAYLOAD_TYPE:
            raise ValueError("not a Sigstore bundle with an in-toto DSSE envelope")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BundleError(f"{where} is malformed ({exc}); sign the model again") from exc
    if hint and hint != _key_hint(public):
        raise BundleError(f"{where} was made with another key than the trusted {public_key}; refusing it")
    try:
        public.verify(sig, _pae(payload), ec.ECDSA(_hash_for(public)))
    except InvalidSignature as exc:
        raise BundleError(f"{where} is not a valid signature by the trusted key {public_key} (tampered signature or "
                          "another key); refusing it") from exc
    try:
        statement = json.loads(payload)
        predicate = statement["predicate"]
        signed = {str(r["name"]): str(r["digest"]) for r in predicate["resources"]}
        ignored = tuple(str(p) for p in predicate.get("serialization", {}).get("ignore_paths", []))
        root = statement["subject"][0]["digest"]["sha256"]
        if statement.get("predicateType") != PREDICATE_TYPE or predicate["serialization"]["method"] != "files":
            raise ValueError(f"predicate {statement.get('predicateType')} / {predicate['serialization']['method']}")
        consistent = _root_digest(signed) == root
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise BundleError(f"{where} holds an unexpected statement ({exc}); only file-by-file sha256 signatures are "
                          "checked here") from exc
    if not consistent:
        raise BundleError(f"{where} is inconsistent (its file digests do not hash to its subject); refusing it")
    return signed, ignored


def verify_path(path: str | os.PathLike[str], public_key: str | os.PathLike[str],
                signature: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Check an OpenSSF signature of a model folder or file against an EC public key (PEM): the envelope's signature,
    the key hint, and every file's sha256 (no file missing, none added outside the ignored paths). Returns the signed
    name → sha256; raises :class:`BundleError` naming what failed."""
    from edgetl.keyfiles import read_small_file

    path = Path(path)
    sig_path = Path(signature) if signature is not None else default_signature(path)
    _public_key(public_key)  # a bad key is reported before a missing signature
    if not sig_path.is_file():
        raise BundleError(f"{path} has no OpenSSF signature ({sig_path} is missing) but a trusted key is required; "
                          "sign it: edgetl bundle sign BUNDLE --key EC_KEY")
    signed, ignored = verify_statement(read_small_file(sig_path, MAX_SIGNATURE_BYTES, "signature"), public_key,
                                       f"OpenSSF signature {sig_path}")
    actual = _files(path, ignored if path.is_dir() else ())
    if actual != signed:
        changed = sorted(n for n in signed.keys() & actual.keys() if signed[n] != actual[n])
        missing, added = sorted(signed.keys() - actual.keys()), sorted(actual.keys() - signed.keys())
        raise BundleError(f"{path} does not match its OpenSSF signature (changed: {changed or '-'}; missing: "
                          f"{missing or '-'}; unsigned files: {added or '-'}); copy it again from a trusted source")
    return signed


def sign_bundle(bundle: str | os.PathLike[str], private_key: str | os.PathLike[str]) -> Path:
    """``BUNDLE/model.sig`` over every bundle file but the device state and edgetl's own signature."""
    return sign_path(bundle, private_key, ignore=BUNDLE_IGNORED)


def verify_manifest(signature: bytes | None, manifest_bytes: bytes, public_key: str | os.PathLike[str],
                    where: str) -> None:
    """An OpenSSF signature (the bytes of ``model.sig``; None: absent) by the key covers exactly these manifest bytes —
    and so, through the manifest's sha256 records, every file (``device install`` checks an archive this way before
    extracting anything)."""
    _public_key(public_key)
    if signature is None:
        raise BundleError(f"bundle {where} has no OpenSSF signature ({SIGNATURE}) but a trusted key is required; sign "
                          "it on the host: edgetl bundle sign BUNDLE --key EC_KEY")
    signed, _ = verify_statement(signature, public_key, f"OpenSSF signature of {where}")
    if signed.get("manifest.json") != hashlib.sha256(manifest_bytes).hexdigest():
        raise BundleError(f"bundle {where}: its manifest is not the one its OpenSSF signature covers; refusing it")


def verify_bundle(bundle: Path, manifest_bytes: bytes, public_key: str | os.PathLike[str]) -> None:
    """A bundle's OpenSSF signature is valid for the key, and signs exactly these manifest bytes."""
    signed = verify_path(bundle, public_key)
    if signed.get("manifest.json") != hashlib.sha256(manifest_bytes).hexdigest():
        raise BundleError(f"bundle {bundle}: the manifest read does not match the one its OpenSSF signature covers; "
                          "refusing it")


__all__ = ["SIGNATURE", "default_signature", "generate_ec_keys", "is_ec_key", "sign_bundle", "sign_path",
           "verify_bundle", "verify_manifest", "verify_path", "verify_statement"]
