"""``data=webdataset``: tar shards of ``<key>.jpg|png|webp`` + ``<key>.cls`` (and an optional ``.json``),
read with the ``webdataset`` package from local paths, brace patterns, URLs or ``pipe:`` commands.

How an epoch is dealt out, so that every sample is seen once over all processes:

1. The shards are put in an order that depends only on (seed, epoch) and read as one sequence of N samples
   (the counts per shard come from the ``manifest.json`` that ``scripts/make_shards.py`` writes, or from
   counting local shards once: :mod:`vitrain.data.shard_index`).
2. Rank r of W takes samples [r n, (r + 1) n) of that sequence, n = N // W: every rank the same number of
   steps (each step is one DDP all-reduce); the N % W samples left over (fewer than W) wait for the next
   epoch's order. Under mixup a rank's last short batch is dropped, as for the other data sets.
3. A rank's shards are dealt out whole to its loader workers, in contiguous runs of about as many samples
   each (:meth:`ShardStream.worker_pieces`): no shard is split between two workers, so each is fetched once per
   epoch by a rank (only a shard on the boundary between two ranks is read by both, each its part). Each
   worker shuffles its samples in a buffer (``data.shuffle_buffer``, seeded by seed, epoch, rank and worker),
   decodes, augments and batches them; its last, short batch is held back by :class:`ShardLoader`, which joins
   the workers' short batches at the end of the epoch into whole ones (:func:`resume_plan` spells the order).

Resume is exact at epoch boundaries. Inside an epoch it is exact when the run resumes with the same number
of processes and ``data.num_workers`` (each worker skips the samples it had delivered and the augmentation
of every batch is seeded by its position; in the joined tail of short batches, the rest of a batch cut by the
resume is augmented with other draws); with other numbers the order of the rest of the epoch differs.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vitrain.data.remote import NetworkError, cause, open_shard
from vitrain.data.shard_index import Index, expand_shards, shard_classes, shard_counts, tar_reason
from vitrain.data.sources import MAX_IMAGE_PIXELS, pixel_limit, too_many_pixels, upright
from vitrain.errors import DataError, first_line
from vitrain.runtime import loader_workers

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEYS = ("cls", "json")  # a .json holds {"label": index, ...}


class ShardStream(IterableDataset):
    """The samples of a list of shards, read as described in the module's docstring. ``transform`` is set by
    the caller, as for the map-style data sets; the loader (:class:`ShardLoader`) sets the epoch, the rank's
    share, the batch size and the resume position before each pass."""

    def __init__(self, urls: list[str], counts: list[int], classes: list[str], train: bool,
                 shuffle_buffer: int = 1000, skip_corrupt: bool = False, index: Index | None = None) -> None:
        self.urls, self.counts, self.classes, self.train = urls, counts, classes, train
        self.index = index or Index()  # how the shards (and their manifest) are read: storage options, retries
        self.shuffle_buffer, self.skip_corrupt, self.transform = shuffle_buffer, skip_corrupt, None
        self.seed, self.epoch, self.rank, self.world_size, self.batch_size = 0, 0, 0, 1, 1
        self.max_pixels: int | None = MAX_IMAGE_PIXELS  # data.max_image_pixels: larger images are refused
        self.drop_last, self.start_batch, self.num_workers = False, 0, 1

    def __len__(self) -> int:
        return sum(self.counts)

    def batches(self) -> int:
        """Batches of this rank in a whole epoch."""
        n = self._rank_share()[1]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def pieces(self) -> list[tuple[int, int, int]]:
        """This rank's samples of the epoch as (shard, first, count) pieces, in the epoch's shard order: whole
        shards, but for the first and last, which a neighbouring rank may share."""
        first, n = self._rank_share()[0], self._rank_size()
        out = []
        for i in self._order():
            if n <= 0:
                break
            if first >= self.counts[i]:
                first -= self.counts[i]
                continue
            take = min(n, self.counts[i] - first)
            out.append((i, first, take))
            first, n = 0, n - take
        return out

    def worker_pieces(self) -> list[list[tuple[int, int, int]]]:
        """The pieces each loader worker (by role) reads: contiguous runs of whole pieces, about as many samples
        each, so that no shard is split between two workers of a rank (each is fetched once)."""
        pieces, k = self.pieces(), max(1, self.num_workers)
        total, runs, done = sum(p[2] for p in pieces), [[] for _ in range(k)], 0
        for piece in pieces:
            runs[min(k - 1, done * k // max(1, total))].append(piece)
            done += piece[2]
        return runs

    def worker_outputs(self) -> list[tuple[int, int]]:
        """(full batches, samples of the last partial batch) that each worker role yields."""
        return [divmod(sum(p[2] for p in run), self.batch_size) for run in self.worker_pieces()]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int, bool]]:
        """(images, labels, samples skipped, worker role, partial) for each batch of this worker's samples."""
        info = get_worker_info()
        k = max(1, self.num_workers)
        plan = resume_plan(self.worker_outputs(), self.start_batch, self.batch_size)
        # a resumed pass asks worker 0 first: it takes the role whose turn came next in the interrupted pass
        role = ((0 if info is None else info.id) + plan.next_role) % k
        run, (full, partial), skip = self.worker_pieces()[role], self.worker_outputs()[role], plan.skip[role]
        n = full * self.batch_size + partial
        samples = (sample for i, first, take in run for sample in self._read_shard(self.urls[i], first, take))
        if self.train and self.shuffle_buffer > 0:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, self._seed(role, -1))
        rng, batch, last, pending, skipped = _BatchRng(info is None), [], None, 0, 0
        for position, raw in enumerate(_exactly(samples, n, self)):
            if position < skip:
                continue  # delivered before the resume: read (the buffer needs it) but not decoded
            if len(batch) + pending == 0:
                rng.begin(self._seed(role, position // self.batch_size))
            item = self._decode(raw)  # None: unreadable, skipped (data.skip_corrupt); a good one takes its place
            if item is None:
                pending, skipped = pending + 1, skipped + 1
            else:
                batch, last, pending = batch + [item] * (pending + 1), item, 0
            if (position + 1) % self.batch_size == 0 or position == n - 1:
                if last is None:
                    raise DataError(f"no sample of this worker's first batch could be read ({raw.get('__url__')})")
                batch += [last] * pending
                images, labels = zip(*batch, strict=True)
                rng.end()
                yield torch.stack(images), torch.tensor(labels), skipped, role, position >= full * self.batch_size
                batch, pending, skipped = [], 0, 0

    def _rank_share(self) -> tuple[int, int]:
        """(first, count) of this rank's samples in the epoch's sequence: n = N // W each for training (every
        rank the same steps), all of them over the ranks for evaluation."""
        if not self.train:
            return _share(len(self), self.rank, self.world_size)
        n = len(self) // self.world_size
        return self.rank * n, n

    def _rank_size(self) -> int:
        n = self._rank_share()[1]
        return n // self.batch_size * self.batch_size if self.drop_last else n

    def _order(self) -> list[int]:
        """The shards' order this epoch: shuffled by (seed, epoch) for training, as listed for evaluation."""
        if not self.train:
            return list(range(len(self.urls)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.urls), generator=g).tolist()

    def _read_shard(self, url: str, first: int, take: int) -> Iterator[dict[str, Any]]:
        """Samples [first, first + take) of one shard; with ``skip_corrupt``, fewer (and a warning) when the shard
        ends early or cannot be read further. A network fault (:mod:`vitrain.data.remote`: retried for
        ``data.retry_seconds``) is never taken for corruption: it stops the run, whatever ``skip_corrupt`` says."""
        seen, error = 0, None
        try:
            for sample in read_samples(url, self.index):
                seen += 1
                if seen > first:
                    yield sample
                    if seen == first + take:
                        return
        except NetworkError:
            raise
        except Exception as e:
            if missing(e):
                raise DataError(f"shard {url} does not exist ({cause(e)}); check data.shards") from e
            error = e
        ended = f"it ends after {seen} samples, fewer than counted"
        what = f"{tar_reason(error)} after {seen} samples" if error else ended
        if not self.skip_corrupt:
            raise DataError(f"shard {url} is truncated or corrupt ({what}); replace it (scripts/make_shards.py "
                            f"regenerates shards), or set data.skip_corrupt=true to skip what cannot be "
                            f"read") from error
        log.warning("shard %s is truncated or corrupt (%s): %d samples skipped", url, what, take - max(0, seen - first))

    def _decode(self, raw: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
        """(transformed image, label) of a raw sample; None for an unreadable one with ``skip_corrupt``."""
        where = f"{raw.get('__url__')}: sample {raw.get('__key__')}"
        try:
            with pixel_limit(self.max_pixels):
                image = upright(Image.open(io.BytesIO(raw[_member(raw, IMAGE_KEYS, "image")]))).convert("RGB")
            label = raw[_member(raw, LABEL_KEYS, "label")]
            label = int(label) if "cls" in raw else int(json.loads(label)["label"])
        except (OSError, ValueError, KeyError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as e:  # a DataError (an OSError): a member missing
            if self.skip_corrupt:
                return None
            if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
                raise DataError(too_many_pixels(where, self.max_pixels, e)) from e
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where} cannot be read ({type(e).__name__}: {first_line(e, 100)}); fix the "
                            f"shard, or set data.skip_corrupt=true to skip such samples") from e
        if not 0 <= label < len(self.classes):
            raise DataError(f"{where} has label {label}, outside the {len(self.classes)} classes of the shards' "
                            f"classes.txt; fix the label or the class list")
        return (self.transform(image) if self.transform else image), label

    def _seed(self, worker: int, batch: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, batch + 1]).generate_state(1)[0])


