"""Image data sets read from files: a CSV file list (``data=filelist``) and Hugging Face ``datasets``
(``data=hf``). Each is a map-style data set of ``(image, label)`` with ``targets`` (one label per sample),
``classes`` and a ``transform`` set by the caller, as torchvision's ImageFolder."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from vitrain.data.datasets import open_rgb
from vitrain.errors import ConfigError, DataError, first_line

EVAL_SPLITS = ("validation", "valid", "val", "test")


class FileList(Dataset):
    """Images named by ``samples`` (path, label index) and their ``classes``; read with PIL as RGB."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples, self.classes, self.transform = samples, classes, None

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        image = open_rgb(path)
        return (self.transform(image) if self.transform else image), label

    def keep(self, classes: Sequence[int]) -> None:
        """Only the samples of ``classes``, relabelled 0..k-1 in that order."""
        new = {int(c): i for i, c in enumerate(classes)}
        self.samples = [(p, new[y]) for p, y in self.samples if y in new]
        self.classes = [self.classes[c] for c in new]


def load_filelist(train_csv: str | Path, val_csv: str | Path | None) -> tuple[FileList, FileList | None, list[str]]:
    """``data=filelist``: CSV files of ``path,label`` rows (a ``path,label`` header is optional; a path is
    relative to its CSV's folder). The classes are the training labels, sorted (numerically when all are
    integers); a validation label outside them is a one-line DataError."""
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
        sets.append(FileList([(path, index[label]) for path, label in rows], list(names)))
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


class HFImages(Dataset):
    """A split of a Hugging Face ``datasets.Dataset`` as (PIL RGB image, label) pairs."""

    def __init__(self, table: Any, image_column: str, label_column: str, classes: list[str]) -> None:
        self.table, self.image_column, self.classes, self.transform = table, image_column, classes, None
        self.labels = torch.as_tensor(table[label_column], dtype=torch.long)
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

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.table[int(self.rows[i])][self.image_column]
        if isinstance(image, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            image = open_rgb(image["path"]) if image.get("bytes") is None else _from_bytes(image["bytes"])
        image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), int(self.labels[i])

    def keep(self, classes: Sequence[int]) -> None:
        order = torch.as_tensor(list(classes), dtype=torch.long)
        hits = self.labels.unsqueeze(1) == order
        kept = hits.any(1)
        self.rows, self.labels = self.rows[kept], hits[kept].int().argmax(1)
        self.classes = [self.classes[c] for c in order.tolist()]


def _from_bytes(data: bytes) -> Image.Image:
    import io

    return Image.open(io.BytesIO(data))


def load_hf(path: str, train_split: str, val_split: str | None, image_column: str,
            label_column: str) -> tuple[HFImages, HFImages | None, list[str]]:
    """``data=hf``: a data set saved with ``save_to_disk``, parquet file(s), an image folder (the
    ``imagefolder`` builder), or else a hub id (needs the network). The validation split is ``val_split``,
    or the first of validation/valid/val/test that exists, or None (then ``data.val_fraction`` holds one out)."""
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
    names = list(feature.names) if is_class_label else [str(c) for c in range(max(table[label_column]) + 1)]
    train = HFImages(table, image_column, label_column, names)
    val = None if val_split is None else HFImages(splits[val_split], image_column, label_column, names)
    return train, val, names


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection: offline, a hub id fails at once
    instead of after the client's retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


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
        elif _hub_reachable():
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
