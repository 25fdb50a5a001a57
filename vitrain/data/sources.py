"""Image data sets read from files: a CSV file list (``data=filelist``) and Hugging Face ``datasets``
(``data=hf``). Each is a map-style data set of ``(image, label)`` with ``targets`` (one label per sample),
``classes`` and a ``transform`` set by the caller, as torchvision's ImageFolder.

How image files are read, for these and the image folders: :func:`open_rgb` under a pixel limit
(``data.max_image_pixels``), turned upright as their EXIF orientation says (:func:`upright`: a phone's photo is
stored sideways with a tag that says how to turn it), and :class:`SkipUnreadable`, which passes over unreadable
files (``data.skip_corrupt``), counted for the training loader (:func:`count_skipped`)."""

from __future__ import annotations

import contextlib
import csv
import logging
import multiprocessing
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Subset

from vitrain.data.config import MAX_IMAGE_PIXELS
from vitrain.errors import ConfigError, DataError, first_line
from vitrain.hub import hub_online

log = logging.getLogger(__name__)
EVAL_SPLITS = ("validation", "valid", "val", "test")
def open_rgb(path: str | Path, fix: str = "remove or replace the file",
             max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image file as RGB, upright (:func:`upright`) (ImageFolder's loader, and the inputs of predict and
    visualize), or a one-line DataError naming the file that cannot be read and ending in ``fix``; an image of more
    than ``max_pixels`` (``data.max_image_pixels``; None: no limit) is refused as a possible decompression bomb."""
    try:
        with open(path, "rb") as f, pixel_limit(max_pixels):
            return upright(Image.open(f)).convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}); {fix}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(too_many_pixels(path, max_pixels, e)) from e


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned and flipped as its EXIF Orientation tag says (PIL's ``exif_transpose``), as a photo viewer
    shows it: cameras store a photo taken in portrait sideways and tag it; the model must see what the user sees.
    Loads the pixels; without the tag, ``image`` itself, not a copy."""
    ImageOps.exif_transpose(image, in_place=True)
    return image


@contextlib.contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """PIL's decompression-bomb guard set to ``max_pixels`` (None: off) for the images opened inside, its warning
    (over the limit, under twice it) raised as an error; PIL's own setting is put back after."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def too_many_pixels(where: str | Path, max_pixels: int | None, error: Exception) -> str:
    """The message for an image refused by :func:`pixel_limit`."""
    size = re.search(r"\((\d+) pixels\)", str(error))
    return (f"image {where} has {f'{int(size[1]):,} pixels' if size else 'too many pixels'}, over the limit of "
            f"data.max_image_pixels={max_pixels} (a guard against decompression bombs); if the image is genuine, "
            f"raise data.max_image_pixels (null: no limit)")


class SkipUnreadable(Dataset):
    """A data set of image files whose ``read(i)`` gives sample i or a one-line DataError. With ``skip_corrupt``
    (``data.skip_corrupt``) an unreadable sample is replaced by a readable one of the same batch (as the shards
    fill their gaps), so that an epoch keeps its steps, with a warning naming the file; the replacements are
    added to ``skip_count``, a counter shared with the loader workers that :func:`count_skipped` sets."""

    skip_corrupt = False
    skip_count: Any = None  # a multiprocessing.Value, or None: not counted

    def read(self, i: int) -> tuple[Any, int]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:
        """The samples of a batch (a DataLoader fetches a batch with one call, through a Subset too)."""
        if not self.skip_corrupt:
            return [self.read(i) for i in indices]
        items = [self._read_or_none(i) for i in indices]
        good = [item for item in items if item is not None]
        for k, item in enumerate(items):
            if item is None:  # the batch's next readable sample, else its last; in a batch of none, the next file
                later = next((x for x in items[k + 1:] if x is not None), None)
                items[k] = later or (good[-1] if good else self._next_readable(indices[k]))
        return items

    def _read_or_none(self, i: int) -> tuple[Any, int] | None:
        try:
            return self.read(i)
        except DataError as e:
            log.warning("data.skip_corrupt: %s; replaced by another image", first_line(e))
            if self.skip_count is not None:
                with self.skip_count.get_lock():
                    self.skip_count.value += 1
            return None

    def _next_readable(self, i: int) -> tuple[Any, int]:
        for k in range(1, len(self)):
            with contextlib.suppress(DataError):
                return self.read((i + k) % len(self))
        raise DataError(f"none of the {len(self)} images can be read (data.skip_corrupt skips only some); check "
                        f"the files")


class SkipCountingLoader:
    """A DataLoader whose data set passes over unreadable files, with ``skipped``: how many it replaced since the
    loader was made, in this process and its workers (the same interface as the shards' loader)."""

    def __init__(self, loader: DataLoader, count: Any) -> None:
        self.loader, self.count = loader, count

    @property
    def skipped(self) -> int:
        return self.count.value

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __getattr__(self, name: str) -> Any:  # batch_size, sampler, dataset, ... of the DataLoader
        if name == "loader":  # not made by __init__ (a copy): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def count_skipped(loader: DataLoader) -> DataLoader | SkipCountingLoader:
    """``loader``, with a count of the files it skipped (:class:`SkipCountingLoader`) when it has to skip any."""
    dataset = loader.dataset.dataset if isinstance(loader.dataset, Subset) else loader.dataset
    if not getattr(dataset, "skip_corrupt", False):
        return loader
    dataset.skip_count = multiprocessing.Value("q", 0)  # before the workers start: they share it
    return SkipCountingLoader(loader, dataset.skip_count)


class FileList(SkipUnreadable):
    """Images named by ``samples`` (path, label index) and their ``classes``; read with PIL as RGB, refused
    above ``max_pixels`` (None: no limit), passed over when unreadable with ``skip_corrupt``."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], skip_corrupt: bool = False,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
        self.samples, self.classes, self.transform = samples, classes, None
        self.skip_corrupt, self.max_pixels = skip_corrupt, max_pixels

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        image = open_rgb(path, max_pixels=self.max_pixels)
        return (self.transform(image) if self.transform else image), label

    def keep(self, classes: Sequence[int]) -> None:
        """Only the samples of ``classes``, relabelled 0..k-1 in that order."""
        new = {int(c): i for i, c in enumerate(classes)}
        self.samples = [(p, new[y]) for p, y in self.samples if y in new]
        self.classes = [self.classes[c] for c in new]


def load_filelist(train_csv: str | Path, val_csv: str | Path | None, skip_corrupt: bool = False,
                  max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[FileList, FileList | None, list[str]]:
    """``data=filelist``: CSV files of ``path,label`` rows (a ``path,label`` header is optional; a path is
    relative to its CSV's folder). The classes are the training labels, sorted (numerically when all are
    integers); a validation label outside them is a one-line DataError. ``skip_corrupt`` and ``max_pixels``:
    :class:`FileList`'s."""
    train_rows = _read_rows(Path(train_csv))
    names = sorted({label for _, label in train_rows}, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))
    index = {name: i for i, name in enumerate(names)}
    sets = []
    for csv_path, rows in ((train_csv, train_rows), (val_csv, _read_rows(Path(val_csv)) if val_csv else None)):
        if rows is None:
            sets.append(None)
            continue
        for path, label in rows:
            if label not in index:
                raise DataError(f"{csv_path}: {path} has label '{label}', which no training row has; "
                                f"the classes are {names[:10]}{'...' if len(names) > 10 else ''}")
        sets.append(FileList([(path, index[label]) for path, label in rows], list(names), skip_corrupt, max_pixels))
    return sets[0], sets[1], names


def _read_rows(csv_path: Path) -> list[tuple[str, str]]:
    """The (absolute path, label) rows of a file list."""
    csv_path = csv_path.expanduser().resolve()
    try:
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the file list {csv_path} ({type(e).__name__}); give a CSV of path,label "
                        f"rows") from e
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad = next((n for n, r in enumerate(rows, 1) if len(r) < 2 or not r[0].strip() or not r[1].strip()), None)
    if not rows or bad is not None:
        raise DataError(f"{csv_path}{f' row {bad}' if bad else ''}: expected rows of path,label; fix the file")
    return [(str((csv_path.parent / r[0].strip()).resolve()), r[1].strip()) for r in rows]


