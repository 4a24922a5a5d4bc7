"""OpenSSF model-signing signatures (edgetl.openssf): bundles and exported graphs, signed with ECDSA keys, checked by
``device verify --trust`` and — where the ``model_signing`` tool is installed (its own environment: it cannot be
installed beside this project's locked pydantic) — by that tool, in both directions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.bundle import Bundle
from edgetl.cli import main
from edgetl.errors import BundleError
from edgetl.openssf import generate_ec_keys, sign_path, verify_path
from edgetl.signing import generate_keys, sign_bundle


def _tool() -> str | None:
    """The ``model_signing`` command: $EDGETL_MODEL_SIGNING, else on PATH."""
    return os.environ.get("EDGETL_MODEL_SIGNING") or shutil.which("model_signing")


@pytest.fixture(scope="module")
def model_signing_tool(tmp_path_factory: pytest.TempPathFactory) -> str:
    """OpenSSF's ``model_signing`` command: the one named by $EDGETL_MODEL_SIGNING or on PATH, else installed from
    PyPI into a venv of its own (``model-signing`` cannot join this project's locked environment)."""
    tool = _tool()
    if tool is not None:
        return tool
    import venv

    env = tmp_path_factory.mktemp("model-signing") / "venv"
    venv.create(env, with_pip=True)
    lock = Path(__file__).resolve().parents[1] / "requirements" / "model-signing-lock.txt"  # pinned, like the rest
    done = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(lock),
                           "model-signing", "pyopenssl"], check=False, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.skip(f"could not pip install model-signing into a venv of its own: {done.stderr.strip()[-300:]}")
    return str(env / "bin" / "model_signing")


@pytest.fixture()
def ec_keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_ec_keys(tmp_path / "ec.key")


def _cli(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


def test_cli_keys_sign_and_verify(bundle: Path, tmp_path: Path) -> None:
    res = _cli("keys", "generate", "--out", str(tmp_path / "site.key"), "--type", "ecdsa-p256")
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert (tmp_path / "site.key").stat().st_mode & 0o777 == 0o600
    res = _cli("bundle", "sign", str(bundle), "--key", str(tmp_path / "site.key"))
    assert res.exit_code == 0 and "model.sig" in res.output  # type: ignore[attr-defined]
    statement = json.loads(__import__("base64").b64decode(
        json.loads((bundle / "model.sig").read_text())["dsseEnvelope"]["payload"]))
    assert statement["predicateType"] == "https://model_signing/signature/v1.0"
    assert {r["name"] for r in statement["predicate"]["resources"]} == set(
        json.loads((bundle / "manifest.json").read_text())["files"]) | {"manifest.json"}
    res = _cli("device", "verify", str(bundle), "--trust", str(tmp_path / "site.key.pub"))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]


def test_either_signature_is_accepted(bundle: Path, tmp_path: Path, ec_keys: tuple[Path, Path]) -> None:
    """The Ed25519 manifest signature and the OpenSSF one live side by side; each key checks its own."""
    ed_key, ed_pub = generate_keys(tmp_path / "ed.key")
    sign_bundle(bundle, ed_key)
    sign_bundle(bundle, ec_keys[0])
    assert (bundle / "manifest.sig").is_file() and (bundle / "model.sig").is_file()
    Bundle.load(bundle, trust=ed_pub)
    Bundle.load(bundle, trust=ec_keys[1])


def test_refusals(bundle: Path, tmp_path: Path, ec_keys: tuple[Path, Path], demo_train: Path) -> None:
    key, pub = ec_keys
    with pytest.raises(BundleError, match="no OpenSSF signature"):
        Bundle.load(bundle, trust=pub)
    other, _ = generate_ec_keys(tmp_path / "other.key")
    sign_bundle(bundle, other)
    with pytest.raises(BundleError, match="another key"):
        Bundle.load(bundle, trust=pub)
    sign_bundle(bundle, key)
    # device state is outside the signature: training keeps the bundle verifying
    res = _cli("device", "train", str(bundle), "--data", str(demo_train), "--quiet", "--trust", str(pub))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    Bundle.load(bundle, trust=pub)
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"unsigned files: \['extra.bin'\]"):
        Bundle.load(bundle, trust=pub)
    (bundle / "extra.bin").unlink()
    data = bytearray((bundle / "golden.npz").read_bytes())
    data[-1] ^= 1
    (bundle / "golden.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"changed: \['golden.npz'\]"):
        Bundle.load(bundle, trust=pub)
    data[-1] ^= 1
    (bundle / "golden.npz").write_bytes(bytes(data))
    sig = json.loads((bundle / "model.sig").read_text())
    sig["dsseEnvelope"]["signatures"][0]["sig"] = sig["dsseEnvelope"]["signatures"][0]["sig"][::-1]
    (bundle / "model.sig").write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="OpenSSF signature"):
        Bundle.load(bundle, trust=pub)
    res = _cli("device", "verify", str(bundle), "--trust", str(pub))
    assert res.exit_code == 1 and res.output.count("\n") == 1  # type: ignore[attr-defined]