def read_samples(url: str, index: Index) -> Iterator[dict[str, Any]]:
    """The samples of one shard, its tar members grouped by key (webdataset's expander and grouping), its bytes
    from :func:`vitrain.data.remote.open_shard` (any scheme, network faults ridden out)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open_shard(url, index.storage_options, index.retry_seconds) as stream:
        try:
            yield from group_by_keys(tar_file_expander([{"stream": stream, "url": url}]))
        except NetworkError as e:  # webdataset appends its stream and URL to the arguments: the message alone
            raise NetworkError(str(e.args[0])) from None


def missing(error: BaseException) -> bool:
    """A shard that is not there: no such file, HTTP 404, an object store's NoSuchKey."""
    return isinstance(error, FileNotFoundError) or getattr(error, "code", None) == 404 or \
        "NoSuchKey" in type(error).__name__


def _member(raw: dict[str, Any], keys: tuple[str, ...], what: str) -> str:
    """The first of ``keys`` that sample ``raw`` holds; a DataError when it holds none. webdataset groups
    consecutive tar members by key, so a tar written out of order (a.jpg, b.jpg, a.cls, b.cls) gives samples
    that hold half of theirs: the message says how to write one that reads."""
    key = next((k for k in keys if k in raw), None)
    if key is None:
        wanted = [f".{k}" for k in keys]
        held = ", ".join(f".{k}" for k in sorted(raw) if not k.startswith("__")) or "nothing"
        raise DataError(f"sample {raw.get('__key__')} in {raw.get('__url__')} has no {what} (no "
                        f"{', '.join(wanted[:-1])} or {wanted[-1]} member, only {held}); the members of one sample "
                        f"must be consecutive in the tar, as tar and webdataset's ShardWriter write them: create it "
                        f"with `tar --sort=name` or scripts/make_shards.py")
    return key


