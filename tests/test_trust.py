"""Trustworthy bundles: signatures, tampering, replay, safe transport."""

from __future__ import annotations

import io
import json
import os
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
from tests.conftest import make_folder

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


# ------------------------------------------------------------------------------------------- install is safe
def _signed_archive(bundle: Path, key: Path, out: Path, created_shift: float = 0.0) -> Path:
    """``bundle`` packed after shifting its manifest's created time and signing it with ``key``."""
    if created_shift:
        old = json.loads((bundle / "manifest.json").read_text())
        _rewrite_manifest(bundle, created_unix=old["created_unix"] + created_shift)
    sign_bundle(bundle, key)
    return pack(bundle, out)


def _with_extra_member(archive: Path, out: Path, name: str = "payload.sh", data: bytes = b"#!/bin/sh\n") -> Path:
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        info = tarfile.TarInfo(name)
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
    return out


def test_install_never_deletes_a_folder_that_is_not_a_bundle(bundle: Path, tmp_path: Path) -> None:
    archive = pack(bundle, tmp_path / "b.tar.gz")
    data = tmp_path / "data"
    for i in range(37):
        (data / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (data / f"sub{i % 3}" / f"f{i}.txt").write_text(str(i))
    res = CliRunner().invoke(main, ["device", "install", str(archive), str(data)])
    assert res.exit_code == 1 and "not a bundle" in res.stderr and "--force" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert len(list(data.rglob("*.txt"))) == 37 and not (data / "manifest.json").exists()
    install(archive, data, force=True)  # moved aside, never deleted
    (aside,) = tmp_path.glob("data.before-install-*")
    assert len(list(aside.rglob("*.txt"))) == 37
    Bundle.load(data)


def test_install_into_a_file_or_the_current_folder_is_refused(bundle: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    archive = pack(bundle, tmp_path / "b.tar.gz")
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(BundleError, match="is a file"):
        install(archive, target)
    assert target.read_text() == "keep me" and not list(tmp_path.glob(".notes.txt*"))
    work = tmp_path / "work"
    (work / "deeper").mkdir(parents=True)
    monkeypatch.chdir(work / "deeper")
    for dest in (".", "..", str(work)):
        res = CliRunner().invoke(main, ["device", "install", str(archive), dest])
        assert res.exit_code == 1 and "current folder" in res.stderr and "unexpected" not in res.stderr, res.stderr
    assert sorted(p.name for p in work.iterdir()) == ["deeper"]
    link = tmp_path / "link"
    link.symlink_to(work, target_is_directory=True)
    with pytest.raises(BundleError, match="is a link"):
        install(archive, link)


def test_install_into_an_empty_folder_and_over_a_bundle_with_other_files(bundle: Path, demo_train: Path,
                                                                         tmp_path: Path) -> None:
    archive = pack(bundle, tmp_path / "b.tar.gz")
    dest = tmp_path / "empty"
    dest.mkdir()
    install(archive, dest)
    DeviceRuntime(dest).train(make_folder(tmp_path / "few", {"bag": 8, "coat": 8}, demo_train), val_split=0.0)
    (dest / "my-notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="also holds other files.*my-notes.txt"):
        install(archive, dest)
    assert (dest / "my-notes.txt").read_text() == "mine"
    install(archive, dest, force=True)
    assert DeviceRuntime(dest).current_version() == "v0001"  # the state moved into the new bundle
    (aside,) = tmp_path.glob("empty.before-install-*")
    assert (aside / "my-notes.txt").read_text() == "mine" and not (dest / "my-notes.txt").exists()


def test_install_refuses_an_older_signed_bundle_before_touching_anything(bundle: Path, tmp_path: Path,
                                                                         keypair: tuple[Path, Path]) -> None:
    key, pub = keypair
    older = _signed_archive(bundle, key, tmp_path / "old.tar.gz")
    newer = _signed_archive(bundle, key, tmp_path / "new.tar.gz", created_shift=100)
    dest = tmp_path / "device" / "bundle"
    install(newer, dest, trust=pub)
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    res = CliRunner().invoke(main, ["device", "install", str(older), str(dest), "--trust", str(pub)])
    assert res.exit_code == 1 and "older bundle" in res.stderr, res.stderr
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bundle"]  # no staging folder was even created
    DeviceRuntime(dest, trust=pub)  # not bricked: the newer bundle still opens
    install(newer, dest, trust=pub)  # re-installing the same bundle is fine


def test_install_refuses_files_the_manifest_does_not_list(bundle: Path, tmp_path: Path,
                                                          keypair: tuple[Path, Path]) -> None:
    key, pub = keypair
    archive = _with_extra_member(_signed_archive(bundle, key, tmp_path / "b.tar.gz"), tmp_path / "extra.tar.gz")
    for trust in (pub, None):
        with pytest.raises(BundleError, match="does not list.*payload.sh"):
            install(archive, tmp_path / "dest", trust=trust)
        assert not (tmp_path / "dest").exists()
    listed = next(iter(json.loads((bundle / "manifest.json").read_text())["files"]))
    dup = _with_extra_member(tmp_path / "b.tar.gz", tmp_path / "dup.tar.gz", name=listed, data=b"swapped")
    with pytest.raises(BundleError, match="appears twice"):
        install(dup, tmp_path / "dest")


def test_empty_edgetl_trust_is_an_error(bundle: Path, tmp_path: Path) -> None:
    archive = pack(bundle, tmp_path / "b.tar.gz")
    for args in (["device", "install", str(archive), str(tmp_path / "d")], ["device", "verify", str(bundle)]):
        res = CliRunner().invoke(main, args, env={"EDGETL_TRUST": ""})
        assert res.exit_code == 1 and "EDGETL_TRUST is set but empty" in res.stderr, res.stderr
    assert not (tmp_path / "d").exists()


def test_key_files_are_read_with_a_size_limit(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a regular file"):
        Bundle.load(bundle, trust="/dev/zero")
    big = tmp_path / "big.pub"
    big.write_bytes(b"-----BEGIN PUBLIC KEY-----\n" + b"A" * (1 << 20))
    with pytest.raises(BundleError, match="more than"):
        Bundle.load(bundle, trust=big)
    fifo = tmp_path / "fifo.pub"
    os.mkfifo(fifo)
    with pytest.raises(BundleError, match="not a regular file"):  # never blocks waiting for a writer
        sign_bundle(bundle, fifo)
