"""The batched device data path against the per-image CPU transforms: resize, crop, flip and erasing
semantics checked pixel by pixel, augmentation statistics on the digits, and the loader's order, seeding
and exact resume. Runs on CPU tensors; the test marked ``gpu`` repeats the key checks on CUDA."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Subset

from vitrain.data import DataConfig, EpochSampler, build_datasets
from vitrain.data.datasets import load_digits, load_imagefolder
from vitrain.data.gpu import DeviceLoader, GpuAugment, gpu_loaders, in_memory_arrays, resolve_pipeline
from vitrain.data.transforms import build_transforms
from vitrain.errors import ConfigError

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std that leave x / 255: outputs * 255 are the uint8 levels


def _noise(n: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, 3, h, w or h), dtype=np.uint8))


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _levels(normalized: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """The uint8 level of each normalized pixel."""
    return ((normalized * std + mean) * 255).round().long()


@pytest.mark.parametrize("train", [True, False])
def test_shapes_dtype_and_value_range(train: bool) -> None:
    images = _noise(32, 10, 14)
    out = GpuAugment(12, IMAGENET_MEAN, IMAGENET_STD, train, crop_padding=4)(images, _gen(0))
    assert out.shape == (32, 3, 12, 12) and out.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std  # black and white, per channel
    assert (out >= low - 1e-6).all() and (out <= high + 1e-6).all()


@pytest.mark.parametrize("size_in, img_size, interpolation", [
    ((8, 8), 16, "bilinear"),  # digits: 2x up
    ((32, 32), 48, "bilinear"),  # CIFAR: 1.5x up
    ((10, 14), 8, "bilinear"),  # down with antialias, shorter side, off-centre crop (11 -> 8)
    ((32, 32), 48, "bicubic"),  # overshoots: clamped like the uint8 CPU path
    ((8, 8), 12, "nearest"),
])
def test_eval_equals_the_cpu_transform(size_in: tuple[int, int], img_size: int, interpolation: str) -> None:
    """On CPU tensors the resize is torchvision's own kernel, so the only difference left is float
    rounding: bound 1e-6. (On CUDA the bound is one uint8 level, see the gpu test.)"""
    images = _noise(6, *size_in)
    square = size_in[0] == size_in[1]  # then the train path without crop padding and flip has no randomness
    for train in (False, True) if square else (False,):
        cpu = build_transforms(img_size, IMAGENET_MEAN, IMAGENET_STD, train, crop_padding=0, hflip=False,
                               interpolation=interpolation)
        ours = GpuAugment(img_size, IMAGENET_MEAN, IMAGENET_STD, train, crop_padding=0, hflip=False,
                          interpolation=interpolation)
        expected = torch.stack([cpu(image) for image in images])
        torch.testing.assert_close(ours(images, _gen(0)), expected, atol=1e-6, rtol=0)


def test_flip_is_whole_sample_and_half_the_time() -> None:
    images = _noise(4000, 8)
    plain = GpuAugment(12, MEAN, STD, False)(images)
    out = GpuAugment(12, MEAN, STD, True, crop_padding=0)(images, _gen(0))
    same = (out == plain).flatten(1).all(1)
    mirrored = (out == plain.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all()  # each sample is the eval image or its mirror image (noise is never symmetric)
    # Binomial(4000, 0.5): sd of the share 0.0079; allow 4 sd
    assert abs(mirrored.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / 4000)
    unflipped = GpuAugment(12, MEAN, STD, True, crop_padding=0, hflip=False)(images, _gen(0))
    assert torch.equal(unflipped, plain)


def test_crop_is_a_shift_of_the_resized_image_with_black_fill() -> None:
    """Reference by explicit padding and slicing: exactly one of the (2p+1)^2 shifts reproduces each sample."""
    p, s = 3, 12
    images = _noise(16, 8, seed=1)
    resized = GpuAugment(s, MEAN, STD, False)(images)  # 8 -> 12, normalized
    out = GpuAugment(s, MEAN, STD, True, crop_padding=p, hflip=False)(images, _gen(1))
    black = (0 - 0.5) / 0.5
    shifts = set()
    for i in range(len(images)):
        padded = torch.full((3, s + 2 * p, s + 2 * p), black)
        padded[:, p : p + s, p : p + s] = resized[i]
        matches = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
                   if torch.allclose(out[i], padded[:, p + dy : p + dy + s, p + dx : p + dx + s], atol=1e-6, rtol=0)]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 8  # the shifts vary


def test_crop_offsets_and_flips_are_uniform_and_independent() -> None:
    """An image whose levels code their position (1..144) tells each sample's shift and flip; every
    pixel of every sample is then checked against that shift, and the shifts against uniformity."""
    p, s, n = 3, 12, 4900
    code = (1 + torch.arange(s * s)).view(1, 1, s, s).expand(n, 3, s, s).to(torch.uint8).contiguous()
    levels = _levels(GpuAugment(s, *RAW, True, crop_padding=p)(code, _gen(2)), 0.0, 1.0)[:, 0]  # (n, s, s)
    c = s // 2
    centre, right = levels[:, c, c] - 1, levels[:, c, c + 1] - 1  # both inside the image for any shift
    flipped = right < centre
    dy = centre // s - c
    dx = centre % s - torch.where(flipped, s - 1 - c, c)  # the centre shows crop column s-1-c when flipped
    ramp = torch.arange(s)
    rows, cols = ramp + dy[:, None], ramp + dx[:, None]  # (n, s) source rows / columns
    inside = ((rows >= 0) & (rows < s))[:, :, None] & ((cols >= 0) & (cols < s))[:, None, :]
    expected = torch.where(inside, rows[:, :, None] * s + cols[:, None, :] + 1, 0)  # zero fill outside
    expected = torch.where(flipped[:, None, None], expected.flip(-1), expected)
    assert torch.equal(levels, expected)
    assert dy.abs().max() <= p and dx.abs().max() <= p
    cells = (2 * p + 1) ** 2
    counts = torch.bincount(((dy + p) * (2 * p + 1) + dx + p), minlength=cells).double()
    chi2 = ((counts - n / cells) ** 2 / (n / cells)).sum()
    assert chi2 < 93.2  # 99.99% quantile of chi-square with 48 degrees of freedom
    assert abs(flipped.double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    both = torch.stack([counts, torch.bincount(((dy + p) * (2 * p + 1) + dx + p)[flipped], minlength=cells)])
    share = both[1].sum() / n  # flips are independent of the shift: each cell holds about that share
    assert ((both[1] - share * both[0]).abs() <= 5 * (both[0] * 0.25).sqrt() + 1).all()


def _pixel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel mean, variance and fourth central moment over the first dimension."""
    mean = x.mean(0)
    var = x.var(0)
    return mean, var, ((x - mean) ** 4).mean(0)


