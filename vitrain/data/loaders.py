"""Data sets and loaders, configured by :class:`~vitrain.data.config.DataConfig` (the ``data`` group).

:func:`build_datasets` turns the config into transformed train/val sets; :func:`build_loaders` into the
loaders of ``data.pipeline`` (per-image transforms in worker processes, :func:`cpu_loaders`, or batches
augmented on the device, :func:`vitrain.data.gpu.gpu_loaders`); :func:`build_mixup` into timm's batch
mixup/cutmix."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset, Subset

from vitrain.data.config import DATASETS, DataConfig
from vitrain.data.datasets import DataSplits, keep_classes, labels_of, load_cifar, load_digits, load_imagefolder
from vitrain.data.gpu import gpu_eval_loader, gpu_loaders, resolve_pipeline
from vitrain.data.samplers import EpochSampler, ShardedEpochSampler, ShardSampler, build_samplers, eval_sampler
from vitrain.data.shard_index import Index
from vitrain.data.shards import ShardLoader, ShardStream, open_shards
from vitrain.data.sources import count_skipped, load_filelist, load_hf
from vitrain.data.transforms import build_transforms
from vitrain.distributed import World
from vitrain.errors import ConfigError, DataError
from vitrain.runtime import loader_workers

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "DataConfig", "DataSplits", "EpochSampler", "ShardSampler", "ShardedEpochSampler",
           "build_datasets", "build_loaders", "build_mixup", "build_samplers", "cpu_eval_loader", "cpu_loaders",
           "gpu_eval_loader", "gpu_loaders"]



def build_datasets(cfg: DataConfig, img_size: int) -> DataSplits:
    """The train/val(/test) sets of ``cfg`` at ``img_size``: load the data set, keep only ``cfg.classes``
    (relabelled 0..k-1 in the given order); with ``cfg.val_fraction``, hold out a stratified share of the
    training images as the validation set (the data set's eval split becomes the test set); keep a
    stratified ``cfg.train_fraction`` of the rest (both seeded by ``cfg.split_seed``); attach the train
    transform (with the augmentations asked for) and the eval transform. Normalization and resize keys left at
    null (auto) take the data set's own values here: a run with pretrained weights resolves them first
    (:func:`vitrain.build.resolve_preprocess`)."""
    cfg = cfg.with_preprocess()
    if cfg.name == "webdataset":
        return _shard_splits(cfg, img_size)
    train, val, names = _load(cfg)
    if val is None and cfg.val_fraction == 0:
        raise ConfigError(f"data={cfg.name} has no validation split here; set data.val_fraction=0.1 to hold out "
                          f"10% of the training images")
    if cfg.classes is not None:
        chosen = _check_classes(cfg.classes, cfg.name, len(names))
        for split, dataset in (("train", train), ("val", val)):
            if dataset is not None and len(keep_classes(dataset, chosen)) == 0:
                raise DataError(f"{cfg.name} has no {split} images of data.classes={chosen}; pick classes it has")
        names = [names[c] for c in chosen]
    augment, evaluate = _transforms(cfg, img_size)
    test = None
    if cfg.val_fraction > 0:  # the eval split becomes the test set; validation comes out of the training images
        test, base = val, train
        held = _stratified_indices(torch.from_numpy(labels_of(base)), cfg.val_fraction, cfg.split_seed)
        rest = sorted(set(range(len(base))) - set(held))
        val, train = Subset(copy.copy(base), held), Subset(base, rest)  # a copy: its own (eval) transform
        val.dataset.transform = evaluate
        if test is not None:
            test.transform = evaluate
    else:
        val.transform = evaluate
    if cfg.train_fraction < 1:
        kept = _stratified_indices(torch.from_numpy(labels_of(train)), cfg.train_fraction, cfg.split_seed)
        train = Subset(train.dataset, [train.indices[i] for i in kept]) if isinstance(train, Subset) \
            else Subset(train, kept)
    train_set = train.dataset if isinstance(train, Subset) else train
    train_set.transform = augment
    return DataSplits(train, val, names, test)


def _transforms(cfg: DataConfig, img_size: int) -> tuple[Any, Any]:
    """The per-image train transform (with the augmentations asked for) and eval transform of ``cfg``."""
    train = build_transforms(img_size, cfg.mean, cfg.std, True, cfg.crop_padding, cfg.hflip, cfg.interpolation,
                             auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter, re_prob=cfg.re_prob,
                             train_crop=cfg.train_crop, scale=cfg.scale, ratio=cfg.ratio)
    return train, build_transforms(img_size, cfg.mean, cfg.std, False, interpolation=cfg.interpolation,
                                   crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode)


def _load(cfg: DataConfig) -> tuple[Dataset, Dataset | None, list[str]]:
    """(train, val or None, class names) of a map-style data set."""
    if cfg.name == "digits":
        return load_digits(cfg.test_fraction, cfg.split_seed)
    if cfg.name in ("cifar10", "cifar100"):
        return load_cifar(cfg.name, _need_root(cfg.name, cfg.root), cfg.download)
    reading = dict(skip_corrupt=cfg.skip_corrupt, max_pixels=cfg.max_image_pixels)
    if cfg.name == "filelist":
        return load_filelist(cfg.train_list, cfg.val_list, **reading)
    if cfg.name == "hf":
        return load_hf(cfg.path, cfg.train_split, cfg.val_split, cfg.image_column, cfg.label_column, **reading)
    return load_imagefolder(_need_root(cfg.name, cfg.root), **reading)


def _shard_splits(cfg: DataConfig, img_size: int) -> DataSplits:
    """WebDataset shards: a stream per split, with the train and eval transforms."""
    unsupported = {"data.classes": cfg.classes is not None, "data.train_fraction": cfg.train_fraction < 1,
                   "data.val_fraction": cfg.val_fraction > 0, "data.aug_repeats": cfg.aug_repeats > 1,
                   "data.pipeline=gpu": cfg.pipeline == "gpu"}
    if any(unsupported.values()):
        key = next(k for k, v in unsupported.items() if v)
        raise ConfigError(f"{key} needs a data set held in memory or in files, not webdataset shards; leave it at "
                          f"its default (write shards of the subset you want)")
    if not cfg.val_shards:
        raise ConfigError("data=webdataset needs validation shards: set data.val_shards=...")
    index = Index(cfg.manifest, dict(cfg.storage_options), cfg.retry_seconds)
    train = open_shards(cfg.shards, True, cfg.shuffle_buffer, cfg.skip_corrupt, cfg.epoch_size, cfg.max_image_pixels,
                        index)
    val = open_shards(cfg.val_shards, False, 0, cfg.skip_corrupt, max_pixels=cfg.max_image_pixels, index=index)
    if val.classes != train.classes:
        raise DataError(f"the train and val shards list different classes ({train.classes[:5]}... vs "
                        f"{val.classes[:5]}...); give both the same classes.txt")
    train.transform, val.transform = _transforms(cfg, img_size)
    return DataSplits(train, val, list(train.classes))


def _stratified_indices(labels: torch.Tensor, fraction: float, seed: int) -> list[int]:
    """Positions of the same ``fraction`` of every class (at least one image each), chosen by a seeded
    permutation, in increasing order."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        keep.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(keep).sort().values.tolist()


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
    repeats: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled train loader (an :class:`EpochSampler`; ``drop_last`` drops a short last batch) and an
    ordered val loader, or this rank's shares of them (:func:`build_samplers`). Each has its own
    generator, so making an iterator leaves the global RNG alone; the workers' augmentation seeds
    differ between ranks. ``repeats``: repeated augmentation (:class:`EpochSampler`)."""
    common = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                  persistent_workers=num_workers > 0, **loader_workers(num_workers))
    train_sampler, _ = build_samplers(splits, batch_size, seed, drop_last, rank, world_size, repeats)
    train = DataLoader(splits.train, sampler=train_sampler, generator=torch.Generator().manual_seed(seed + rank),
                       drop_last=drop_last, **common)
    train = count_skipped(train)  # data.skip_corrupt: the unreadable files replaced, for the epoch's row
    return train, cpu_eval_loader(splits.val, batch_size, num_workers, pin_memory, rank, world_size, seed)


def cpu_eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                    rank: int = 0, world_size: int = 1, seed: int = 0) -> DataLoader:
    """An evaluation set (validation or test) in order, or this rank's share of it under torchrun. It has its
    own generator: without one, every pass would draw its workers' base seed from the global RNG, and shift
    the random draws of training (drop path, augmentation) that follow."""
    if isinstance(dataset, ShardStream):
        return ShardLoader(dataset, batch_size, num_workers, seed, rank, world_size, pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=batch_size, sampler=eval_sampler(len(dataset), rank, world_size),
                      shuffle=False, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed), **loader_workers(num_workers))


def build_loaders(splits: DataSplits, cfg: DataConfig, img_size: int, device: torch.device, seed: int,
                  world: World | None = None) -> tuple[Any, Any, Any]:
    """Train/val/test loaders of ``data.pipeline`` (test: None without a test split): batched augmentation on
    the device for in-memory data (gpu), or per-image transforms in loader workers (cpu). Under torchrun,
    this rank's shares of the batches (``data.batch_size`` images per rank and step). With mixup, a short
    last batch is dropped (mixup pairs the images of a batch)."""
    cfg, world = cfg.with_preprocess(), world or World()  # auto keys as build_datasets takes them
    pin = device.type == "cuda"
    if isinstance(splits.train, ShardStream):
        log.info("data pipeline: webdataset shards, %d loader workers", cfg.workers)
        train = ShardLoader(splits.train, cfg.batch_size, cfg.workers, seed, world.rank, world.size, cfg.mixes, pin)
        return train, cpu_eval_loader(splits.val, cfg.batch_size, cfg.workers, pin, world.rank, world.size, seed), None
    if cfg.cache or cfg.decode == "device":
        from vitrain.data.cache import cached_loaders
        from vitrain.data.decode import decoding_loaders

        build = cached_loaders if cfg.cache else decoding_loaders
        log.info("data pipeline: %s", "decode-once image cache" if cfg.cache else "JPEG decoding on the device")
        return build(splits, cfg, img_size, device, seed, world)
    pipeline = resolve_pipeline(cfg.pipeline, splits.train, device, cfg.auto_augment, cfg.color_jitter)
    log.info("data pipeline: %s", pipeline)
    test_sampler = None if splits.test is None else eval_sampler(len(splits.test), world.rank, world.size)
    if pipeline == "gpu":
        samplers = build_samplers(splits, cfg.batch_size, seed, cfg.mixes, world.rank, world.size, cfg.aug_repeats)
        train, val = gpu_loaders(splits, cfg, img_size, device, seed, *samplers)
        test = None if splits.test is None else gpu_eval_loader(splits.test, cfg, img_size, device, test_sampler)
        return train, val, test
    train, val = cpu_loaders(splits, cfg.batch_size, cfg.workers, seed=seed, pin_memory=pin, drop_last=cfg.mixes,
                             rank=world.rank, world_size=world.size, repeats=cfg.aug_repeats)
    test = None if splits.test is None else cpu_eval_loader(splits.test, cfg.batch_size, cfg.workers, pin,
                                                            world.rank, world.size, seed)
    return train, val, test


def build_mixup(cfg: DataConfig, num_classes: int, label_smoothing: float = 0.0) -> Mixup | None:
    """timm's batch mixup/cutmix (soft targets, ``label_smoothing`` folded in), or None when both are off."""
    if not cfg.mixes:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, label_smoothing=label_smoothing, num_classes=num_classes)