class HFImages(SkipUnreadable):
    """A split of a Hugging Face ``datasets.Dataset`` as (PIL RGB image, label) pairs; ``skip_corrupt`` and
    ``max_pixels`` as :class:`FileList`'s."""

    def __init__(self, table: Any, image_column: str, label_column: str, classes: list[str],
                 skip_corrupt: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS,
                 by_name: bool = False) -> None:
        self.table, self.image_column, self.classes, self.transform = table, image_column, classes, None
        self.skip_corrupt, self.max_pixels = skip_corrupt, max_pixels
        raw = table[label_column]
        if by_name:  # string labels: their index among the class names (sorted, as an image folder's)
            index = {name: i for i, name in enumerate(classes)}
            unknown = next((row for row, name in enumerate(raw) if name not in index), None)
            if unknown is not None:
                raise DataError(f"row {unknown} of the Hugging Face data has label '{raw[unknown]}', which no "
                                f"training row has; fix data.label_column='{label_column}' or the data")
            raw = [index[name] for name in raw]
        self.labels = torch.as_tensor(raw, dtype=torch.long)
        self.rows = torch.arange(len(self.labels))  # the table rows kept (keep())
        outside = ((self.labels < 0) | (self.labels >= len(classes))).nonzero()
        if len(outside):
            row = int(outside[0])
            raise DataError(f"row {row} of the Hugging Face data has label {int(self.labels[row])}, outside the "
                            f"{len(classes)} classes; fix data.label_column='{label_column}' or the data")

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> tuple[Any, int]:
        row = int(self.rows[i])
        try:
            with pixel_limit(self.max_pixels):  # the table decodes the images it holds as Image features
                image = self.table[row][self.image_column]
                if isinstance(image, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
                    image = open_rgb(image["path"], max_pixels=self.max_pixels) if image.get("bytes") is None \
                        else _from_bytes(image["bytes"])
                image = upright(image).convert("RGB")  # a no-op for those datasets decoded and turned already
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(too_many_pixels(f"in row {row} of the Hugging Face data", self.max_pixels, e)) from e
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the image in row {row} of the Hugging Face data ({type(e).__name__}); "
                            f"fix or remove that row") from e
        return (self.transform(image) if self.transform else image), int(self.labels[i])

    def keep(self, classes: Sequence[int]) -> None:
        order = torch.as_tensor(list(classes), dtype=torch.long)
        hits = self.labels.unsqueeze(1) == order
        kept = hits.any(1)
        self.rows, self.labels = self.rows[kept], hits[kept].int().argmax(1)
        self.classes = [self.classes[c] for c in order.tolist()]