def _max_z(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The largest per-pixel z-scores of the differences in mean and in variance between two samples."""
    (ma, va, m4a), (mb, vb, m4b) = _pixel_moments(a), _pixel_moments(b)
    n = len(a)
    z_mean = (ma - mb).abs() / ((va + vb) / n + 1e-8).sqrt()
    z_var = (va - vb).abs() / ((m4a - va**2 + m4b - vb**2) / n + 1e-8).sqrt()
    return z_mean.max().item(), z_var.max().item()


def test_train_statistics_match_the_cpu_path_on_digits() -> None:
    """64 digits x 16 draws through each path: every pixel's mean and variance agree within 5 standard
    errors (256 pixels: a false alarm about 1e-4). A shift range one too small fails the same check."""
    images, draws = load_digits()[0].images[:64], 16
    cpu = build_transforms(16, MEAN, STD, True, crop_padding=4, hflip=True)
    torch.manual_seed(0)  # torchvision's RandomCrop and RandomHorizontalFlip draw from torch's generator
    reference = torch.stack([cpu(image)[0] for _ in range(draws) for image in images])  # (1024, 16, 16)

    def ours(padding: int) -> torch.Tensor:
        augment, g = GpuAugment(16, MEAN, STD, True, crop_padding=padding), _gen(0)
        return torch.cat([augment(images, g)[:, 0] for _ in range(draws)])

    z_mean, z_var = _max_z(ours(4), reference)
    assert z_mean < 5 and z_var < 5
    assert max(_max_z(ours(3), reference)) > 5  # the check can tell


def test_random_erasing_puts_one_noise_rectangle_in_every_sample() -> None:
    """The same generator seed gives the same crops and flips (drawn first), so erased pixels are those
    that differ from the un-erased output; they are N(0, 1), mostly off the grid of uint8 levels."""
    h = 24
    images = _noise(512, h)
    plain = GpuAugment(h, MEAN, STD, True, re_prob=0.0)(images, _gen(3))
    erased = GpuAugment(h, MEAN, STD, True, re_prob=1.0)(images, _gen(3))
    changed = erased != plain
    mask = changed.any(1)  # (B, H, W)
    rows, cols = mask.any(2), mask.any(1)
    assert torch.equal(mask, rows[:, :, None] & cols[:, None, :])  # one filled rectangle ...
    heights, widths = rows.sum(1), cols.sum(1)
    first_row, first_col = rows.int().argmax(1), cols.int().argmax(1)
    assert (heights > 0).all()  # every sample
    assert (rows.flip(1).int().argmax(1) == h - first_row - heights).all()  # ... contiguous in rows
    assert (cols.flip(1).int().argmax(1) == h - first_col - widths).all()  # ... and columns
    area = heights * widths
    assert (area >= 0.02 * h * h * 0.5).all() and (area <= h * h / 3 * 1.3).all()  # timm's range, after rounding
    assert changed[mask[:, None].expand_as(changed)].double().mean() > 0.999  # in every channel
    noise = erased[mask[:, None].expand_as(erased)]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    off_grid = (_levels(noise).double() - (noise * 0.5 + 0.5) * 255).abs() > 1e-3
    assert off_grid.double().mean() > 0.99  # not values an un-erased image can have
    images = _noise(2000, 16)
    some = GpuAugment(16, MEAN, STD, True, re_prob=0.25)(images, _gen(4))
    share = (some != GpuAugment(16, MEAN, STD, True)(images, _gen(4))).flatten(1).any(1).double().mean()
    assert abs(share.item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 2000)  # Binomial(2000, 0.25): 4 sd


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """(height, width, centre row, centre column) of each single-rectangle mask (N, H, W)."""
    rows, cols = masks.any(2).double(), masks.any(1).double()
    ramp = torch.arange(masks.shape[1], dtype=torch.double)
    h, w = rows.sum(1), cols.sum(1)
    return torch.stack([h, w, (rows * ramp).sum(1) / h, (cols * ramp).sum(1) / w], 1)


def test_erased_rectangles_are_distributed_as_timm_random_erasing() -> None:
    """Batched erasing vs timm's per-image RandomErasing(mode="pixel"), 2000 boxes each: the means of the
    box height, width and centre agree within 5 standard errors, their sds within 10% (about 4 standard
    errors of an sd)."""
    n, h = 2000, 20
    zeros = torch.zeros(n, 3, h, h, dtype=torch.uint8)
    ours = GpuAugment(h, *RAW, True, crop_padding=0, hflip=False, re_prob=1.0)(zeros, _gen(5)) != 0
    random.seed(0)
    torch.manual_seed(0)
    eraser, theirs = RandomErasing(1.0, mode="pixel", device="cpu"), []
    for _ in range(n):
        image = torch.zeros(3, h, h)
        theirs.append(eraser(image) != 0)
    a, b = _boxes(ours.any(1)), _boxes(torch.stack(theirs).any(1))
    se = ((a.var(0) + b.var(0)) / n).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se).all()
    assert ((a.std(0) - b.std(0)).abs() < 0.1 * b.std(0)).all()


def _coded_set(n: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with level i + 1, its label is (7 * i) % 10: a batch tells which images it holds."""
    images = (torch.arange(n) + 1).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    return images, (7 * torch.arange(n)) % 10


def _indices(batch: torch.Tensor) -> torch.Tensor:
    return _levels(batch.amax((1, 2, 3))) - 1  # the padding is black, the image one level


def test_loader_length_follows_the_sampler_and_drop_last() -> None:
    images, labels = _coded_set(10)
    augment = GpuAugment(6, MEAN, STD, True, crop_padding=1)
    for drop_last, full, resumed in ((False, 3, 2), (True, 2, 1)):
        loader = DeviceLoader(images, labels, 4, augment, EpochSampler(10), drop_last=drop_last)
        assert len(loader) == full and loader.batch_size == 4
        loader.sampler.set_epoch(1, start=4)
        assert len(loader) == resumed == len(list(loader))
    in_order = DeviceLoader(images, labels, 4, GpuAugment(6, MEAN, STD, False))
    assert len(in_order) == 3 and in_order.sampler is None
    assert torch.cat([y for _, y in in_order]).tolist() == labels.tolist()


def test_every_image_once_per_epoch_with_its_label() -> None:
    images, labels = _coded_set(37)
    loader = DeviceLoader(images, labels, 8, GpuAugment(6, MEAN, STD, True, crop_padding=2), EpochSampler(37, 1))
    orders = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert [len(y) for _, y in batches] == [8, 8, 8, 8, 5]
        seen = torch.cat([_indices(x) for x, _ in batches])
        assert sorted(seen.tolist()) == list(range(37))
        assert torch.equal(torch.cat([y for _, y in batches]), labels[seen])
        orders.append(seen)
    assert not torch.equal(*orders)


def test_same_seed_same_epoch_other_seed_other_augmentation() -> None:
    images, labels = _noise(40, 8), torch.arange(40)
    augment = GpuAugment(10, MEAN, STD, True, crop_padding=2, re_prob=0.5)

    def epoch(seed: int) -> list[torch.Tensor]:
        return [x for x, _ in DeviceLoader(images, labels, 16, augment, EpochSampler(40, 1), seed=seed)]

    first, again, other = epoch(7), epoch(7), epoch(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_yields_exactly_the_tail_of_the_epoch(drop_last: bool) -> None:
    images, labels = _noise(50, 8), torch.arange(50)
    augment = GpuAugment(12, MEAN, STD, True, crop_padding=2, re_prob=0.5)
    loader = DeviceLoader(images, labels, 8, augment, EpochSampler(50, 3), drop_last=drop_last, seed=5)
    loader.sampler.set_epoch(2)
    full = list(loader)
    assert len(full) == (6 if drop_last else 7)
    for j in (1, 3, len(full) - 1):
        loader.sampler.set_epoch(2, start=j * 8)
        tail = list(loader)
        assert len(tail) == len(loader) == len(full) - j
        for (x, y), (x_full, y_full) in zip(tail, full[j:], strict=True):
            assert torch.equal(x, x_full) and torch.equal(y, y_full)


def test_in_memory_arrays_of_subsets_and_image_folders(imagefolder_root: Path) -> None:
    train, _, _ = load_digits()
    images, labels = in_memory_arrays(Subset(Subset(train, [3, 1, 7, 5]), [2, 0]))  # -> 7, 3
    assert torch.equal(images, train.images[[7, 3]]) and torch.equal(labels, train.labels[[7, 3]])
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 8, 8)
    assert in_memory_arrays(train)[0] is train.images
    part = build_datasets(DataConfig("digits", mean=MEAN, std=STD, train_fraction=0.2), 16).train
    assert torch.equal(in_memory_arrays(part)[1], part.dataset.labels[part.indices])
    assert in_memory_arrays(load_imagefolder(imagefolder_root)[0]) is None


def test_resolve_pipeline_decisions(monkeypatch: pytest.MonkeyPatch, imagefolder_root: Path) -> None:
    digits = load_digits()[0]
    folder = load_imagefolder(imagefolder_root)[0]
    nbytes = digits.images.numel()  # uint8
    free = {"bytes": 10**12}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10**12))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_pipeline("auto", digits, cuda, None, 0.0) == "gpu"
    assert resolve_pipeline("auto", Subset(digits, [0, 1]), cuda, None, 0.0) == "gpu"
    assert resolve_pipeline("auto", digits, cpu, None, 0.0) == "cpu"
    assert resolve_pipeline("auto", folder, cuda, None, 0.0) == "cpu"
    assert resolve_pipeline("auto", digits, cuda, "rand-m9-mstd0.5-inc1", 0.0) == "cpu"
    assert resolve_pipeline("auto", digits, cuda, None, 0.4) == "cpu"
    free["bytes"] = 4 * nbytes  # the images must take under a quarter of the free memory
    assert resolve_pipeline("auto", digits, cuda, None, 0.0) == "cpu"
    free["bytes"] = 4 * nbytes + 4
    assert resolve_pipeline("auto", digits, cuda, None, 0.0) == "gpu"
    assert resolve_pipeline("gpu", digits, cpu, None, 0.0) == "gpu"  # runs on CPU tensors too
    assert resolve_pipeline("cpu", digits, cuda, None, 0.0) == "cpu"
    assert resolve_pipeline("cpu", folder, cuda, "rand-m9-mstd0.5-inc1", 0.4) == "cpu"


