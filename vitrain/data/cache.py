"""``data.cache=true``: decode every image of a folder (or file list) once into a uint8 array file, and train
from it with batched augmentation on the device, the path that in-memory data sets already have.

The cache holds each image's central square at side S = floor(img_size / crop_pct) (256 for 224 at
crop_pct 0.875): turn it upright (its EXIF orientation), resize the shorter side to S, center crop S x S, as the
evaluation transform of ``data.crop_mode=center`` does before its last crop. Random-resized crops are drawn from
that square. ``squash`` and ``border`` evaluate on the whole image, which a centre square has lost; storing the
eval split another way would take a second cache of the folder that train and val share under data.val_fraction,
so, simplest and still correct, :class:`~vitrain.data.config.DataConfig` refuses them with ``data.cache=true`` (as
set, or the weights' own once resolved) in one line, before any data is read. The file is a
``.npy`` array (N, S, S, 3) that ``numpy.load(..., mmap_mode="r")`` opens; the loader reads each batch's rows
from it by offset, so the operating system's page cache holds the data, not the training process. Beside it, a
manifest of the file list (path, size, modification time, label): a changed folder gets a new cache, never a stale
one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm import tqdm

from vitrain.data.config import DataConfig
from vitrain.data.datasets import DataSplits, open_rgb
from vitrain.data.gpu import DeviceLoader, GpuAugment, batch_augments, check_batched
from vitrain.data.samplers import build_samplers, eval_sampler
from vitrain.distributed import World, rank0_first
from vitrain.errors import DataError, first_line

log = logging.getLogger(__name__)
VERSION = 2  # 2: images turned upright as their EXIF orientation says (a cache of version 1 is rebuilt)


def file_samples(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """The file-reading data set under ``dataset`` (an ImageFolder or file list) and the indices that
    (possibly nested) Subsets keep of it."""
    if isinstance(dataset, Subset):
        base, indices = file_samples(dataset.dataset)
        return base, [int(i) if indices is None else indices[i] for i in dataset.indices]
    if not hasattr(dataset, "samples"):
        raise DataError(f"data.cache=true reads image files; {type(dataset).__name__} has none (use imagefolder "
                        f"or filelist, or data.cache=false)")
    return dataset, None


class ImageCache:
    """The cached (N, S, S, 3) uint8 images of a file list and their labels; :meth:`read` gives batches."""

    def __init__(self, path: Path, labels: list[int], side: int) -> None:
        self.path, self.side = path, side
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.row_bytes = side * side * 3
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        self._fd = None

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Images ``rows`` as uint8 (B, 3, S, S), read from the file by offset (no memory map kept)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty((len(rows), self.side, self.side, 3), dtype=np.uint8)
        flat = out.reshape(len(rows), -1)
        for i, row in enumerate(rows.tolist()):
            flat[i] = np.frombuffer(os.pread(self._fd, self.row_bytes, self.offset + row * self.row_bytes), np.uint8)
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}


def build_cache(samples: list[tuple[str, int]], side: int, interpolation: str, cache_dir: Path,
                workers: int) -> ImageCache:
    """The cache of ``samples`` (path, label) at side ``side`` in ``cache_dir``: reused when a manifest of the
    same files (paths, sizes, modification times) and settings is there, else decoded in ``workers``
    processes with a progress bar, written to a temporary file and renamed when complete."""
    manifest = {"version": VERSION, "side": side, "interpolation": interpolation,
                "files": [[p, *_stat(p), y] for p, y in samples]}
    key = hashlib.sha256(json.dumps(manifest).encode()).hexdigest()[:16]
    ident = hashlib.sha256(os.path.commonpath([p for p, _ in samples]).encode()).hexdigest()[:8]
    path = cache_dir / f"images-{ident}-{side}px-{key}.npy"
    labels = [y for _, y in samples]
    if path.is_file() and path.with_suffix(".json").is_file():
        log.info("reusing the image cache %s (%d images at %d px)", path, len(samples), side)
        return ImageCache(path, labels, side)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _write(path, [p for p, _ in samples], side, interpolation, workers)
    path.with_suffix(".json").write_text(json.dumps(manifest))
    for stale in cache_dir.glob(f"images-{ident}-{side}px-*"):  # the caches of this folder's earlier contents
        if stale.stem != path.stem:
            stale.unlink(missing_ok=True)
    return ImageCache(path, labels, side)


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}) while building the cache; remove it from "
                        f"the data or restore it") from e
    return st.st_size, st.st_mtime_ns


def _write(path: Path, files: list[str], side: int, interpolation: str, workers: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), side, side, 3))
    jobs = [(f, side, interpolation) for f in files]
    try:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                _fill(array, pool.imap(_decode_square, jobs, chunksize=16), len(files), path)
        else:
            _fill(array, map(_decode_square, jobs), len(files), path)
        array.flush()
        del array
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fill(array: np.ndarray, decoded: Iterator[np.ndarray | str], total: int, path: Path) -> None:
    for i, image in enumerate(tqdm(decoded, total=total, desc=f"caching {total} images", leave=False)):
        if isinstance(image, str):  # a decode error, as one line
            raise DataError(f"{image} while building the cache {path.name}; remove or replace the file")
        array[i] = image


def _decode_square(job: tuple[str, int, str]) -> np.ndarray | str:
    """An image file's central square at ``side``, as (side, side, 3) uint8; a one-line message if unreadable."""
    path, side, interpolation = job
    try:
        image = TF.resize(open_rgb(path), side, InterpolationMode(interpolation))
        return np.asarray(TF.center_crop(image, side), dtype=np.uint8)
    except (OSError, ValueError) as e:  # open_rgb's DataError (an OSError) names the decoder's error as its cause
        return f"cannot read image {path} ({_decode_reason(e.__cause__ or e)})"