def test_an_ed25519_key_cannot_make_an_openssf_signature(bundle: Path, tmp_path: Path) -> None:
    key, _ = generate_keys(tmp_path / "ed.key")
    with pytest.raises(BundleError, match="not an elliptic-curve private key"):
        sign_path(bundle, key)


def test_exported_graph_signed(bundle: Path, tmp_path: Path, demo_train: Path, demo_test: Path,
                               ec_keys: tuple[Path, Path]) -> None:
    key, pub = ec_keys
    assert _cli("device", "train", str(bundle), "--data", str(demo_train), "--quiet").exit_code == 0  # type: ignore[attr-defined]
    out = tmp_path / "model.onnx"
    res = _cli("device", "export-model", str(bundle), "--out", str(out), "--with-preprocessing", "--sign", str(key),
               "--images", str(demo_test / "bag"))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert verify_path(out, pub) == {".": __import__("edgetl.registry").registry.sha256_file(out)}
    tool = _tool()
    if tool is not None:
        done = subprocess.run([tool, "verify", "key", str(out), "--signature", str(out) + ".sig", "--public_key",
                               str(pub)], check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Verification succeeded" in done.stdout + done.stderr, done.stderr
    with open(out, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="does not match its OpenSSF signature"):
        verify_path(out, pub)
    res = _cli("device", "export-model", str(bundle), "--out", str(tmp_path / "x.onnx"), "--sign",
               str(tmp_path / "ec.key.pub"))
    assert res.exit_code == 1 and "not an ECDSA private key" in res.output  # type: ignore[attr-defined]


@pytest.mark.install
@pytest.mark.slow
def test_the_model_signing_tool_agrees(bundle: Path, tmp_path: Path, ec_keys: tuple[Path, Path],
                                       model_signing_tool: str) -> None:
    """Both directions with OpenSSF's own tool: it verifies what edgetl signed (and refuses a tampered copy), and edgetl
    verifies what it signed."""
    tool = model_signing_tool
    key, pub = ec_keys
    sign_bundle(bundle, key)
    (bundle / "state").mkdir(exist_ok=True)
    (bundle / "state" / "current").write_text("v0001")  # device state: ignored by both
    done = subprocess.run([tool, "verify", "key", str(bundle), "--signature", str(bundle / "model.sig"),
                           "--public_key", str(pub)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Verification succeeded" in done.stdout + done.stderr, done.stderr
    (bundle / "labels.txt").write_text("added after signing")
    done = subprocess.run([tool, "verify", "key", str(bundle), "--signature", str(bundle / "model.sig"),
                           "--public_key", str(pub)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 or "Verification succeeded" not in done.stdout + done.stderr
    (bundle / "labels.txt").unlink()
    theirs = tmp_path / "theirs.sig"
    done = subprocess.run([tool, "sign", "key", str(bundle), "--signature", str(theirs), "--private_key", str(key),
                           "--ignore-paths", str(bundle / "state"), "--ignore-paths", str(bundle / "model.sig")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(verify_path(bundle, pub, theirs)) == set(verify_path(bundle, pub))


def test_install_an_openssf_signed_archive(bundle: Path, tmp_path: Path, ec_keys: tuple[Path, Path]) -> None:
    """`bundle pack` carries model.sig; `device install --trust EC.pub` checks it before extracting anything."""
    key, pub = ec_keys
    sign_bundle(bundle, key)
    archive = tmp_path / "b.tar.gz"
    assert _cli("bundle", "pack", str(bundle), str(archive)).exit_code == 0  # type: ignore[attr-defined]
    res = _cli("device", "install", str(archive), str(tmp_path / "dest"), "--trust", str(pub))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert (tmp_path / "dest" / "model.sig").is_file()
    Bundle.load(tmp_path / "dest", trust=pub)
    _, other_pub = generate_ec_keys(tmp_path / "other.key")
    res = _cli("device", "install", str(archive), str(tmp_path / "dest2"), "--trust", str(other_pub))
    assert res.exit_code == 1 and "another key" in res.output  # type: ignore[attr-defined]
    assert not (tmp_path / "dest2").exists()
    (bundle / "model.sig").unlink()
    unsigned = tmp_path / "u.tar.gz"
    assert _cli("bundle", "pack", str(bundle), str(unsigned)).exit_code == 0  # type: ignore[attr-defined]
    res = _cli("device", "install", str(unsigned), str(tmp_path / "dest3"), "--trust", str(pub))
    assert res.exit_code == 1 and "no OpenSSF signature" in res.output  # type: ignore[attr-defined]
