"""Rebuild the embedded demo data set (edgetl/demo_data/fashion-mnist-mini) from Debian's dataset-fashion-mnist:
30 images per class from the official training split and 10 per class from the official test split.

    python tools/make_demo_data.py
"""

from __future__ import annotations

import shutil

from edgetl.datasets.fashion_mnist import write_image_folder
from edgetl.demo import DEMO_ROOT

if __name__ == "__main__":
    for split, per_class in (("train", 30), ("test", 10)):
        shutil.rmtree(DEMO_ROOT / split, ignore_errors=True)
        n = write_image_folder(DEMO_ROOT / split, split, per_class=per_class, seed=2024)
        print(f"{split}: {n} images")
