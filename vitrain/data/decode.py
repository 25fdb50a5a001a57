"""``data.decode=device``: JPEG decoding on the training device, for image folders too large to cache.

Loader workers only read the files' bytes; the main process decodes each batch at once with
TorchCodec's ``decode_jpeg(..., device="cuda")`` (nvJPEG; torchvision.io's, deprecated since torchvision 0.29,
when TorchCodec is not installed), crops every image on the device (the random-resized crop's box from
torchvision's draws; the evaluation resize and crop of ``data.crop_mode``, each image on its own), and runs the
rest of the augmentation on the whole batch (:class:`~vitrain.data.gpu.GpuAugment`). Files that are not
JPEGs are decoded on the CPU by PIL. Without CUDA the same code decodes on the CPU, in the main process:
correct, but slower than ``data.decode=cpu``, which stays the default.

Every image is turned upright as its EXIF orientation says, as PIL's ``exif_transpose`` turns it on the other
paths: the decoders disagree (TorchCodec's CPU decoder applies the tag, nvJPEG and torchvision's decoders do not),
so the tag is read from the JPEG's header and set to 1 in the bytes before decoding (:func:`take_orientation`),
and the decoded tensor is turned (:func:`orient`).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.functional import pil_to_tensor

from vitrain.data.cache import file_samples
from vitrain.data.config import DataConfig
from vitrain.data.datasets import DataSplits
from vitrain.data.gpu import GpuAugment, batch_augments, batch_seed, check_batched
from vitrain.data.samplers import build_samplers, eval_sampler
from vitrain.data.sources import upright
from vitrain.distributed import World
from vitrain.errors import DataError
from vitrain.runtime import loader_workers

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
    """Each file's bytes as an upright uint8 (3, H, W) RGB image on ``device``: JPEGs decoded there in one call
    and turned as their EXIF orientation says, other files decoded by PIL and turned by it."""
    data = [bytearray(f) for f in files]
    jpegs = [i for i, d in enumerate(data) if len(d) > 2 and d[:2] == b"\xff\xd8"]
    orientation = {i: take_orientation(data[i]) for i in jpegs}  # and the tag set to 1: no decoder turns them
    encoded = {i: torch.frombuffer(data[i], dtype=torch.uint8) for i in jpegs}
    try:
        decode_jpeg = _decoders()[0]
        decoded = decode_jpeg([encoded[i] for i in jpegs], mode="RGB", device=device) if jpegs else []
    except (RuntimeError, ValueError):
        decoded = [_decode_one(encoded[i], paths[i], device) for i in jpegs]  # find the file that fails
    out = {i: orient(image, orientation[i]) for i, image in zip(jpegs, decoded, strict=True)}
    return [out[i] if i in out else _decode_pil(files[i], paths[i], device) for i in range(len(files))]


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    try:
        return _decoders()[1](data, mode="RGB").to(device)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"cannot decode image {path} ({type(e).__name__}); remove or replace the file") from e


def _decode_pil(data: bytes, path: str, device: torch.device) -> torch.Tensor:
    """A file that is not a JPEG (PNG, WebP, ...), decoded and turned upright by PIL as on the other paths."""
    try:
        return pil_to_tensor(upright(Image.open(io.BytesIO(data))).convert("RGB")).to(device)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot decode image {path} ({type(e).__name__}); remove or replace the file") from e


def take_orientation(jpeg: bytearray) -> int:
    """The EXIF orientation of a JPEG (1 to 8, as PIL's ``ExifTags.Base.Orientation``; 1 without one), read from
    its APP1 segment without decoding, and set to 1 in ``jpeg`` so that no decoder applies it on its own."""
    pos = 2
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF:
        marker = jpeg[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in (0xD9, 0xDA):  # the end, or the start of the scan: the headers are over
            break
        length = int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if marker == 0xE1 and jpeg[pos + 4:pos + 10] == b"Exif\0\0":
            return _take_tiff_orientation(jpeg, pos + 10, min(pos + 2 + length, len(jpeg)))
        pos += 2 + length
    return 1


def _take_tiff_orientation(data: bytearray, start: int, end: int) -> int:
    """The Orientation entry (0x0112) of the first IFD of the TIFF structure at ``data[start:end]``, set to 1."""
    order = {b"II": "little", b"MM": "big"}.get(bytes(data[start:start + 2]))
    if order is None or start + 8 > end:
        return 1
    ifd = start + int.from_bytes(data[start + 4:start + 8], order)
    count = int.from_bytes(data[ifd:ifd + 2], order) if ifd + 2 <= end else 0
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, end - 11), 12):
        if int.from_bytes(data[entry:entry + 2], order) == 0x0112:
            value = int.from_bytes(data[entry + 8:entry + 10], order)
            data[entry + 8:entry + 10] = (1).to_bytes(2, order)
            return value if 1 <= value <= 8 else 1
    return 1


_TURNS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {  # PIL's exif_transpose, on (..., H, W)
    2: lambda x: x.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),  # ROTATE_180
    4: lambda x: x.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),  # TRANSPOSE
    6: lambda x: x.rot90(-1, (-2, -1)),  # ROTATE_270: a quarter turn clockwise
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),  # TRANSVERSE
    8: lambda x: x.rot90(1, (-2, -1)),  # ROTATE_90: a quarter turn counterclockwise
}


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``image`` (..., H, W) turned as EXIF ``orientation`` (1 to 8) says, as PIL's ``exif_transpose`` turns it."""
    turn = _TURNS.get(orientation)
    return image if turn is None else turn(image).contiguous()


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
                                 **loader_workers(num_workers),
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