class _BatchRng:
    """Seeds the global generators that per-image transforms draw from at the start of each batch, so that a
    batch's augmentation depends only on its place in the epoch (a resume repeats it). In the main process
    (no loader workers) the training's own random state is put back after the batch."""

    def __init__(self, restore: bool) -> None:
        self.restore, self.saved = restore, None

    def begin(self, seed: int) -> None:
        if self.restore:
            self.saved = torch.get_rng_state(), random.getstate()
        torch.manual_seed(seed)
        random.seed(seed)

    def end(self) -> None:
        if self.saved is not None:
            torch.set_rng_state(self.saved[0])
            random.setstate(self.saved[1])
            self.saved = None


def _share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first, count) of rank's contiguous share of n evaluation samples; all of them over the ranks."""
    first = rank * n // world_size
    return first, (rank + 1) * n // world_size - first


@dataclass
class ResumePlan:
    """Where each worker role goes on after a resume: ``skip[role]`` samples already delivered (or sitting in the
    tail of partial batches), and the role whose turn comes next (the resumed loader's worker 0 takes it)."""

    skip: list[int]
    next_role: int = 0


def resume_plan(outputs: list[tuple[int, int]], start_batch: int, batch_size: int) -> ResumePlan:
    """The loader's batches of an epoch, as :class:`ShardLoader` yields them: the workers' full batches in
    PyTorch's turn order (one from each worker in turn, passing over workers that are done; a worker's partial
    last batch takes its turn but is held back), then the held partial batches joined in role order and cut into
    whole batches. Which samples of each role the first ``start_batch`` of them used."""
    k, fulls = len(outputs), sum(f for f, _ in outputs)
    if start_batch > fulls:  # into the tail: every full batch, and the start of the joined partial batches
        skip, left = [f * batch_size for f, _ in outputs], (start_batch - fulls) * batch_size
        for role, (_, partial) in enumerate(outputs):
            used = min(partial, left)
            skip[role], left = skip[role] + used, left - used
        return ResumePlan(skip)
    done, taken, left, turn = [0] * k, [0] * k, start_batch, 0
    turns = [f + (1 if p else 0) for f, p in outputs]
    while left > 0:
        role = turn % k
        if taken[role] < turns[role]:
            taken[role] += 1
            if taken[role] <= outputs[role][0]:  # a full batch: yielded (a partial one is held, not counted)
                done[role], left = done[role] + 1, left - 1
        turn += 1
    active = [r for r in range(k) if taken[r] < turns[r]]
    next_role = next((r for r in [*range(turn % k, k), *range(turn % k)] if r in active), 0)
    return ResumePlan([d * batch_size for d in done], next_role)