@pytest.mark.parametrize("pipeline, on_folder, auto_augment, color_jitter, match", [
    ("gpu", True, None, 0.0, r"^data\.pipeline=gpu needs an in-memory data set \(digits, cifar10, cifar100\); "
                             r"ImageFolder reads files: use data\.pipeline=cpu, or data\.cache=true "
                             r"\(decoded once, augmented in batches\)$"),
    ("gpu", False, "rand-m9-mstd0.5-inc1", 0.0, r"^data\.pipeline=gpu does not run RandAugment \(data\.auto_augment="
                                                r"rand-m9-mstd0\.5-inc1\); set data\.auto_augment=null, or use "
                                                r"data\.pipeline=cpu$"),
    ("gpu", False, None, 0.4, r"^data\.pipeline=gpu does not run colour jitter \(data\.color_jitter=0\.4\); "
                              r"set data\.color_jitter=0, or use data\.pipeline=cpu$"),
    ("gpu", False, "rand-m9", 0.4, r"RandAugment \(data\.auto_augment=rand-m9\) or colour jitter .*; "
                                   r"set data\.auto_augment=null or data\.color_jitter=0, or use data\.pipeline=cpu$"),
    ("fast", False, None, 0.0, r"^unknown data\.pipeline 'fast'; choose one of auto, gpu, cpu$"),
])
def test_resolve_pipeline_errors_are_one_line_and_name_the_key(
    pipeline: str, on_folder: bool, auto_augment: str | None, color_jitter: float, match: str, imagefolder_root: Path
) -> None:
    dataset = load_imagefolder(imagefolder_root)[0] if on_folder else load_digits()[0]
    with pytest.raises(ConfigError, match=match) as e:
        resolve_pipeline(pipeline, dataset, torch.device("cpu"), auto_augment, color_jitter)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("setting, match", [
    (dict(interpolation="lanczos"), r"data\.interpolation='lanczos' does not run on image tensors; use one of"),
    (dict(re_prob=1.5), r"data\.re_prob is a probability"),
    (dict(crop_padding=-1), r"data\.crop_padding must be >= 0"),
])
def test_bad_augment_settings_are_config_errors(setting: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GpuAugment(16, MEAN, STD, True, **setting)


def test_gpu_loaders_on_digits() -> None:
    cfg = DataConfig("digits", mean=MEAN, std=STD, train_fraction=0.5, batch_size=64, re_prob=0.25)
    splits = build_datasets(cfg, 16)
    train, val = gpu_loaders(splits, cfg, 16, "cpu", seed=2)
    assert isinstance(train.sampler, EpochSampler) and train.sampler.seed == 2
    assert len(train) == math.ceil(len(splits.train) / 64) and len(val) == math.ceil(360 / 64)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 16, 16) and y.dtype == torch.long
    images, labels = zip(*(splits.val[i] for i in range(len(splits.val))), strict=True)
    torch.testing.assert_close(torch.cat([x for x, _ in val]), torch.stack(images), atol=1e-6, rtol=0)
    assert torch.cat([y for _, y in val]).tolist() == list(labels)  # in order, the CPU eval transform
    backwards = list(range(len(splits.val)))[::-1]
    _, val = gpu_loaders(splits, cfg, 16, "cpu", val_sampler=backwards)
    assert torch.cat([y for _, y in val]).tolist() == list(labels)[::-1]


