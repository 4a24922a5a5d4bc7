"""Property-based fuzzing (hypothesis) of the device's input parsers: the bundle manifest loader, the archive
installer and the image loader. Only EdgeTLError subclasses may escape — never another exception type."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from edgetl.bundle import Bundle  # noqa: E402
from edgetl.data import load_image  # noqa: E402
from edgetl.device import DeviceRuntime  # noqa: E402
from edgetl.errors import BundleError, DataError, EdgeTLError  # noqa: E402
from edgetl.transport import install  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def real_manifest(_pretrained_bundle: Path) -> dict[str, Any]:
    return json.loads((_pretrained_bundle / "manifest.json").read_text())


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@FUZZ
@given(data=st.data())
def test_mutated_manifest(real_manifest: dict[str, Any], _pretrained_bundle: Path, data: st.DataObject) -> None:
    manifest = copy.deepcopy(real_manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from([p for p in _paths(manifest) if p]))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(json_values)
        elif isinstance(parent, dict):
            del parent[path[-1]]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp)
        for f in _pretrained_bundle.iterdir():
            if f.is_file() and f.name != "manifest.json":
                (bundle / f.name).symlink_to(f)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        try:
            DeviceRuntime(bundle, profile="generic-cpu").verify()
        except EdgeTLError:
            pass


@FUZZ
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_manifest_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_bytes(raw)
        with pytest.raises(BundleError):
            Bundle.load(tmp)


@FUZZ
@given(raw=st.binary(max_size=2000), gz=st.booleans())
def test_arbitrary_archive_bytes(raw: bytes, gz: bool) -> None:
    import gzip

    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "a.tar.gz"
        archive.write_bytes(gzip.compress(raw) if gz else raw)
        with pytest.raises(EdgeTLError):
            install(archive, Path(tmp) / "dest")
        assert not (Path(tmp) / "dest").exists()


MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"MM\x00*", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP"]


@FUZZ
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=500))
def test_arbitrary_image_bytes(magic: bytes, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.img"
        path.write_bytes(magic + body)
        try:
            image = load_image(path, max_pixels=4_000_000)
        except DataError:
            return
        assert image.mode == "RGB"


@FUZZ
@given(data=st.data())
def test_truncated_real_images(demo_test: Path, data: st.DataObject) -> None:
    source = data.draw(st.sampled_from(sorted(demo_test.glob("*/*.png"))[:20]))
    raw = source.read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cut.png"
        path.write_bytes(raw[:cut])
        try:
            image = load_image(path)
        except DataError as exc:
            assert "cut.png" in str(exc)
            return
        # decoding may succeed only when nothing was lost (e.g. just the trailing IEND chunk was cut)
        import numpy as np

        assert np.array_equal(np.asarray(image), np.asarray(load_image(source)))


def test_decompression_bomb_guard(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("1", (3000, 3000)).save(tmp_path / "big.png")  # 9 MP, a few KB on disk
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_image(tmp_path / "empty.png")


record_lines = st.one_of(
    st.binary(max_size=120),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"file": st.text(max_size=12), "status": st.sampled_from(["ok", "failed", "?"]),
                           "key": st.text(max_size=12)}).map(lambda v: json.dumps(v).encode()))


@FUZZ
@given(lines=st.lists(record_lines, max_size=8), torn=st.binary(max_size=40))
def test_arbitrary_journal_contents(lines: list[bytes], torn: bytes) -> None:
    """The watcher's journal: any bytes in it (garbage lines, JSON of the wrong shape, a torn last write) are
    skipped or cut off with a warning — opening it never raises, and what it kept is a whole number of lines."""
    from edgetl.watch import Journal

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "_watch" / "results.jsonl"
        path.parent.mkdir()
        path.write_bytes(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines) + torn.replace(b"\n", b" "))
        journal = Journal(path)
        try:
            assert journal.lines <= len(lines)
            assert path.read_bytes().endswith(b"\n") or path.stat().st_size == 0  # a torn tail is cut off
        finally:
            journal.close()


@FUZZ
@given(current=st.binary(max_size=40), meta=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       version=st.sampled_from(["v0001", "v0002", "bundle"]))
def test_arbitrary_state_directory(_pretrained_bundle: Path, current: bytes, meta: bytes, version: str) -> None:
    """The device's state directory as an operator or a bad disk may leave it: any bytes in ``state/current`` and a
    version's ``meta.json`` give a one-line EdgeTLError or a working answer from every read-only command — never
    another exception type."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(shutil.copytree(_pretrained_bundle, Path(tmp) / "b"))
        heads = bundle / "state" / "heads" / version
        heads.mkdir(parents=True, exist_ok=True)
        (heads / "meta.json").write_bytes(meta)
        (bundle / "state" / "current").write_bytes(current)
        for action in (lambda rt: rt.history(), lambda rt: rt.current_version(), lambda rt: rt.info(),
                       lambda rt: rt.load_current_head()):
            try:
                action(DeviceRuntime(bundle, backend="onnx", precision="fp32"))
            except EdgeTLError as exc:
                assert "\n" not in str(exc)
