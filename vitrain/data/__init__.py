"""Data sets and loaders. ``build_datasets`` turns a data set name (and an optional class subset) into
transformed train/val sets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from vitrain.data.datasets import keep_classes, load_cifar, load_digits, load_imagefolder
from vitrain.data.transforms import build_transforms
from vitrain.errors import ConfigError, DataError

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_datasets(
    name: str,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    root: str | Path | None = None,
    download: bool = True,
    crop_padding: int = 4,
    hflip: bool = True,
    interpolation: str = "bilinear",
    test_fraction: float = 0.2,
    split_seed: int = 0,
    *,
    auto_augment: str | None = None,
    color_jitter: float = 0.0,
    re_prob: float = 0.0,
    classes: Sequence[int] | None = None,
    train_fraction: float = 1.0,
) -> DataSplits:
    """Load a data set by name, optionally keep only ``classes`` (relabelled 0..k-1 in the given order)
    and a stratified ``train_fraction`` of the training images (seeded by ``split_seed``), and attach
    the train transform (with the DeiT augmentations asked for) and the eval transform."""
    if name == "digits":
        train, val, names = load_digits(test_fraction, split_seed)
    elif name in ("cifar10", "cifar100"):
        train, val, names = load_cifar(name, _need_root(name, root), download)
    elif name == "imagefolder":
        train, val, names = load_imagefolder(_need_root(name, root))
    else:
        raise ConfigError(f"unknown data set '{name}' (data.name); choose one of {', '.join(DATASETS)}")
    if classes is not None:
        chosen = _check_classes(classes, name, len(names))
        for split, dataset in (("train", train), ("val", val)):
            if len(keep_classes(dataset, chosen)) == 0:
                raise DataError(f"{name} has no {split} images of data.classes={chosen}; pick classes it has")
        names = [names[c] for c in chosen]
    if not 0 < train_fraction <= 1:
        raise ConfigError(f"data.train_fraction must be in (0, 1], got {train_fraction}")
    if train_fraction < 1:
        train = _stratified_subset(train, train_fraction, split_seed)
    train_set = train.dataset if isinstance(train, Subset) else train
    train_set.transform = build_transforms(
        img_size, mean, std, True, crop_padding, hflip, interpolation,
        auto_augment=auto_augment, color_jitter=color_jitter, re_prob=re_prob,
    )
    val.transform = build_transforms(img_size, mean, std, False, interpolation=interpolation)
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


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), and can start part-way through an epoch:
    a resumed run sees the same remaining batches, in the same order, as a run that never stopped."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Order of ``epoch``, skipping its first ``start`` indices."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        """The whole shuffled order of the current epoch."""
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return self.size - self.start


class ShardedEpochSampler(EpochSampler):
    """The :class:`EpochSampler` order of the whole data set, dealt out to ``world_size`` ranks: rank r
    takes positions r, r + W, r + 2W, ... of it. Step k's batches of all ranks (``batch_size`` each)
    then hold positions [kB, (k+1)B) of the order, B = batch_size x W: the batches that one process
    with a batch of B sees in the same steps. ``start`` counts this rank's indices, as the trainer
    counts batches per rank.

    Every rank gets the same number of batches (each step is one DDP all-reduce): with ``drop_last``
    the order is cut to whole global batches (as one process drops its short batch); otherwise only a
    last step of fewer images than ranks is left out, those images waiting for the next epoch's shuffle.
    """

    def __init__(self, size: int, seed: int, rank: int, world_size: int, batch_size: int,
                 drop_last: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
        super().__init__(size, seed)
        self.rank, self.world_size = rank, world_size
        tail = size % (batch_size * world_size)  # images of the last, short, step
        self.used = size - tail if drop_last or tail < world_size else size

    def __iter__(self) -> Iterator[int]:
        mine = self.order()[: self.used][self.rank :: self.world_size]
        return iter(mine[self.start :].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.used, self.world_size)) - self.start


class ShardSampler(Sampler[int]):
    """Rank r's share of an ordered data set, indices r, r + W, r + 2W, ...: every image on exactly one
    rank and none repeated, so counts summed over the ranks are those of the whole set (evaluation)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_samplers(splits: DataSplits, batch_size: int, seed: int = 0, drop_last: bool = False, rank: int = 0,
                   world_size: int = 1) -> tuple[EpochSampler, Sampler[int] | None]:
    """Train and val samplers: the shuffled :class:`EpochSampler` and None (in order) in one process; under
    torchrun, this rank's shares of the same orders (``batch_size`` is per rank)."""
    if batch_size <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
    if world_size == 1:
        return EpochSampler(len(splits.train), seed), None
    return (ShardedEpochSampler(len(splits.train), seed, rank, world_size, batch_size, drop_last),
            ShardSampler(len(splits.val), rank, world_size))


def build_loaders(
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
