from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from edgetl.data import scan_image_folder
from edgetl.datasets import fashion_mnist as fm
from edgetl.errors import DataError

needs_debian = pytest.mark.skipif(not (fm.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                  reason="apt-get install dataset-fashion-mnist")


@needs_debian
def test_reads_official_test_split() -> None:
    images, labels = fm.load_split("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_debian
def test_writes_image_folder(tmp_path: Path) -> None:
    assert fm.write_image_folder(tmp_path, "test", per_class=3, seed=0) == 30
    data = scan_image_folder(tmp_path)
    assert data.classes == tuple(sorted(fm.CLASSES))


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_roundtrip_and_truncation(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "a.gz"), array)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "b").write_bytes(raw[:-3])
    with pytest.raises(DataError, match="truncated"):
        fm.read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        fm.read_idx(tmp_path / "c")


def test_missing_source_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        fm.load_split("train", tmp_path)
