"""Trustworthy bundles: signatures, tampering, replay, safe transport."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.bundle import Bundle
from edgetl.cli import main
from edgetl.device import DeviceRuntime
from edgetl.errors import BundleError
from edgetl.signing import generate_keys, sign_bundle
from edgetl.transport import install, pack

pytest.importorskip("cryptography")


@pytest.fixture()
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keys(tmp_path / "host.key")


def _rewrite_manifest(bundle: Path, **changes: object) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_keys_cli_and_signed_bundle(bundle: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["keys", "generate", "--out", str(tmp_path / "k")])
    assert res.exit_code == 0 and (tmp_path / "k.pub").is_file()
    assert oct((tmp_path / "k").stat().st_mode & 0o777) == "0o600"
    assert CliRunner().invoke(main, ["keys", "generate", "--out", str(tmp_path / "k")]).exit_code == 1  # no overwrite
    assert CliRunner().invoke(main, ["bundle", "sign", str(bundle), "--key", str(tmp_path / "k")]).exit_code == 0
    res = CliRunner().invoke(main, ["device", "verify", str(bundle), "--trust", str(tmp_path / "k.pub")])
    assert res.exit_code == 0, res.stderr


def test_unsigned_and_badly_signed_are_refused(bundle: Path, keypair: tuple[Path, Path], tmp_path: Path) -> None:
    key, pub = keypair
    with pytest.raises(BundleError, match="not signed"):
        Bundle.load(bundle, trust=pub)
    other_key, _ = generate_keys(tmp_path / "other.key")
    sign_bundle(bundle, other_key)
    with pytest.raises(BundleError, match="bad signature"):
        Bundle.load(bundle, trust=pub)
    sign_bundle(bundle, key)
    Bundle.load(bundle, trust=pub)
    _rewrite_manifest(bundle, labels=["cat", "dog"])  # an edited label list after signing
    with pytest.raises(BundleError, match="bad signature"):
        Bundle.load(bundle, trust=pub)


def test_every_file_is_covered(bundle: Path) -> None:
    names = [p.name for p in bundle.iterdir() if p.is_file() and p.name != "manifest.json"]
    assert names
    for name in names:
        original = (bundle / name).read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 3] ^= 0x01
        (bundle / name).write_bytes(bytes(flipped))
        with pytest.raises(BundleError, match=name):
            Bundle.load(bundle)
        (bundle / name).write_bytes(original)
    Bundle.load(bundle)


def test_swapped_extractor(bundle: Path, keypair: tuple[Path, Path]) -> None:
    """An attacker swaps the graph and fixes the hashes: the golden vectors catch it; a signature refuses it first."""
    pytest.importorskip("onnx")
    from edgetl.bundle import file_entry
    from tests.test_onnx_quant import _garbage_converter

    key, pub = keypair
    sign_bundle(bundle, key)
    _garbage_converter(None, bundle / "extractor.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["extractor.onnx"] = file_entry(bundle / "extractor.onnx")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="golden vectors fail"):
        DeviceRuntime(bundle).verify()
    with pytest.raises(BundleError, match="bad signature"):
        DeviceRuntime(bundle, trust=pub)


def test_replayed_older_manifest(bundle: Path, keypair: tuple[Path, Path]) -> None:
    key, pub = keypair
    old = json.loads((bundle / "manifest.json").read_text())
    _rewrite_manifest(bundle, created_unix=old["created_unix"] + 100)
    sign_bundle(bundle, key)
    DeviceRuntime(bundle, trust=pub)  # accepted and remembered
    (bundle / "manifest.json").write_text(json.dumps(old))  # the older, validly signed manifest comes back
    sign_bundle(bundle, key)
    with pytest.raises(BundleError, match="replayed"):
        DeviceRuntime(bundle, trust=pub)


# ------------------------------------------------------------------------------------------------------- transport
def test_pack_install_roundtrip_keeps_state(bundle: Path, demo_train: Path, tmp_path: Path,
                                            keypair: tuple[Path, Path]) -> None:
    key, pub = keypair
    sign_bundle(bundle, key)
    archive = pack(bundle, tmp_path / "b.tar.gz")
    with tarfile.open(archive) as tar:
        assert not any(n.startswith("state") for n in tar.getnames())
    dest = tmp_path / "device" / "bundle"
    install(archive, dest, trust=pub)
    DeviceRuntime(dest).train(demo_train)
    res = CliRunner().invoke(main, ["device", "install", str(archive), str(dest), "--trust", str(pub)])
    assert res.exit_code == 0, res.stderr
    assert DeviceRuntime(dest).current_version() == "v0001"  # learned state survives a re-install


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, (data if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("case,match", [
    (_member("/etc/evil"), "absolute"),
    (_member("../evil"), "escapes"),
    (_member("a/../../evil"), "escapes"),
    (_member("link", tarfile.SYMTYPE, link="/etc/passwd"), "link"),
    (_member("hard", tarfile.LNKTYPE, link="manifest.json"), "link"),
    (_member("dev", tarfile.CHRTYPE), "device file"),
    (_member("fifo", tarfile.FIFOTYPE), "device file"),
    (_member("state/current", data=b"v9999"), "device state"),
])
def test_malicious_archives_are_refused(case: tuple, match: str, tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar([case]))
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match=match):
        install(archive, dest)
    assert not dest.exists() and not (tmp_path / "evil").exists()


def test_archive_size_limit_and_truncation(bundle: Path, tmp_path: Path) -> None:
    archive = pack(bundle, tmp_path / "b.tar.gz")
    with pytest.raises(BundleError, match="expands beyond"):
        install(archive, tmp_path / "d", max_bytes=1000)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    res = CliRunner().invoke(main, ["device", "install", str(cut), str(tmp_path / "d")])
    assert res.exit_code == 1 and "truncated or corrupt" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_swapped_extractor_fails_every_command(bundle: Path, demo_test: Path) -> None:
    """The golden vectors run when the session is first created, so training refuses the swapped graph too."""
    pytest.importorskip("onnx")
    from edgetl.bundle import file_entry
    from tests.test_onnx_quant import _garbage_converter

    _garbage_converter(None, bundle / "extractor.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["extractor.onnx"] = file_entry(bundle / "extractor.onnx")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(main, ["device", "train", str(bundle), "--data", str(demo_test), "--quiet"])
    assert res.exit_code == 1 and "golden vectors fail" in res.stderr
    assert not (bundle / "state" / "current").exists()


def test_profile_trust_file(bundle: Path, keypair: tuple[Path, Path], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetl._resources import registry_dir

    key, pub = keypair
    profiles = tmp_path / "devices"
    profiles.mkdir()
    for p in registry_dir("devices").glob("*.toml"):
        (profiles / p.name).write_text(p.read_text())
    with open(profiles / "generic-cpu.toml", "a") as fh:
        fh.write(f'trust = "{pub}"\n')
    monkeypatch.setenv("EDGETL_DEVICES_DIR", str(profiles))
    with pytest.raises(BundleError, match="not signed"):
        DeviceRuntime(bundle, profile="generic-cpu")
    sign_bundle(bundle, key)
    assert DeviceRuntime(bundle, profile="generic-cpu").verify()["golden"] == "ok"