def _buffer_shuffle(samples: Iterator[dict], size: int, seed: int) -> Iterator[dict]:
    """webdataset's shuffle buffer, with its own seeded generator."""
    from webdataset.filters import _shuffle

    return _shuffle(samples, bufsize=size, initial=min(size, 100), rng=random.Random(seed))


def _exactly(samples: Iterator[dict], n: int, stream: ShardStream) -> Iterator[dict]:
    """``n`` samples: those read, then (when a shard was cut short and skipped) repeats of the last one, each
    marked to count as skipped, so that every rank still makes its number of steps."""
    last = None
    count = 0
    for sample in samples:
        last = sample
        count += 1
        yield sample
    if count < n and last is None:
        raise DataError(f"no sample of {len(stream.urls)} shard(s) could be read, starting with {stream.urls[0]}")
    for _ in range(n - count):
        yield {"__fill__": None, "__url__": last.get("__url__"), "__key__": "(missing)"}


class ShardLoader:
    """Batches of a :class:`ShardStream` through a ``DataLoader`` (workers decode and augment), duck-typing
    what the trainer consumes: ``len``, iteration, ``batch_size`` and a ``sampler`` with ``set_epoch``.
    ``skipped`` counts the samples skipped as unreadable (``data.skip_corrupt``) since the loader was made."""

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int, seed: int, rank: int,
                 world_size: int, drop_last: bool = False, pin_memory: bool = False) -> None:
        stream.seed, stream.rank, stream.world_size, stream.batch_size = seed, rank, world_size, batch_size
        stream.drop_last, stream.num_workers = drop_last, max(1, num_workers)
        self.stream, self.batch_size, self.num_workers, self.pin_memory = stream, batch_size, num_workers, pin_memory
        self.sampler, self.skipped = self, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.stream.epoch, self.stream.start_batch = epoch, start // self.batch_size

    def __len__(self) -> int:
        return self.stream.batches() - self.stream.start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = min(self.num_workers, max(1, len(self.stream.pieces())))
        self.stream.num_workers = max(1, workers)
        loader = DataLoader(self.stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.stream.seed),  # leaves the global RNG alone
                            **loader_workers(workers))
        held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for images, labels, skipped, role, partial in loader:
            self.skipped += skipped
            if partial:  # a worker's last, short batch: joined with the others' at the end
                held[role] = images, labels
            else:
                yield images, labels
        if held:
            images, labels = (torch.cat([held[r][i] for r in sorted(held)]) for i in (0, 1))
            yield from zip(images.split(self.batch_size), labels.split(self.batch_size), strict=True)


def open_shards(spec: str, train: bool, shuffle_buffer: int, skip_corrupt: bool,
                epoch_size: int | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS,
                index: Index | None = None) -> ShardStream:
    """The :class:`ShardStream` of ``spec``, with its per-shard counts and classes from ``index`` (the manifest
    and class list beside the shards, or ``data.manifest``)."""
    urls, index = expand_shards(spec), index or Index()
    counts = shard_counts(urls, epoch_size, skip_corrupt, index)
    if sum(counts) == 0:
        raise DataError(f"no sample of the {len(urls)} shard(s) of '{spec}' can be read; regenerate them with "
                        f"scripts/make_shards.py")
    stream = ShardStream(urls, counts, shard_classes(urls[0], index), train, shuffle_buffer, skip_corrupt, index)
    stream.max_pixels = max_pixels
    return stream
