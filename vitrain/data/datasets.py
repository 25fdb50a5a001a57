"""The data sets vitrain knows: scikit-learn's digits (offline default), CIFAR-10/100, image folders.

Each loader returns ``(train, test, class_names)`` where train and test are map-style data sets
of ``(image, label)`` pairs whose transform is set by the caller; ``keep_classes`` narrows one to a
subset of its classes.
"""

from __future__ import annotations

import codecs
import functools
import logging
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets

from vitrain.data.sources import MAX_IMAGE_PIXELS, SkipUnreadable, open_rgb
from vitrain.errors import DataError, first_line

log = logging.getLogger(__name__)
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
    names = _read_names(folder / spec.meta["filename"], spec.meta["key"])
    labels_key = "fine_labels" if name == "cifar100" else "labels"
    train = ArrayDataset(*_read_batches(folder, [f for f, _ in spec.train_list], labels_key, len(names)))
    test = ArrayDataset(*_read_batches(folder, [f for f, _ in spec.test_list], labels_key, len(names)))
    return train, test, names


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


class _Refused(pickle.UnpicklingError):
    """A pickle asked for a global outside :class:`_CifarUnpickler`'s list."""


try:  # the functions numpy pickles its arrays with; numpy 2 moved them from numpy.core to numpy._core
    from numpy._core import multiarray, numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray, numeric
