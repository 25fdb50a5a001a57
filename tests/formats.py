"""Image folders written by the data-format tests, and the scripts they run: each image of an "id" folder is
one flat colour that encodes its number, so any crop of it tells which image it came from."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from make_shards import make_shards  # noqa: E402

CLASSES = ("ant", "bee", "cat")
__all__ = ["CLASSES", "image_ids", "make_shards", "write_id_folder", "write_photo_folder"]


def write_id_folder(root: Path, train: int = 10, val: int = 3) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``, 40x30 flat images; image k (numbered
    over both splits, train first) has the colour (k % 256, k // 256, 7)."""
    k = 0
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.full((30, 40, 3), (k % 256, k // 256, 7), np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
                k += 1
    return root


def write_photo_folder(root: Path, train: int = 6, val: int = 2, size: tuple[int, int] = (50, 38)) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``: smooth random JPEGs (quality 90)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                low = rng.integers(0, 256, size=(size[1] // 8 + 1, size[0] // 8 + 1, 3)).astype(np.uint8)
                image = Image.fromarray(low).resize(size, Image.BICUBIC)
                image.save(root / split / c / f"{i}.jpg", quality=90)
    return root


def image_ids(images: torch.Tensor) -> list[int]:
    """The numbers of images of an id folder, from their top-left pixel (data.mean 0, data.std 1)."""
    pixel = (images[:, :2, 0, 0] * 255).round().long()
    return (pixel[:, 0] + 256 * pixel[:, 1]).tolist()
