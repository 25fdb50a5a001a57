"""Data sets and loaders, configured by :class:`~vitrain.data.config.DataConfig` (the ``data`` group).

:func:`build_datasets` turns the config into transformed train/val sets; :func:`build_loaders` into the
loaders of ``data.pipeline`` (per-image transforms in worker processes, :func:`cpu_loaders`, or batches
augmented on the device, :func:`vitrain.data.gpu.gpu_loaders`); :func:`build_mixup` into timm's batch
mixup/cutmix."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset, Subset

from vitrain.data.config import DATASETS, DataConfig
from vitrain.data.datasets import DataSplits, keep_classes, load_cifar, load_digits, load_imagefolder
from vitrain.data.gpu import gpu_loaders, resolve_pipeline
from vitrain.data.samplers import EpochSampler, ShardedEpochSampler, ShardSampler, build_samplers
from vitrain.data.transforms import build_transforms
from vitrain.distributed import World
from vitrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "DataConfig", "DataSplits", "EpochSampler", "ShardSampler", "ShardedEpochSampler",
           "build_datasets", "build_loaders", "build_mixup", "build_samplers", "cpu_loaders", "gpu_loaders"]



def build_datasets(cfg: DataConfig, img_size: int) -> DataSplits:
    """The train/val sets of ``cfg`` at ``img_size``: load the data set, keep only ``cfg.classes``
    (relabelled 0..k-1 in the given order) and a stratified ``cfg.train_fraction`` of the training images
    (seeded by ``cfg.split_seed``), and attach the train transform (with the augmentations asked for) and
    the eval transform."""
    if cfg.name == "digits":
        train, val, names = load_digits(cfg.test_fraction, cfg.split_seed)
    elif cfg.name in ("cifar10", "cifar100"):
        train, val, names = load_cifar(cfg.name, _need_root(cfg.name, cfg.root), cfg.download)
    else:
        train, val, names = load_imagefolder(_need_root(cfg.name, cfg.root))
    if cfg.classes is not None:
        chosen = _check_classes(cfg.classes, cfg.name, len(names))
        for split, dataset in (("train", train), ("val", val)):
            if len(keep_classes(dataset, chosen)) == 0:
                raise DataError(f"{cfg.name} has no {split} images of data.classes={chosen}; pick classes it has")
        names = [names[c] for c in chosen]
    if cfg.train_fraction < 1:
        train = _stratified_subset(train, cfg.train_fraction, cfg.split_seed)
    train_set = train.dataset if isinstance(train, Subset) else train
    train_set.transform = build_transforms(
        img_size, cfg.mean, cfg.std, True, cfg.crop_padding, cfg.hflip, cfg.interpolation,
        auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter, re_prob=cfg.re_prob,
    )
    val.transform = build_transforms(img_size, cfg.mean, cfg.std, False, interpolation=cfg.interpolation)
    return DataSplits(train, val, names)


def _stratified_subset(dataset: Dataset, fraction: float, seed: int) -> Subset:
    """The same ``fraction`` of every class (at least one image each), chosen by a seeded permutation."""
    labels = torch.as_tensor(dataset.labels if hasattr(dataset, "labels") else dataset.targets)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        keep.append(members[: max(1, round(fraction * len(members)))])
    return Subset(dataset, torch.cat(keep).sort().values.tolist())


def _check_classes(classes: Sequence[int], name: str, num_classes: int) -> list[int]:
    """``data.classes`` as a list of distinct class indices of the data set, or a one-line ConfigError."""
    valid = f"0..{num_classes - 1} for {name}"
    listed = isinstance(classes, Sequence) and not isinstance(classes, str)
    if not listed or not all(isinstance(c, Integral) and not isinstance(c, bool) for c in classes):
        raise ConfigError(f"data.classes={classes} is not a list of class indices; give e.g. [0, 1] ({valid})")
    chosen = [int(c) for c in classes]
    if not chosen:
        raise ConfigError(f"data.classes is empty; list the class indices to keep ({valid}) or set it to null")
    outside = [c for c in chosen if not 0 <= c < num_classes]
    if outside:
        raise ConfigError(f"data.classes has {outside}, outside the valid range {valid}; use indices in that range")
    if len(set(chosen)) < len(chosen):
        raise ConfigError(f"data.classes={chosen} repeats a class; list each class index once")
    return chosen


def _need_root(name: str, root: str | Path | None) -> str | Path:
    if not root:
        raise DataError(f"data={name} needs a folder: set data.root=DIR")
    return root


def cpu_loaders(
    splits: DataSplits,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled train loader (an :class:`EpochSampler`; ``drop_last`` drops a short last batch) and an
    ordered val loader, or this rank's shares of them (:func:`build_samplers`). Each has its own
    generator, so making an iterator leaves the global RNG alone; the workers' augmentation seeds
    differ between ranks."""
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0)
    train_sampler, val_sampler = build_samplers(splits, batch_size, seed, drop_last, rank, world_size)
    train = DataLoader(splits.train, sampler=train_sampler, generator=torch.Generator().manual_seed(seed + rank),
                       drop_last=drop_last, **common)
    val = DataLoader(splits.val, sampler=val_sampler, shuffle=False, generator=torch.Generator().manual_seed(seed),
                     **common)
    return train, val


def build_loaders(splits: DataSplits, cfg: DataConfig, img_size: int, device: torch.device, seed: int,
                  world: World | None = None) -> tuple[Any, Any]:
    """Train/val loaders of ``data.pipeline``: batched augmentation on the device for in-memory data (gpu),
    or per-image transforms in loader workers (cpu). Under torchrun, this rank's shares of the batches
    (``data.batch_size`` images per rank and step). With mixup, a short last batch is dropped (mixup
    pairs the images of a batch)."""
    world = world or World()
    pipeline = resolve_pipeline(cfg.pipeline, splits.train, device, cfg.auto_augment, cfg.color_jitter)
    log.info("data pipeline: %s", pipeline)
    train_sampler, val_sampler = build_samplers(splits, cfg.batch_size, seed, cfg.mixes, world.rank, world.size)
    if pipeline == "gpu":
        return gpu_loaders(splits, img_size, cfg.mean, cfg.std, cfg.batch_size, device, seed=seed,
                           crop_padding=cfg.crop_padding, hflip=cfg.hflip, interpolation=cfg.interpolation,
                           re_prob=cfg.re_prob, drop_last=cfg.mixes, train_sampler=train_sampler,
                           val_sampler=val_sampler)
    return cpu_loaders(splits, cfg.batch_size, cfg.num_workers, seed=seed, pin_memory=device.type == "cuda",
                       drop_last=cfg.mixes, rank=world.rank, world_size=world.size)


def build_mixup(cfg: DataConfig, num_classes: int, label_smoothing: float = 0.0) -> Mixup | None:
    """timm's batch mixup/cutmix (soft targets, ``label_smoothing`` folded in), or None when both are off."""
    if not cfg.mixes:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, label_smoothing=label_smoothing, num_classes=num_classes)