def test_gpu_loaders_refuses_image_folders(imagefolder_root: Path) -> None:
    cfg = DataConfig("imagefolder", mean=MEAN, std=STD, root=imagefolder_root, batch_size=4)
    splits = build_datasets(cfg, 16)
    with pytest.raises(ConfigError, match=r"^data\.pipeline=gpu needs an in-memory data set .*use data\.pipeline=cpu$"):
        gpu_loaders(splits, cfg, 16, "cpu")


@pytest.mark.gpu
def test_cuda_matches_the_cpu_path_and_resumes_exactly() -> None:
    """On CUDA the resize is float interpolation rounded to uint8, the CPU's is a fixed-point uint8
    kernel: they may differ by one level, i.e. 1/255/std after normalization."""
    images = _noise(16, 32)
    cpu = build_transforms(48, IMAGENET_MEAN, IMAGENET_STD, False)
    expected = torch.stack([cpu(image) for image in images])
    out = GpuAugment(48, IMAGENET_MEAN, IMAGENET_STD, False)(images.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), expected, atol=1 / 255 / min(IMAGENET_STD) + 1e-6, rtol=0)
    train = GpuAugment(48, IMAGENET_MEAN, IMAGENET_STD, True, crop_padding=0)(images.cuda(), _gen(0, "cuda"))
    same, mirrored = ((train == eval_image).flatten(1).all(1) for eval_image in (out, out.flip(-1)))
    assert (same ^ mirrored).all() and 0 < mirrored.sum() < 16  # the eval image or its mirror image
    loader = DeviceLoader(_noise(50, 8), torch.arange(50), 8, GpuAugment(12, MEAN, STD, True, re_prob=0.5),
                          EpochSampler(50, 3), device="cuda", seed=5)
    loader.sampler.set_epoch(1)
    full = list(loader)
    assert full[0][0].is_cuda and full[0][1].is_cuda
    loader.sampler.set_epoch(1, start=3 * 8)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(list(loader), full[3:], strict=True))
