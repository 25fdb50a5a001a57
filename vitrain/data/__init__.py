"""Data sets and loaders. ``build_datasets`` turns a data set name into transformed train/val sets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from vitrain.data.datasets import load_cifar, load_digits, load_imagefolder
from vitrain.data.transforms import build_transforms
from vitrain.errors import ConfigError, DataError

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_datasets(
    name: str,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    root: str | Path | None = None,
    download: bool = True,
    crop_padding: int = 4,
    hflip: bool = True,
    interpolation: str = "bilinear",
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> DataSplits:
    """Load a data set by name and attach the train and eval transforms for ``img_size``."""
    if name == "digits":
        train, val, classes = load_digits(test_fraction, split_seed)
    elif name in ("cifar10", "cifar100"):
        train, val, classes = load_cifar(name, _need_root(name, root), download)
    elif name == "imagefolder":
        train, val, classes = load_imagefolder(_need_root(name, root))
    else:
        raise ConfigError(f"unknown data set '{name}' (data.name); choose one of {', '.join(DATASETS)}")
    train.transform = build_transforms(img_size, mean, std, True, crop_padding, hflip, interpolation)
    val.transform = build_transforms(img_size, mean, std, False, interpolation=interpolation)
    return DataSplits(train, val, classes)


def _need_root(name: str, root: str | Path | None) -> str | Path:
    if not root:
        raise DataError(f"data={name} needs a folder: set data.root=DIR")
    return root


def build_loaders(
    splits: DataSplits, batch_size: int, num_workers: int = 0, seed: int = 0, pin_memory: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Shuffled train loader (order fixed by ``seed``) and an ordered val loader."""
    if batch_size <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    train = DataLoader(splits.train, shuffle=True, generator=torch.Generator().manual_seed(seed), **common)
    val = DataLoader(splits.val, shuffle=False, **common)
    return train, val
