from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.data import load_image, scan_image_folder, stratified_split
from edgetl.errors import DataError
from edgetl.preprocess import preprocess_batch, preprocess_image, to_rgb
from edgetl.registry import get_backbone


def test_scan_demo_folder(demo_train: Path) -> None:
    data = scan_image_folder(demo_train)
    assert len(data.classes) == 10
    assert len(data) == 300
    assert set(data.class_counts().values()) == {30}


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no images"):
        scan_image_folder(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_loose_images_hint(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="sub-folder per class"):
        scan_image_folder(tmp_path)


def test_single_class(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    with pytest.raises(DataError, match="1 class"):
        scan_image_folder(tmp_path)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        load_image(bad)


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK"])
def test_modes_become_rgb(mode: str, tmp_path: Path) -> None:
    image = Image.new("RGB", (10, 6), (200, 100, 50)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    image.save(path)
    rgb = to_rgb(load_image(path))
    assert rgb.mode == "RGB" and rgb.size == (10, 6)


def test_transparent_pixels_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255


def test_preprocess_shape_and_normalisation() -> None:
    pp = get_backbone("mobilenet_v2").preprocessing
    gray = np.full((28, 40), 255, dtype=np.uint8)
    x = preprocess_image(gray, pp)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    expected = (1.0 - np.array(pp.mean)) / np.array(pp.std)
    np.testing.assert_allclose(x[:, 100, 100], expected, rtol=1e-5)
    lite = get_backbone("efficientnet_lite0").preprocessing.with_size(96)
    y = preprocess_batch([gray, gray], lite)
    assert y.shape == (2, 3, 96, 96)
    np.testing.assert_allclose(y[0, :, 50, 50], (255 - 127) / 128, rtol=1e-6)


def test_preprocess_rejects_bad_arrays() -> None:
    pp = get_backbone("mobilenet_v2").preprocessing
    with pytest.raises(DataError, match="shape"):
        preprocess_image(np.zeros((4, 4, 5), dtype=np.uint8), pp)
    with pytest.raises(DataError, match="uint8"):
        preprocess_image(np.zeros((4, 4), dtype=np.float32), pp)


def test_stratified_split_keeps_every_class() -> None:
    labels = np.repeat(np.arange(5), [10, 10, 2, 10, 10])
    train, held = stratified_split(labels, 0.2, seed=1)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
    assert set(labels[held]) == set(range(5))
    assert set(labels[train]) == set(range(5))


def _two_classes(root: Path) -> Path:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / name / "a.png")
    return root


def test_class_folder_linking_to_the_data_folder_is_a_loop(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "data")
    (root / "loop").symlink_to(root)  # used to become a class holding every other class's images
    with pytest.raises(DataError, match=r"class folder .*loop is a symlink loop"):
        scan_image_folder(root)
    (root / "loop").unlink()
    (root / "up").symlink_to(tmp_path)  # an ancestor of the data folder: the same loop
    with pytest.raises(DataError, match=r"class folder .*up is a symlink loop"):
        scan_image_folder(root)


def test_class_folder_linking_to_itself_is_refused(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "data")
    (root / "self").symlink_to(root / "self")
    with pytest.raises(DataError, match=r"class folder .*self is a symlink loop"):
        scan_image_folder(root)


def test_class_folders_linking_to_one_folder_are_refused(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "data")
    (root / "kitten").symlink_to(root / "cat")  # the same images under two class names
    with pytest.raises(DataError, match=r"class folders .*cat and .*kitten are the same folder"):
        scan_image_folder(root)
    (root / "kitten").unlink()
    (root / "kitten").symlink_to(root / "dog" / ".")
    (root / "cat" / "inner").mkdir()
    (root / "puppy").symlink_to(root / "cat" / "inner")  # nested inside another class
    with pytest.raises(DataError, match="same folder|inside"):
        scan_image_folder(root)


def test_class_folder_linking_outside_is_resolved_once(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "data")
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "sub" / "b.png")
    (tmp_path / "elsewhere" / "sub" / "back").symlink_to(root)  # a link inside a class is not followed
    (root / "bird").symlink_to(tmp_path / "elsewhere")
    data = scan_image_folder(root)
    assert data.classes == ("bird", "cat", "dog")
    assert data.class_counts() == {"bird": 1, "cat": 1, "dog": 1}
    assert data.samples[0].path == root / "bird" / "sub" / "b.png"


def test_dangling_class_link_is_reported(tmp_path: Path) -> None:
    root = _two_classes(tmp_path / "data")
    (root / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"class folder .*gone is a link to .*nowhere, which does not exist"):
        scan_image_folder(root)