def _decode_reason(error: BaseException) -> str:
    """The decoder's message without the object reprs PIL puts in it: ``cannot identify image file``."""
    return re.sub(r"\s*<[^<>]*>", "", first_line(error, 160)).strip() or type(error).__name__


def cache_folder(cache_dir: str | None, data_root: Path) -> Path:
    """``data.cache_dir``, or ``<data root>/.vitrain-cache``, or (when the data's folder is read-only) the user's
    cache folder; a one-line DataError when a chosen folder cannot be written."""
    if cache_dir:
        folder = Path(cache_dir).expanduser()
        if not _writable(folder):
            raise DataError(f"cannot write the image cache to data.cache_dir={folder}; choose a writable folder")
        return folder
    beside = data_root / ".vitrain-cache"
    if _writable(beside):
        return beside
    folder = user_cache_dir() / hashlib.sha256(str(data_root).encode()).hexdigest()[:12]
    if not _writable(folder):
        raise DataError(f"cannot write the image cache beside the data ({beside}) or to {folder}; set "
                        f"data.cache_dir to a writable folder")
    log.info("%s is read-only: the image cache goes to %s", data_root, folder)
    return folder


def user_cache_dir() -> Path:
    """vitrain's folder in the user's cache: ``$XDG_CACHE_HOME/vitrain`` (``~/.cache/vitrain``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitrain"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


class CachedLoader(DeviceLoader):
    """A :class:`DeviceLoader` whose images come from an :class:`ImageCache`: each batch's rows are read (one
    batch ahead, in a thread) and copied to the device, then augmented there as a whole batch."""

    def __init__(self, cache: ImageCache, rows: list[int] | None, batch_size: int, augment: GpuAugment,
                 sampler: Sampler[int] | None = None, drop_last: bool = False, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        self.cache, self.device = cache, torch.device(device)
        self.rows = torch.arange(len(cache)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.labels = cache.labels[self.rows]
        self.batch_size, self.augment, self.drop_last, self.seed, self.sampler = (batch_size, augment, drop_last,
                                                                                  seed, sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batch k + 1 is read and cropped in a thread while batch k is normalized (and erased) here: each
        with its own generator, seeded as :class:`DeviceLoader` seeds it, so the draws are the same."""
        order, epoch, first = self._epoch()
        order = order.cpu()

        def prepare(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
            generator = torch.Generator(self.device).manual_seed(self.batch_seed(epoch, first + k))
            index = order[k * self.batch_size: (k + 1) * self.batch_size]
            images = self.cache.read(self.rows[index]).to(self.device, non_blocking=True)
            return self.augment.crop(images, generator), self.labels[index].to(self.device), generator

        with ThreadPoolExecutor(1) as worker:
            ahead = worker.submit(prepare, 0) if len(self) else None
            for k in range(len(self)):
                images, labels, generator = ahead.result()
                if k + 1 < len(self):
                    ahead = worker.submit(prepare, k + 1)
                yield self.augment.finish(images, generator), labels


def cache_side(img_size: int, crop_pct: float) -> int:
    """The side of the cached squares: the size the evaluation transform resizes to before its center crop."""
    return math.floor(img_size / crop_pct)


def cached_loaders(splits: DataSplits, cfg: DataConfig, img_size: int, device: torch.device, seed: int,
                   world: World) -> tuple[CachedLoader, CachedLoader, CachedLoader | None]:
    """``data.cache=true``: train/val/test loaders over the decode-once caches of the splits' image files (rank
    0 builds a missing cache while the other ranks wait), augmented as whole batches on ``device``."""
    check_batched(cfg, "data.cache=true")
    side, caches = cache_side(img_size, cfg.crop_pct), {}
    root = Path(cfg.root if cfg.name == "imagefolder" else Path(cfg.train_list).parent).expanduser().resolve()

    def open_cache(dataset: Dataset) -> tuple[ImageCache, list[int] | None]:
        base, rows = file_samples(dataset)
        if id(base.samples) not in caches:  # train and val of one folder (data.val_fraction) share a cache
            folder = rank0_first(lambda: cache_folder(cfg.cache_dir, root))
            caches[id(base.samples)] = rank0_first(lambda: build_cache(base.samples, side, cfg.interpolation, folder,
                                                                       max(1, cfg.workers)))
        return caches[id(base.samples)], rows

    train_sampler, val_sampler = build_samplers(splits, cfg.batch_size, seed, cfg.mixes, world.rank, world.size,
                                                cfg.aug_repeats)
    train_augment, evaluate = batch_augments(cfg, img_size)
    train = CachedLoader(*open_cache(splits.train), cfg.batch_size, train_augment, train_sampler, cfg.mixes, device,
                         seed)
    val = CachedLoader(*open_cache(splits.val), cfg.batch_size, evaluate, val_sampler, False, device)
    test = None
    if splits.test is not None:
        test = CachedLoader(*open_cache(splits.test), cfg.batch_size, evaluate,
                            eval_sampler(len(splits.test), world.rank, world.size), False, device)
    return train, val, test
