"""Shared fixtures: small data sets in the real on-disk formats, written per test."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_cifar10(root: Path, per_batch: int = 20, test_size: int = 30, seed: int = 0) -> dict:
    """A CIFAR-10 folder in the python-version layout (the same pickles as the real archive),
    with ``per_batch`` random images in each of the 5 train batches. Returns what was written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_size)]:
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        entry = {"batch_label": name.encode(), "labels": labels, "data": data,
                 "filenames": [f"img_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        written[name] = entry
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch}, f)
    return written


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    write_cifar10(tmp_path / "cifar10")
    return tmp_path / "cifar10"


@pytest.fixture
def imagefolder_root(tmp_path: Path) -> Path:
    """``train/`` and ``val/`` with classes ``circle`` and ``square``: 6 and 2 PNGs each, 40x30 pixels."""
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("circle", "square"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root