_BUILTINS = (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, complex, bool)
_CIFAR_GLOBALS = {
    **{(f"{core}.multiarray", f): getattr(multiarray, f) for core in ("numpy.core", "numpy._core")
       for f in ("_reconstruct", "scalar")},
    **{(f"{core}.numeric", "_frombuffer"): numeric._frombuffer for core in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes, as Python 3 pickles them at protocol 2
    **{(module, t.__name__): t for module in ("builtins", "__builtin__") for t in _BUILTINS},
}


class _CifarUnpickler(pickle.Unpickler):
    """Reads only what a CIFAR python-version file holds (dicts, lists, strings, numbers, numpy arrays): a pickle
    runs whatever callable it names while loading, so any other global is refused before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return _CIFAR_GLOBALS[module, name]


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise DataError(f"refused to read {path}: it calls {e}, which no CIFAR file holds (a pickle runs what it "
                        f"names); nothing was executed; replace it with the file from the CIFAR archive") from e
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}; the file is corrupt, replace it") from e


def _read_names(path: Path, key: str) -> list[str]:
    """The class names of a CIFAR ``batches.meta``/``meta`` file."""
    meta = _unpickle(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str | bytes) for n in names):
        found = (f"'{key}' as {_describe(names)}" if isinstance(meta, dict) and key in meta
                 else f"keys {sorted(map(str, meta))}" if isinstance(meta, dict) else _describe(meta))
        raise DataError(f"{path} is not a CIFAR meta file: expected a dict with '{key}' (a list of class names), "
                        f"found {found}; replace the file")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def _read_batches(folder: Path, files: list[str], labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    data, labels = [], []
    for f in files:
        images, targets = _check_batch(folder / f, _unpickle(folder / f), labels_key, num_classes)
        data.append(images.reshape(-1, 3, 32, 32))
        labels.append(targets)
    return np.concatenate(data).transpose(0, 2, 3, 1), np.concatenate(labels)  # (N, 32, 32, 3)


def _check_batch(path: Path, entry: Any, labels_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(data, labels) of a CIFAR batch, or a one-line DataError saying what the file holds instead."""
    expected = f"expected a dict with 'data' (N x 3072 uint8) and '{labels_key}' (N labels in 0..{num_classes - 1})"
    if not isinstance(entry, dict) or "data" not in entry or labels_key not in entry:
        found = f"keys {sorted(map(str, entry))}" if isinstance(entry, dict) else _describe(entry)
        raise DataError(f"{path} is not a CIFAR batch: {expected}, found {found}; replace the file")
    data, labels = entry["data"], np.asarray(entry[labels_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        problem = f"'data' as {_describe(data)}"
    elif labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        problem = f"'{labels_key}' as {_describe(entry[labels_key])} for {len(data)} images"
    elif len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        problem = f"'{labels_key}' with values from {labels.min()} to {labels.max()}"
    else:
        return data, labels
    raise DataError(f"{path} is not a CIFAR batch: {expected}, found {problem}; replace the file")


def _describe(value: Any) -> str:
    """``a uint8 array (10, 3072)``, ``a list of 9``, ``a str``: what a CIFAR file holds where something else is
    due."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array {tuple(value.shape)}"
    return f"a {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, list | tuple) else "")


class ImageFolder(SkipUnreadable, datasets.ImageFolder):
    """torchvision's ImageFolder, passing over hidden folders (``.vitrain-cache``, ``.ipynb_checkpoints``), reading
    each real folder once however symlinks lead to it, and over unreadable files with ``skip_corrupt``."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """torchvision's (path, class) samples in its order, walking the class folders with :func:`walk_once`
        instead of following every symlink (a link back up the tree would list the tree again, endlessly
        nested, under the wrong class)."""
        is_valid = is_valid_file or (lambda path: datasets.folder.has_file_allowed_extension(path, extensions))
        seen = {os.path.realpath(directory)} | {os.path.realpath(os.path.join(directory, c)) for c in class_to_idx}
        samples, empty, stray = [], [], []
        for name in sorted(class_to_idx):
            before = len(samples)
            for folder, files in sorted(walk_once(os.path.join(directory, name), seen)):
                paths = [os.path.join(folder, f) for f in sorted(files)]
                samples += [(path, class_to_idx[name]) for path in paths if is_valid(path)]
                stray += [path for path in paths if not is_valid(path)]
            empty += [name] if len(samples) == before else []
        if stray:  # notes.txt, .DS_Store, a RAW file: said, so that a missing image is not a mystery
            shown = ", ".join(os.path.relpath(path, directory) for path in stray[:3])
            log.info("%s: %d file%s that %s not images of a known kind left out (%s%s)", directory, len(stray),
                     "s" * (len(stray) > 1), "are" if len(stray) > 1 else "is", shown, ", ..." * (len(stray) > 3))
        if empty and not allow_empty:
            folders, plural = [os.path.join(directory, name) for name in empty], "s" * (len(empty) > 1)
            kinds = f" ({' '.join(extensions)})" if extensions else ""
            raise DataError(f"no image files{kinds} in the class folder{plural} {', '.join(folders)}; add images or "
                            f"remove the empty folder{plural}")
        return samples

    def read(self, i: int) -> tuple[Any, int]:
        return datasets.ImageFolder.__getitem__(self, i)


def walk_once(top: str, seen: set[str]) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) under ``top``, following symlinked folders into each real folder once: a folder whose
    real path is in ``seen`` (walked already, or a class folder) or is above the one linking to it (a loop) is
    passed over with a warning. ``seen`` gains the folders walked."""
    for folder, subfolders, files in os.walk(top, followlinks=True):
        here = os.path.realpath(folder)
        subfolders.sort()  # which of two links to one folder is walked: the first in name order
        for sub in list(subfolders):
            path = os.path.join(folder, sub)
            real = os.path.realpath(path)
            loop = os.path.commonpath([here, real]) == real
            if loop or real in seen:
                log.warning("image folder: passing over %s -> %s (%s)", path, real,
                            "a link back up the tree: a loop" if loop else "that folder is read already")
                subfolders.remove(sub)
            else:
                seen.add(real)
        yield folder, files


def load_imagefolder(root: str | Path, skip_corrupt: bool = False,
                     max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[Dataset, Dataset | None, list[str]]:
    """A user's images as ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (torchvision ImageFolder), or,
    without ``train/``, one folder ``<root>/<class>/*`` (no validation split: ``data.val_fraction`` holds one
    out). ``skip_corrupt``: pass over unreadable images; ``max_pixels``: refuse larger images (None: no limit)."""
    root = Path(root).expanduser().resolve()
    if not (root / "train").is_dir() and root.is_dir():
        single = _open_folder(root, root, "<class_name>/<image files> or train/ and val/", skip_corrupt, max_pixels)
        return single, None, list(single.classes)
    splits = {s: _open_folder(root / s, root, f"{s}/<class_name>/<image files>", skip_corrupt, max_pixels)
              for s in ("train", "val")}
    if splits["train"].classes != splits["val"].classes:
        raise DataError(
            f"train and val class folders differ under data.root={root}: "
            f"{splits['train'].classes} vs {splits['val'].classes}; give both the same class folders"
        )
    return splits["train"], splits["val"], list(splits["train"].classes)


def _open_folder(folder: Path, root: Path, expected: str, skip_corrupt: bool,
                 max_pixels: int | None) -> ImageFolder:
    try:
        images = ImageFolder(str(folder), loader=functools.partial(open_rgb, max_pixels=max_pixels))
        images.skip_corrupt = skip_corrupt
        return images
    except DataError:  # an empty class folder, named
        raise
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

    def describe(self, name: str, shown: int = 10) -> str:
        """One line for the log, said before any model runs: the split sizes, and the classes with their training
        images where the labels are at hand without reading an image (the first ``shown`` classes)."""
        sizes = f"{len(self.train)} train / {len(self.val)} val" + (
            f" / {len(self.test)} test" if self.test is not None else "")
        labels = labels_of(self.train)
        counts = np.bincount(labels, minlength=self.num_classes) if labels is not None else None
        names = [f"{c} ({counts[i]})" if counts is not None else c for i, c in enumerate(self.class_names[:shown])]
        more = f", ... ({self.num_classes - shown} more)" if self.num_classes > shown else ""
        per = " with their training images" if counts is not None else ""
        return f"data {name}: {sizes} images; {self.num_classes} classes{per}: {', '.join(names)}{more}"


def labels_of(dataset: Dataset) -> np.ndarray | None:
    """The labels of ``dataset`` when it holds them (in-memory arrays, an image folder or file list, a subset of
    either), without reading an image; None for a stream."""
    if isinstance(dataset, Subset):
        base = labels_of(dataset.dataset)
        return None if base is None else base[np.asarray(dataset.indices, dtype=np.int64)]
    labels = dataset.labels if isinstance(dataset, ArrayDataset) else getattr(dataset, "targets", None)
    if isinstance(labels, list | np.ndarray | torch.Tensor) and len(labels) == len(dataset):
        return np.asarray(labels, dtype=np.int64)
    return None