def _from_bytes(data: bytes) -> Image.Image:
    import io

    return upright(Image.open(io.BytesIO(data)))


def load_hf(path: str, train_split: str, val_split: str | None, image_column: str, label_column: str,
            skip_corrupt: bool = False, max_pixels: int | None = MAX_IMAGE_PIXELS,
            ) -> tuple[HFImages, HFImages | None, list[str]]:
    """``data=hf``: a data set saved with ``save_to_disk``, parquet file(s), an image folder (the
    ``imagefolder`` builder), or else a hub id (needs the network). The validation split is ``val_split``,
    or the first of validation/valid/val/test that exists, or None (then ``data.val_fraction`` holds one out).
    ``skip_corrupt`` and ``max_pixels``: :class:`FileList`'s."""
    splits = _open_hf(path)
    if train_split not in splits:
        raise ConfigError(f"the Hugging Face data at {path} has no split '{train_split}' (data.train_split); "
                          f"it has {', '.join(splits)}")
    if val_split is not None and val_split not in splits:
        raise ConfigError(f"the Hugging Face data at {path} has no split '{val_split}' (data.val_split); "
                          f"it has {', '.join(splits)}")
    val_split = val_split or next((s for s in EVAL_SPLITS if s in splits and s != train_split), None)
    table = splits[train_split]
    for column in (image_column, label_column):
        if column not in table.column_names:
            key = "image_column" if column == image_column else "label_column"
            raise ConfigError(f"the Hugging Face data has no column '{column}' (data.{key}); its columns are "
                              f"{', '.join(table.column_names)}")
    feature = table.features[label_column]
    is_class_label = hasattr(feature, "names")
    by_name = not is_class_label and getattr(feature, "dtype", "") in ("string", "large_string")
    if is_class_label:
        names = list(feature.names)
    elif by_name:  # string labels: the class names are the training split's, sorted (as an image folder's)
        names = sorted(set(table[label_column]))
    else:
        names = [str(c) for c in range(max(table[label_column]) + 1)]
    reading = dict(skip_corrupt=skip_corrupt, max_pixels=max_pixels, by_name=by_name)
    train = HFImages(table, image_column, label_column, names, **reading)
    val = None if val_split is None else HFImages(splits[val_split], image_column, label_column, names, **reading)
    return train, val, names


def _open_hf(path: str) -> dict[str, Any]:
    """The splits of the data at ``path`` (local first; a hub id only when nothing local has that name)."""
    try:
        import datasets
    except ImportError as e:
        raise ConfigError('data=hf needs Hugging Face datasets: pip install "vitrain[hf]"') from e
    local = Path(path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(local))
        elif local.is_file() and local.suffix == ".parquet":
            loaded = datasets.load_dataset("parquet", data_files={"train": str(local)})
        elif local.is_dir() and any(local.rglob("*.parquet")):
            loaded = datasets.load_dataset("parquet", data_dir=str(local))
        elif local.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(local))
        elif os.environ.get("HF_DATASETS_OFFLINE") != "1" and hub_online():  # else offline: no retries
            loaded = datasets.load_dataset(path)  # a hub id: the same code as online users run
        else:
            raise DataError(f"data.path={path} is no local file or folder, and the Hugging Face hub cannot be "
                            f"reached (offline); give a local save_to_disk folder, parquet files or an image folder")
    except (ConfigError, DataError):
        raise
    except Exception as e:
        where = "the local data" if local.exists() else "a hub data set (no local file or folder has that name)"
        raise DataError(f"cannot load {where} data.path={path}: {type(e).__name__}: {first_line(e)}; give a "
                        f"save_to_disk folder, parquet files or an image folder, or connect to the network") from e
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
