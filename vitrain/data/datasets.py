"""The data sets vitrain knows: scikit-learn's digits (offline default), CIFAR-10/100, image folders.

Each loader returns ``(train, test, class_names)`` where train and test are map-style data sets
of ``(image, label)`` pairs whose transform is set by the caller; ``keep_classes`` narrows one to a
subset of its classes.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from vitrain.errors import DataError, first_line

Transform = Callable[[torch.Tensor], torch.Tensor] | None


class ArrayDataset(Dataset):
    """Images held in memory as a uint8 (N, H, W, C) array, with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform = None) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # NCHW
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[ArrayDataset, ArrayDataset, list[str]]:
    """scikit-learn's 1,797 bundled 8x8 handwritten digits as 3-channel uint8 images, split into
    train and test with a fixed, stratified, seeded split (independent of the training seed)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # 0..16 -> 0..255
    images = np.repeat(images[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=split_seed, stratify=digits.target
    )
    return ArrayDataset(x_tr, y_tr), ArrayDataset(x_te, y_te), [str(c) for c in range(10)]


_CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


def load_cifar(name: str, root: str | Path, download: bool) -> tuple[ArrayDataset, ArrayDataset, list[str]]:
    """CIFAR-10/100 from the python-version archive layout (``<root>/cifar-10-batches-py/...``).

    torchvision supplies the file names and the verified download; the batches are read here into
    memory so that any folder in the same pickle layout loads, also a small one written by a test.
    """
    spec = _CIFAR[name]
    root = Path(root).expanduser().resolve()
    folder = root / spec.base_folder
    needed = [f for f, _ in spec.train_list + spec.test_list] + [spec.meta["filename"]]
    if not all((folder / f).is_file() for f in needed):
        if download:
            _download(spec, root, name)
        else:
            raise DataError(_missing_cifar(name, spec, root, "data.download=false"))
    train = ArrayDataset(*_read_batches(folder, [f for f, _ in spec.train_list]))
    test = ArrayDataset(*_read_batches(folder, [f for f, _ in spec.test_list]))
    return train, test, list(_unpickle(folder / spec.meta["filename"])[spec.meta["key"]])


def _download(spec: type, root: Path, name: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5)
    except Exception as e:  # no network, proxy refusal, bad checksum, full disk ...
        reason = f"download failed: {type(e).__name__}: {first_line(e) if str(e).strip() else ''}"
        raise DataError(_missing_cifar(name, spec, root, reason)) from e


def _missing_cifar(name: str, spec: type, root: Path, reason: str) -> str:
    return (
        f"{name} not found under data.root={root} ({reason}); put {spec.filename} (or its "
        f"extracted folder {spec.base_folder}/) there, or point data.root at the folder that holds it"
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}; the file is corrupt, replace it") from e


def _read_batches(folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data, labels = [], []
    for f in files:
        entry = _unpickle(folder / f)
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += entry["labels"] if "labels" in entry else entry["fine_labels"]
    return np.concatenate(data).transpose(0, 2, 3, 1), np.asarray(labels)  # (N, 32, 32, 3)


def open_rgb(path: str | Path, fix: str = "remove or replace the file") -> Image.Image:
    """An image file as RGB (ImageFolder's loader, and the inputs of predict and visualize), or a one-line
    DataError naming the file that cannot be read and ending in ``fix``."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}); {fix}") from e


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, passing over hidden folders (``.vitrain-cache``, ``.ipynb_checkpoints``)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}


def load_imagefolder(root: str | Path) -> tuple[Dataset, Dataset | None, list[str]]:
    """A user's images as ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (torchvision ImageFolder), or,
    without ``train/``, one folder ``<root>/<class>/*`` (no validation split: ``data.val_fraction`` holds one
    out)."""
    root = Path(root).expanduser().resolve()
    if not (root / "train").is_dir() and root.is_dir():
        single = _open_folder(root, root, "<class_name>/<image files> or train/ and val/")
        return single, None, list(single.classes)
    splits = {s: _open_folder(root / s, root, f"{s}/<class_name>/<image files>") for s in ("train", "val")}
    if splits["train"].classes != splits["val"].classes:
        raise DataError(
            f"train and val class folders differ under data.root={root}: "
            f"{splits['train'].classes} vs {splits['val'].classes}; give both the same class folders"
        )
    return splits["train"], splits["val"], list(splits["train"].classes)


def _open_folder(folder: Path, root: Path, expected: str) -> datasets.ImageFolder:
    try:
        return ImageFolder(str(folder), loader=open_rgb)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"no images under {folder} (data.root={root}); expected {root}/{expected}, one folder per "
                        f"class") from e


def keep_classes(dataset: Dataset, classes: Sequence[int]) -> Dataset:
    """Keep only the samples whose label is in ``classes`` and relabel them 0..len(classes)-1 in that
    order, in place (the in-memory arrays, or an ImageFolder's sample list), so that a model can be
    trained on a few classes of a data set without copying it. Returns ``dataset``."""
    order = torch.as_tensor(list(classes), dtype=torch.long)
    if hasattr(dataset, "keep"):  # a file list, Hugging Face data
        dataset.keep(classes)
    elif isinstance(dataset, ArrayDataset):
        hits = dataset.labels.unsqueeze(1) == order  # (N, K): which of the kept classes each label is
        keep = hits.any(1)
        dataset.images, dataset.labels = dataset.images[keep], hits[keep].int().argmax(1)
    elif isinstance(dataset, datasets.DatasetFolder):
        new_label = {int(c): i for i, c in enumerate(order)}
        dataset.samples = [(path, new_label[y]) for path, y in dataset.samples if y in new_label]
        dataset.targets = [y for _, y in dataset.samples]
        if isinstance(dataset, datasets.ImageFolder):
            dataset.imgs = dataset.samples
        dataset.classes = [dataset.classes[c] for c in new_label]
        dataset.class_to_idx = {name: i for i, name in enumerate(dataset.classes)}
    else:
        raise TypeError(f"keep_classes supports ArrayDataset and ImageFolder, not {type(dataset).__name__}")
    return dataset


@dataclass
class DataSplits:
    """The training set, the validation set (model selection) and, when the validation set is held out
    of the training images (``data.val_fraction``), the test set, scored once at the end."""

    train: Dataset
    val: Dataset
    class_names: list[str]
    test: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
