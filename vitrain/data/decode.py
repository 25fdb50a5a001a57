"""``data.decode=device``: JPEG decoding on the training device, for image folders too large to cache.

Loader workers only read the files' bytes; the main process decodes each batch at once with
TorchCodec's ``decode_jpeg(..., device="cuda")`` (nvJPEG; torchvision.io's, deprecated since torchvision 0.29,
when TorchCodec is not installed), crops every image on the device (the
random-resized crop's box from torchvision's draws; the evaluation resize and center crop), and runs the
rest of the augmentation on the whole batch (:class:`~vitrain.data.gpu.GpuAugment`). Files that are not
JPEGs are decoded on the CPU. Without CUDA the same code decodes on the CPU, in the main process: correct,
but slower than ``data.decode=cpu``, which stays the default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitrain.data.cache import file_samples
from vitrain.data.config import DataConfig
from vitrain.data.datasets import DataSplits
from vitrain.data.gpu import GpuAugment, batch_augments, batch_seed, check_batched
from vitrain.data.samplers import build_samplers, eval_sampler
from vitrain.distributed import World
from vitrain.errors import DataError
from vitrain.runtime import ignore_stop_signals

log = logging.getLogger(__name__)


class FileBytes(Dataset):
    """The undecoded bytes of an image file data set's files: (bytes, label, path). Plain bytes, not tensors:
    a worker that returns a list of tensors shares each through a file descriptor of its own."""

    def __init__(self, dataset: Dataset) -> None:
        base, rows = file_samples(dataset)
        self.samples = base.samples if rows is None else [base.samples[i] for i in rows]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                return f.read(), label, path
        except OSError as e:
            raise DataError(f"cannot read image {path} ({type(e).__name__}); remove or replace the file") from e


def _as_lists(batch: list[tuple[bytes, int, str]]) -> tuple[list[bytes], torch.Tensor, list[str]]:
    data, labels, paths = zip(*batch, strict=True)
    return list(data), torch.tensor(labels), list(paths)


def _decoders() -> tuple[Callable, Callable]:
    """(decode_jpeg, decode_image): TorchCodec's (the image decoders of the PyTorch ecosystem since torchvision
    0.29 deprecated its own), else torchvision.io's; both take 1-D uint8 tensors and ``mode="RGB"``."""
    try:
        from torchcodec.decoders import decode_image, decode_jpeg
    except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch
        from torchvision.io import decode_image, decode_jpeg
    return decode_jpeg, decode_image


def decode_batch(files: list[bytes], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """Each file's bytes as a uint8 (3, H, W) RGB image on ``device``; JPEGs decoded there in one call."""
    data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    is_jpeg = [len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8 for d in data]
    out: list[torch.Tensor | None] = [None] * len(data)
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    try:
        decode_jpeg = _decoders()[0]
        decoded = decode_jpeg([data[i] for i in jpegs], mode="RGB", device=device) if jpegs else []
    except (RuntimeError, ValueError):
        decoded = [_decode_one(data[i], paths[i], device) for i in jpegs]  # find the file that fails
    for i, image in zip(jpegs, decoded, strict=True):
        out[i] = image
    for i, j in enumerate(is_jpeg):
        if not j:
            out[i] = _decode_one(data[i], paths[i], device)
    return out


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    try:
        return _decoders()[1](data, mode="RGB").to(device)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"cannot decode image {path} ({type(e).__name__}); remove or replace the file") from e


class DecodingLoader:
    """Batches of (normalized images, labels) from files decoded on ``device``, duck-typing the loader the
    trainer consumes (``len``, iteration, ``batch_size``, ``sampler``). Each decoded image (they differ in size)
    gets ``augment``'s crop on its own, the batch the rest; the draws come from a generator seeded per (seed,
    epoch, batch, rank), as in :class:`~vitrain.data.gpu.DeviceLoader`."""

    def __init__(self, dataset: Dataset, batch_size: int, augment: GpuAugment, sampler: Sampler | None,
                 drop_last: bool, device: torch.device, seed: int, num_workers: int) -> None:
        self.files, self.augment, self.device, self.seed = FileBytes(dataset), augment, device, seed
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last
        self.loader = DataLoader(self.files, batch_size, sampler=sampler, num_workers=num_workers,
                                 drop_last=drop_last, collate_fn=_as_lists, persistent_workers=num_workers > 0,
                                 worker_init_fn=ignore_stop_signals,
                                 generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, first = getattr(self.sampler, "epoch", 0), getattr(self.sampler, "start", 0) // self.batch_size
        rank, generator = getattr(self.sampler, "rank", 0), torch.Generator(self.device)
        for k, (data, labels, paths) in enumerate(self.loader):
            generator.manual_seed(batch_seed(self.seed, epoch, first + k, rank))
            images = decode_batch(data, paths, self.device)
            squares = torch.cat([self.augment.crop(image[None], generator) for image in images])
            yield self.augment.finish(squares, generator), labels.to(self.device)


def decoding_loaders(splits: DataSplits, cfg: DataConfig, img_size: int, device: torch.device, seed: int,
                     world: World) -> tuple[DecodingLoader, DecodingLoader, DecodingLoader | None]:
    """``data.decode=device``: train/val/test loaders whose workers read bytes and whose images are decoded,
    cropped and augmented on ``device``."""
    check_batched(cfg, "data.decode=device")
    if device.type != "cuda":
        log.warning("data.decode=device on %s: JPEGs are decoded on the CPU in the main process "
                    "(data.decode=cpu, in loader workers, is faster without CUDA)", device)
    train_sampler, val_sampler = build_samplers(splits, cfg.batch_size, seed, cfg.mixes, world.rank, world.size,
                                                cfg.aug_repeats)
    train_augment, evaluate = batch_augments(cfg, img_size)
    train = DecodingLoader(splits.train, cfg.batch_size, train_augment, train_sampler, cfg.mixes, device, seed,
                           cfg.workers)
    val = DecodingLoader(splits.val, cfg.batch_size, evaluate, val_sampler, False, device, seed, cfg.workers)
    test = None
    if splits.test is not None:
        test = DecodingLoader(splits.test, cfg.batch_size, evaluate, eval_sampler(len(splits.test), world.rank,
                                                                                  world.size), False, device, seed,
                              cfg.workers)
    return train, val, test
