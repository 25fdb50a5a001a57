"""A data path for data sets that fit in memory: the uint8 images live on the training device and the
augmentations run on whole batches there, instead of per-image transforms in loader workers.

:class:`GpuAugment` has the semantics of :func:`vitrain.data.transforms.build_transforms` for the options
it supports (resize, padded random crop, horizontal flip, normalize, timm's "pixel" random erasing);
:class:`DeviceLoader` is a drop-in for the ``DataLoader`` the trainer consumes, with augmentation
randomness fixed per (seed, epoch, batch) so that a resumed epoch yields the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, Subset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from vitrain.data.config import PIPELINES, DataConfig
from vitrain.data.datasets import ArrayDataset, DataSplits
from vitrain.data.samplers import EpochSampler
from vitrain.data.transforms import check_re_prob, eval_crop
from vitrain.errors import ConfigError

IN_MEMORY = "digits, cifar10, cifar100"
TENSOR_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "nearest-exact")


class GpuAugment:
    """Batched train/eval transform of uint8 (B, C, H, W) images on their own device -> normalized float32
    (B, C, img_size, img_size). Train: ``pad``: resize (shorter side) -> random crop of the zero-padded image,
    or ``rrc``: a random resized crop (torchvision's area and aspect-ratio draws, one box per image, sampled
    by ``grid_sample``: no antialiasing when a crop is shrunk) -> horizontal flip (p=0.5) -> normalize ->
    random erasing (``re_prob``). Eval: the per-image path's resize and crop of ``crop_mode``
    (:func:`~vitrain.data.transforms.eval_crop`, run once on the whole batch: its images share one size, and the
    resize kernels treat each image alone) -> normalize. All randomness comes from the ``generator`` passed to
    each call."""

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        crop_padding: int = 4,
        hflip: bool = True,
        interpolation: str = "bilinear",
        re_prob: float = 0.0,
        train_crop: str = "pad",
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        crop_pct: float = 1.0,
        crop_mode: str = "center",
    ) -> None:
        if interpolation not in TENSOR_INTERPOLATIONS:
            raise ConfigError(f"data.interpolation='{interpolation}' does not run on image tensors; "
                              f"use one of {', '.join(TENSOR_INTERPOLATIONS)}")
        check_re_prob(re_prob)
        if crop_padding < 0:
            raise ConfigError(f"data.crop_padding must be >= 0, got {crop_padding}")
        self.img_size, self.train, self.crop_padding, self.hflip = img_size, train, crop_padding, hflip
        self.interpolation, self.re_prob = InterpolationMode(interpolation), re_prob
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_crop, self.scale, self.ratio, self.crop_pct = train_crop, tuple(scale), tuple(ratio), crop_pct
        self.eval_crop = v2.Compose(eval_crop(img_size, crop_pct, crop_mode, interpolation, mean))
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.finish(self.crop(images, generator), generator)

    def crop(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The geometric part, uint8 in and out: resize and crop (and flip)."""
        # torchvision's own resize kernel (one interpolate over the batch, rounded back to uint8), so the
        # resized pixels are those of the per-image CPU path
        if not self.train:
            return self.eval_crop(images)
        if self.train_crop == "rrc":
            return self._resized_crop_and_flip(images, generator)
        return self._crop_and_flip(TF.resize(images, [self.img_size], self.interpolation, antialias=True), generator)

    def finish(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The rest, after :meth:`crop` (with the same generator): normalize, then random erasing."""
        images = self._normalize(images)
        return self._erase(images, generator) if self.train and self.re_prob > 0 else images

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> float in [0, 1] -> (x - mean) / std, the arithmetic of torchvision's ToDtype + Normalize."""
        if images.device not in self._stats:  # made once per device: a host-to-device copy per batch would sync
            self._stats[images.device] = tuple(torch.tensor(v, device=images.device).view(-1, 1, 1)
                                               for v in (self.mean, self.std))
        mean, std = self._stats[images.device]
        return TF.to_dtype(images, torch.float32, scale=True).sub_(mean).div_(std)

    def _crop_and_flip(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """torchvision's RandomCrop(padding=p) + RandomHorizontalFlip for every sample at once: a window of
        the zero-padded batch at a random (top, left), read backwards along x for flipped samples."""
        b, c, h, w = images.shape
        p, s, device = self.crop_padding, self.img_size, images.device
        padded = F.pad(images, (p, p, p, p))  # zero = black, before normalization
        top = torch.randint(0, h + 2 * p - s + 1, (b, 1), generator=generator, device=device)
        left = torch.randint(0, w + 2 * p - s + 1, (b, 1), generator=generator, device=device)
        ramp = torch.arange(s, device=device)
        rows, cols = top + ramp, left + ramp  # (B, s): source row / column of every output row / column
        if self.hflip:
            flip = torch.rand(b, 1, generator=generator, device=device) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, s, w + 2 * p))  # (B, C, s, W + 2p)
        return out.gather(3, cols[:, None, None, :].expand(b, c, s, s))  # (B, C, s, s)

    def rrc_boxes(self, b: int, h: int, w: int, generator: torch.Generator | None,
                  device: torch.device) -> tuple[torch.Tensor, ...]:
        """torchvision's ``RandomResizedCrop.get_params`` for ``b`` images of h x w at once: up to 10 draws of an
        area share in ``scale`` and a log-uniform aspect ratio in ``ratio``, the first box that fits, else the
        centred box of the clamped ratio; returns (top, left, height, width), each (B,) long."""
        tries, area = 10, h * w
        share = torch.empty(b, tries, device=device).uniform_(*self.scale, generator=generator)
        log_ratio = torch.empty(b, tries, device=device).uniform_(*map(math.log, self.ratio), generator=generator)
        aspect = log_ratio.exp()
        cw, ch = (share * area * aspect).sqrt().round().long(), (share * area / aspect).sqrt().round().long()
        fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = fits.int().argmax(1, keepdim=True)
        in_ratio = w / h  # the fallback: the whole image, cut to the ratio range, centred
        fw = w if in_ratio <= self.ratio[1] else round(h * self.ratio[1])
        fh = h if in_ratio >= self.ratio[0] else round(w / self.ratio[0])
        found = fits.any(1)
        height = torch.where(found, ch.gather(1, first)[:, 0], fh)
        width = torch.where(found, cw.gather(1, first)[:, 0], fw)
        top = torch.where(found, _uniform_int(h - height, generator), (h - height) // 2)
        left = torch.where(found, _uniform_int(w - width, generator), (w - width) // 2)
        return top, left, height, width

    def _resized_crop_and_flip(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A random resized crop (and flip) of every image, resampled to img_size x img_size in one
        ``grid_sample``: output pixel centres map linearly onto the crop box, read backwards for flips."""
        b, c, h, w = images.shape
        if images.device.type == "cpu":  # there, uint8 resize kernels beat grid_sample (and antialias, as torchvision)
            return self._resized_crop_each(images, generator)
        top, left, height, width = (v.float() for v in self.rrc_boxes(b, h, w, generator, images.device))
        sx, sy = width / w, height / h  # the box as an affine map of normalized [-1, 1] coordinates
        tx, ty = (2 * left + width) / w - 1, (2 * top + height) / h - 1
        if self.hflip:
            flip = torch.rand(b, generator=generator, device=images.device) < 0.5
            sx = torch.where(flip, -sx, sx)
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, [b, c, self.img_size, self.img_size], align_corners=False)
        mode = {"nearest-exact": "nearest"}.get(self.interpolation.value, self.interpolation.value)
        out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)  # uint8 as after torchvision's resize

    def _resized_crop_each(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The same boxes and flips as the batched path, each crop resized on its own (antialiased)."""
        b, c = images.shape[:2]
        boxes = [v.tolist() for v in self.rrc_boxes(b, *images.shape[-2:], generator, images.device)]
        flips = (torch.rand(b, generator=generator) < 0.5).tolist() if self.hflip else [False] * b
        out = torch.empty(b, c, self.img_size, self.img_size, dtype=images.dtype)
        for i, (top, left, height, width) in enumerate(zip(*boxes, strict=True)):
            crop = TF.resized_crop(images[i], top, left, height, width, [self.img_size] * 2, self.interpolation,
                                   antialias=True)
            out[i] = crop.flip(-1) if flips[i] else crop
        return out

    def _erase(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """timm's ``RandomErasing(re_prob, mode="pixel")`` drawn for the whole batch: with probability
        ``re_prob`` a sample gets one rectangle of N(0, 1) noise, of area 2%..1/3 of the image and aspect
        0.3..3.3 (log-uniform), the first of 10 tries that fits."""
        b, _, h, w = images.shape
        device, tries = images.device, 10
        area = torch.empty(b, tries, device=device).uniform_(0.02, 1 / 3, generator=generator) * (h * w)
        aspect = torch.empty(b, tries, device=device).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator)
        aspect = aspect.exp()
        heights, widths = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
        fits = (heights < h) & (widths < w)
        first = fits.int().argmax(1, keepdim=True)  # the first try that fits (timm stops there)
        eh, ew = heights.gather(1, first), widths.gather(1, first)  # (B, 1)
        erase = (torch.rand(b, 1, generator=generator, device=device) < self.re_prob) & fits.any(1, keepdim=True)
        top = _uniform_int(h - eh, generator)  # inclusive upper bounds, as random.randint
        left = _uniform_int(w - ew, generator)
        ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
        in_rows = (ys >= top) & (ys < top + eh) & erase  # (B, H)
        in_cols = (xs >= left) & (xs < left + ew)  # (B, W)
        box = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (B, 1, H, W)
        noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
        return torch.where(box, noise, images)


def _uniform_int(high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """An integer uniform in [0, high] for each entry of ``high`` (>= 0), like ``random.randint(0, high)``."""
    u = torch.rand(high.shape, generator=generator, device=high.device, dtype=torch.float64)
    return torch.minimum((u * (high + 1)).floor().long(), high)


class DeviceLoader:
    """Batches of (normalized images, labels) cut from tensors held on ``device``, in the order of
    ``sampler`` (None: in order). Duck-types the ``DataLoader`` the trainer consumes (``sampler``,
    ``batch_size``, ``len``, iteration). The augmentation of batch k of an epoch is seeded by (seed,
    sampler.epoch, sampler.start // batch_size + k), so iterating after ``sampler.set_epoch(e, start)``
    yields exactly the remaining batches of a full pass over epoch e."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        augment: GpuAugment,
        sampler: Sampler[int] | None = None,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)  # once, not per batch
        self.batch_size, self.augment, self.drop_last, self.seed = batch_size, augment, drop_last, seed
        self.sampler = sampler

    def __len__(self) -> int:
        remaining = len(self.sampler) if self.sampler is not None else len(self.labels)
        return remaining // self.batch_size if self.drop_last else math.ceil(remaining / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, epoch, first = self._epoch()
        generator = torch.Generator(self.device)
        for k, (images, labels) in enumerate(self._batches(order)):
            generator.manual_seed(self.batch_seed(epoch, first + k))
            yield self.augment(images, generator), labels

    def _epoch(self) -> tuple[torch.Tensor, int, int]:
        """This pass's order of the images, its epoch, and the number of its first batch in the epoch."""
        indices = range(len(self.labels)) if self.sampler is None else self.sampler
        order = torch.tensor(list(indices), dtype=torch.long, device=self.device)  # one copy per epoch
        return order, getattr(self.sampler, "epoch", 0), getattr(self.sampler, "start", 0) // self.batch_size

    def _batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The uint8 images and labels of each batch of ``order``, on the device."""
        for k in range(len(self)):
            index = order[k * self.batch_size : (k + 1) * self.batch_size]
            yield self.images[index], self.labels[index]

    def batch_seed(self, epoch: int, batch: int) -> int:
        """The seed of this loader's batch ``batch`` of ``epoch`` (:func:`batch_seed`, with the sampler's rank)."""
        return batch_seed(self.seed, epoch, batch, getattr(self.sampler, "rank", 0))


def batch_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """A well-mixed seed of (seed, epoch, batch, rank): neighbouring batches, epochs and the ranks of a
    distributed sampler draw independent augmentations."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, np.uint64)[0])


def _array_source(dataset: Dataset) -> tuple[ArrayDataset, list[int] | None] | None:
    """The in-memory data set under ``dataset`` and the indices (possibly nested) Subsets keep of it."""
    if isinstance(dataset, ArrayDataset):
        return dataset, None
    if isinstance(dataset, Subset):
        inner = _array_source(dataset.dataset)
        if inner is not None:
            base, indices = inner
            return base, [int(i) if indices is None else indices[i] for i in dataset.indices]
    return None


def in_memory_arrays(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The uint8 (N, C, H, W) images and long labels of an in-memory data set (or a Subset of one);
    None for data sets that read files (image folders)."""
    source = _array_source(dataset)
    if source is None:
        return None
    base, indices = source
    if indices is None:
        return base.images, base.labels
    index = torch.as_tensor(indices, dtype=torch.long)
    return base.images[index], base.labels[index]


def resolve_pipeline(
    pipeline: str,
    dataset: Dataset,
    device: str | torch.device,
    auto_augment: str | None = None,
    color_jitter: float = 0.0,
) -> str:
    """``data.pipeline`` -> ``"gpu"`` or ``"cpu"``. ``auto`` picks gpu on a CUDA device when the data set is
    in memory, needs only the augmentations :class:`GpuAugment` runs, and takes under a quarter of the free
    device memory (the rest is for the model, the activations and the val set). ``gpu`` is honoured on any
    device but is a one-line ConfigError when it cannot run as asked."""
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown data.pipeline '{pipeline}'; choose one of {', '.join(PIPELINES)}")
    if pipeline == "cpu":
        return "cpu"
    device = torch.device(device)
    source = _array_source(dataset)
    unsupported = _unsupported(auto_augment, color_jitter)
    if pipeline == "gpu":
        if source is None:
            raise ConfigError(f"data.pipeline=gpu needs an in-memory data set ({IN_MEMORY}); "
                              f"{type(dataset).__name__} reads files: use data.pipeline=cpu, or data.cache=true "
                              f"(decoded once, augmented in batches)")
        if unsupported:
            what, fix = (" or ".join(part) for part in zip(*unsupported, strict=True))
            raise ConfigError(f"data.pipeline=gpu does not run {what}; set {fix}, or use data.pipeline=cpu")
        return "gpu"
    if device.type != "cuda" or source is None or unsupported:
        return "cpu"
    base, indices = source
    size = len(base) if indices is None else len(indices)
    nbytes = size * base.images[0].numel() * base.images.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return "gpu" if nbytes < free / 4 else "cpu"


def check_batched(cfg: DataConfig, what: str) -> None:
    """A one-line ConfigError when ``cfg`` asks for an augmentation that batched augmentation (``what``) does
    not run."""
    unsupported = _unsupported(cfg.auto_augment, cfg.color_jitter)
    if unsupported:
        runs, fix = (" or ".join(part) for part in zip(*unsupported, strict=True))
        raise ConfigError(f"{what} augments whole batches and does not run {runs}; set {fix}, or {what.split('=')[0]}"
                          f"={'false' if what.endswith('true') else 'cpu'}")


def _unsupported(auto_augment: str | None, color_jitter: float) -> list[tuple[str, str]]:
    """The augmentations asked for that the batched path does not run, each as (what, the setting that
    turns it off)."""
    asked = []
    if auto_augment:
        asked.append((f"RandAugment (data.auto_augment={auto_augment})", "data.auto_augment=null"))
    if color_jitter > 0:
        asked.append((f"colour jitter (data.color_jitter={color_jitter})", "data.color_jitter=0"))
    return asked


def batch_augments(cfg: DataConfig, img_size: int) -> tuple[GpuAugment, GpuAugment]:
    """The train and eval :class:`GpuAugment` that ``cfg`` asks for, for every batched path (in-memory data,
    the image cache, device decoding)."""
    train = GpuAugment(img_size, cfg.mean, cfg.std, True, cfg.crop_padding, cfg.hflip, cfg.interpolation,
                       cfg.re_prob, cfg.train_crop, cfg.scale, cfg.ratio)
    return train, GpuAugment(img_size, cfg.mean, cfg.std, False, interpolation=cfg.interpolation,
                             crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)


def gpu_loaders(splits: DataSplits, cfg: DataConfig, img_size: int, device: str | torch.device, seed: int = 0,
                train_sampler: Sampler[int] | None = None,
                val_sampler: Sampler[int] | None = None) -> tuple[DeviceLoader, DeviceLoader]:
    """Train and val :class:`DeviceLoader` of in-memory splits: the train one shuffled by ``train_sampler``
    (default an :class:`~vitrain.data.EpochSampler` of ``seed``) and augmented as ``cfg`` says (dropping a
    short last batch under mixup), the val one in order (or ``val_sampler``) with the eval transform."""
    cfg = cfg.with_preprocess()  # auto normalization keys as build_datasets takes them
    train_images, train_labels = _arrays(splits.train, "train")
    train_augment, _ = batch_augments(cfg, img_size)
    if train_sampler is None:
        train_sampler = EpochSampler(len(train_labels), seed)
    train = DeviceLoader(train_images, train_labels, cfg.batch_size, train_augment, train_sampler, cfg.mixes, device,
                         seed)
    return train, gpu_eval_loader(splits.val, cfg, img_size, device, val_sampler)


def gpu_eval_loader(dataset: Dataset, cfg: DataConfig, img_size: int, device: str | torch.device,
                    sampler: Sampler[int] | None = None) -> DeviceLoader:
    """An in-memory evaluation set (validation or test) on the device, in order (or ``sampler``'s), with the
    eval transform (``data.crop_mode``'s resize and crop to img_size, normalize)."""
    _, augment = batch_augments(cfg, img_size)
    return DeviceLoader(*_arrays(dataset, "val"), cfg.batch_size, augment, sampler, False, device)


def _arrays(dataset: Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = in_memory_arrays(dataset)
    if arrays is None:
        raise ConfigError(f"data.pipeline=gpu needs an in-memory data set ({IN_MEMORY}); the {split} split "
                          f"reads files: use data.pipeline=cpu")
    return arrays
