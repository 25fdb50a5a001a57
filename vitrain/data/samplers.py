"""Samplers that make the order of training batches depend only on (seed, epoch), so that a resumed run
sees the batches a run that never stopped sees, and that deal one order out to the ranks of a torchrun
job."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from vitrain.data.datasets import DataSplits
from vitrain.errors import ConfigError

REPEAT_ROUND = 256  # DeiT's RASampler (and timm's RepeatAugSampler) cut a repeated epoch to multiples of 256


def repeated_epoch_length(size: int, world_size: int = 1) -> int:
    """Positions in an epoch of repeated augmentation, over all ranks: world_size x floor(size // 256 * 256 /
    world_size), DeiT's ``num_selected_samples`` per rank (facebookresearch/deit samplers.py, timm's
    RepeatAugSampler). A set smaller than 256 keeps its size (timm: ceil(size / world_size) per rank)."""
    if size < REPEAT_ROUND:
        return size
    return size // REPEAT_ROUND * REPEAT_ROUND // world_size * world_size


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), and can start part-way through an epoch:
    a resumed run sees the same remaining batches, in the same order, as a run that never stopped.

    With ``repeats`` = k > 1 (repeated augmentation, DeiT's RASampler and timm's ``--aug-repeats``) the
    order is a shuffle of the images with each one repeated k times in a row, cut to
    :func:`repeated_epoch_length` positions as DeiT cuts it: an epoch shows about size / k images k times each,
    with their own augmentations. Dealt out to ranks (:class:`ShardedEpochSampler`), the k copies of an image
    go to k different ranks, as in DeiT. Unlike DeiT and timm, one process repeats too (DeiT's main.py falls
    back to a RandomSampler, timm refuses): its batches are the global batches that ``world_size`` ranks see."""

    def __init__(self, size: int, seed: int = 0, repeats: int = 1, world_size: int = 1) -> None:
        if repeats < 1:
            raise ConfigError(f"data.aug_repeats must be at least 1, got {repeats}")
        self.size, self.seed, self.repeats, self.epoch, self.start = size, seed, repeats, 0, 0
        self.length = size if repeats == 1 else repeated_epoch_length(size, world_size)  # positions per epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Order of ``epoch``, skipping its first ``start`` indices."""
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        """The whole shuffled order of the current epoch."""
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return order if self.repeats == 1 else order.repeat_interleave(self.repeats)[: self.length]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :].tolist())

    def __len__(self) -> int:
        return self.length - self.start


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
                 drop_last: bool = False, repeats: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
        super().__init__(size, seed, repeats, world_size)
        self.rank, self.world_size = rank, world_size
        tail = self.length % (batch_size * world_size)  # images of the last, short, step
        self.used = self.length - tail if drop_last or tail < world_size else self.length

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
                   world_size: int = 1, repeats: int = 1) -> tuple[EpochSampler, Sampler[int] | None]:
    """Train and val samplers: the shuffled :class:`EpochSampler` and None (in order) in one process; under
    torchrun, this rank's shares of the same orders (``batch_size`` is per rank)."""
    if batch_size <= 0:
        raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
    if world_size == 1:
        return EpochSampler(len(splits.train), seed, repeats), None
    return (ShardedEpochSampler(len(splits.train), seed, rank, world_size, batch_size, drop_last, repeats),
            eval_sampler(len(splits.val), rank, world_size))


def eval_sampler(size: int, rank: int = 0, world_size: int = 1) -> Sampler[int] | None:
    """An evaluation set in order (None) in one process; this rank's share of it under torchrun."""
    return None if world_size == 1 else ShardSampler(size, rank, world_size)
