"""The recipes the papers use: random-resized crops on both data paths, timm's evaluation crop, augmentation
policies, repeated augmentation cut as DeiT cuts it, a validation split for model selection, and every
experiment held to its recipe card (tests/recipe_cards.py: the source's values, knob by knob)."""

from __future__ import annotations

import math
import random
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from recipe_cards import CARDS, SAME, Run, render, resolve, value
from torchvision.transforms import v2

from vitrain.config import CONFIG_DIR, compose, to_config
from vitrain.data import DataConfig, EpochSampler, ShardedEpochSampler, build_datasets
from vitrain.data.gpu import GpuAugment
from vitrain.data.samplers import repeated_epoch_length
from vitrain.data.transforms import POLICY_FAMILIES, build_transforms
from vitrain.errors import ConfigError
from vitrain.optim import SchedulerConfig, lr_factor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCALE, RATIO = (0.35, 1.0), (3 / 4, 4 / 3)


def _rrc_of(transform: v2.Compose) -> v2.RandomResizedCrop:
    return next(t for t in transform.transforms if isinstance(t, v2.RandomResizedCrop))


def _check_boxes(heights: torch.Tensor, widths: torch.Tensor, h: int, w: int) -> tuple[float, float]:
    """Every box inside the image, its area share in SCALE and aspect ratio in RATIO (up to the rounding of
    its sides to whole pixels); returns the mean area share and mean log aspect ratio."""
    share, aspect = heights * widths / (h * w), widths / heights
    slack = 2 * (1 / heights + 1 / widths)  # rounding each side moves the share and ratio by about this much
    assert ((heights > 0) & (heights <= h) & (widths > 0) & (widths <= w)).all()
    assert (share >= SCALE[0] - slack).all() and (share <= SCALE[1] + 1e-6).all()
    assert (aspect >= RATIO[0] - slack).all() and (aspect <= RATIO[1] + slack).all()
    return share.mean().item(), aspect.log().mean().item()


def test_random_resized_crops_have_the_configured_areas_and_ratios_on_both_paths() -> None:
    """4,000 draws on a 64x48 image: the per-image path (torchvision's RandomResizedCrop) and the batched
    device path draw boxes from the same distribution (means within 0.02 and 0.03)."""
    h, w, n = 48, 64, 4000
    torch.manual_seed(0)
    rrc = _rrc_of(build_transforms(32, MEAN, STD, train=True, train_crop="rrc", scale=SCALE, ratio=RATIO))
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    boxes = [rrc.make_params([image]) for _ in range(n)]
    heights, widths = (torch.tensor([b[key] for b in boxes]).float() for key in ("height", "width"))
    cpu = _check_boxes(heights, widths, h, w)
    augment = GpuAugment(32, MEAN, STD, True, train_crop="rrc", scale=SCALE, ratio=RATIO)
    top, left, height, width = augment.rrc_boxes(n, h, w, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert ((top >= 0) & (top + height <= h) & (left >= 0) & (left + width <= w)).all()
    gpu = _check_boxes(height.float(), width.float(), h, w)
    assert abs(cpu[0] - gpu[0]) < 0.02 and abs(cpu[1] - gpu[1]) < 0.03
    q = torch.tensor([0.1, 0.5, 0.9])  # and the same spread: the quantiles of the area share agree
    shares = [heights * widths / (h * w), height.float() * width.float() / (h * w)]
    assert (shares[0].quantile(q) - shares[1].quantile(q)).abs().max() < 0.03


def test_the_device_crop_of_the_whole_image_is_a_resize() -> None:
    """With scale = ratio = 1 the crop is the whole (square) image: the device path's grid_sample gives the
    per-image bilinear resize, within one grey level."""
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    augment = GpuAugment(16, (0.0,) * 3, (1.0,) * 3, True, hflip=False, train_crop="rrc", scale=(1, 1), ratio=(1, 1))
    out = augment(images, torch.Generator().manual_seed(0)) * 255
    resized = v2.functional.resize(images, [16], antialias=True).float()
    assert (out - resized).abs().max() <= 1.0 + 1e-4


@pytest.mark.parametrize(("interpolation", "crop_pct", "size"), [("bicubic", 0.875, 224), ("bilinear", 1.0, 64),
                                                                    ("bicubic", 0.9, 96)])
def test_eval_transform_is_timms_pixel_for_pixel(interpolation: str, crop_pct: float, size: int) -> None:
    """The same resize (PIL, shorter side to floor(size / crop_pct)), center crop and normalization as timm's
    create_transform: equal uint8 pixels, normalized values within 1e-6 (ToTensor divides by 255, ToDtype
    multiplies by 1/255)."""
    from timm.data import create_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8))
    theirs = create_transform(size, is_training=False, interpolation=interpolation, crop_pct=crop_pct, mean=MEAN,
                              std=STD)(image)
    ours = build_transforms(size, MEAN, STD, train=False, interpolation=interpolation, crop_pct=crop_pct)(image)
    assert ours.shape == theirs.shape == (3, size, size)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    pixels = [(t * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255 for t in (ours, theirs)]
    assert torch.equal(pixels[0].round(), pixels[1].round())


def test_the_device_eval_crop_follows_crop_pct() -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    augment = GpuAugment(28, MEAN, STD, False, interpolation="bicubic", crop_pct=0.875)
    per_image = build_transforms(28, MEAN, STD, train=False, interpolation="bicubic", crop_pct=0.875)
    torch.testing.assert_close(augment(images), torch.stack([per_image(x) for x in images]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w3", "original", "v0", "3a", "trivialaugment"])
def test_every_policy_family_builds_and_runs_on_both_image_kinds(policy: str) -> None:
    transform = build_transforms(32, MEAN, STD, train=True, auto_augment=policy, color_jitter=0.3, train_crop="rrc")
    pil = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    tensor = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    for image in (pil, tensor):
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    jitter = any(isinstance(t, v2.ColorJitter) for t in transform.transforms)
    assert jitter == (policy == "3a")  # timm: colour jitter is off under a policy, except DeiT III's 3-Augment


def test_a_wrong_policy_is_one_line_listing_the_families() -> None:
    with pytest.raises(ConfigError) as e:
        to_config(compose(["data.auto_augment=mixup9"]))
    assert str(e.value) == f"data.auto_augment='mixup9' is not an augmentation policy; use one of {POLICY_FAMILIES}"


def test_repeated_augmentation_shows_each_image_k_times_spread_over_the_ranks() -> None:
    """DeiT's RASampler: 1,000 images make an epoch of 1000 // 256 * 256 = 768 positions, 256 images 3 times
    each, and the 3 copies of an image land on 3 different ranks of 3; the epoch's order is the same whether
    one process or 3 ranks read it."""
    size, k, world = 1000, 3, 3
    sampler = EpochSampler(size, seed=4, repeats=k)
    sampler.set_epoch(2)
    counts = Counter(list(sampler))
    assert len(sampler) == 768 and len(counts) == 256
    assert sorted(Counter(counts.values()).items()) == [(3, 256)]
    ranks = [ShardedEpochSampler(size, 4, r, world, batch_size=8, repeats=k) for r in range(world)]
    for r in ranks:
        r.set_epoch(2)
    shares = [list(r) for r in ranks]
    assert [len(s) for s in shares] == [256, 256, 256]
    assert sorted(i for s in shares for i in s) == sorted(sampler)
    where = {}
    for rank, share in enumerate(shares):
        for i in share:
            where.setdefault(i, set()).add(rank)
    assert all(len(where[i]) == counts[i] for i in counts)  # every copy of an image on its own rank
    resumed = EpochSampler(size, 4, k)  # resuming inside the epoch: the rest of the same order
    resumed.set_epoch(2, start=100)
    assert list(resumed) == list(sampler)[100:]


def test_a_validation_split_is_held_out_stratified_and_the_test_set_kept_apart() -> None:
    cfg = DataConfig("digits", mean=[0.5] * 3, std=[0.5] * 3, val_fraction=0.2, split_seed=3)
    splits = build_datasets(cfg, 16)
    assert len(splits.test) == 360 and len(splits.val) + len(splits.train) == 1437
    assert set(splits.val.indices).isdisjoint(splits.train.indices)
    base = splits.train.dataset.labels
    val_counts = torch.bincount(base[splits.val.indices], minlength=10)
    all_counts = torch.bincount(base, minlength=10)
    assert ((val_counts - 0.2 * all_counts).abs() <= 1).all()  # 20% of every class, to the nearest image
    assert splits.val.dataset.images.data_ptr() == splits.train.dataset.images.data_ptr()  # a view, no copy
    again = build_datasets(cfg, 16)
    assert again.val.indices == splits.val.indices  # seeded by data.split_seed, not by the training seed
    image, _ = splits.val[0]
    evaluated = splits.test.transform(splits.val.dataset.images[splits.val.indices[0]])
    assert torch.equal(image, evaluated)  # the validation images get the eval transform, not the train one


@pytest.mark.parametrize(("size", "world"), [(1000, 1), (1000, 3), (1_281_167, 8), (5000, 6), (300, 7)])
def test_a_repeated_epoch_is_cut_as_deits_rasampler(size: int, world: int) -> None:
    """Each rank gets floor(N // 256 * 256 / W) positions, as DeiT's RASampler (samplers.py) and timm's
    RepeatAugSampler (checked against timm's); the k copies of an image still land on k different ranks."""
    from timm.data.distributed_sampler import RepeatAugSampler

    ranks = [ShardedEpochSampler(size, 0, r, world, batch_size=32, repeats=3) for r in range(world)]
    theirs = [RepeatAugSampler(range(size), num_replicas=world, rank=r, num_repeats=3) for r in range(world)]
    assert [len(s) for s in ranks] == [len(t) for t in theirs] == [size // 256 * 256 // world] * world
    assert repeated_epoch_length(size, world) == size // 256 * 256 // world * world


def test_an_epoch_smaller_than_256_images_keeps_its_size() -> None:
    """timm falls back to ceil(N / W) per rank below 256 images (DeiT's RASampler would give none); vitrain keeps N."""
    assert len(EpochSampler(200, repeats=3)) == repeated_epoch_length(200, 4) == 200


def test_every_experiment_has_a_card() -> None:
    assert sorted(CARDS) == sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(CARDS))
def test_the_recipe_holds_to_its_card(name: str) -> None:
    """Every row of the card: the composed config's value (or the number resolved at the source's run) is the
    source's value, or, where vitrain deliberately differs, the value the card records with its reason."""
    card = CARDS[name]
    cfg = to_config(compose(list(card.overrides)))
    resolved = resolve(cfg, card.run)
    for knob in card.knobs:
        assert knob.ours == SAME or knob.why, (name, knob)  # a difference always says why
        if knob.key is None:
            continue
        expected = knob.source if knob.ours == SAME else knob.ours
        got = value(cfg, resolved, knob.key)
        assert got == (pytest.approx(expected, rel=1e-9) if isinstance(expected, float) else expected), (name, knob)


def test_the_docs_show_every_card() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "finetuning.md").read_text()
    for name, card in CARDS.items():
        assert render(name, card) in docs, f"docs/finetuning.md: paste the card of {name} (recipe_cards.render)"


@pytest.mark.parametrize("epochs", [300, 800])
def test_the_per_step_schedule_stays_near_deits_per_epoch_one(epochs: int) -> None:
    """The card's numbers for stepping every optimizer step instead of DeiT's per-epoch timm scheduler (driven
    as main.py drives it: ``step(epoch)`` after each epoch): equal first rate, at most 40% of the peak apart in
    warmup, and after warmup at most 1.1% (300 epochs) or 0.4% (800 epochs)."""
    from timm.scheduler import CosineLRScheduler

    peak, steps = 1e-3, 20  # steps per epoch
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    theirs = CosineLRScheduler(opt, t_initial=epochs, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5, t_in_epochs=True)
    sched = SchedulerConfig("cosine", warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    floor, start = sched.ratios(peak)
    ours = partial(lr_factor, total_steps=epochs * steps, warmup_steps=5 * steps, min_ratio=floor, warmup_start=start)
    rates, gaps = [], []
    for epoch in range(epochs):
        rates.append(opt.param_groups[0]["lr"])  # the rate this epoch trains at
        gaps.append(max(abs(rates[-1] - peak * ours(epoch * steps + s)) for s in range(steps)) / peak)
        theirs.step(epoch)
    assert rates[0] == rates[1] == pytest.approx(peak * ours(0)) == pytest.approx(1e-6)  # DeiT: epochs 0 and 1
    assert max(gaps[:6]) <= 0.40 + 1e-9 and max(gaps[6:]) <= {300: 0.011, 800: 0.004}[epochs]


def test_a_distilled_deit_without_a_teacher_says_how_its_heads_train(caplog: pytest.LogCaptureFixture) -> None:
    """deit_recipe trains the plain DeiT-S (README_deit.md); a distilled one with distill=none is told apart."""
    with caplog.at_level("INFO", logger="vitrain.config"):
        assert to_config(compose(["experiment=deit_recipe"])).model.name == "deit_small_patch16_224"
        assert "distillation head" not in caplog.text
        to_config(compose(["experiment=deit_recipe", "model=deit_small"]))
    assert "both heads learn the labels" in caplog.text and "model=deit_small_plain" in caplog.text


def _vit_jax_rate(step: int, total: int = 10_000, warmup: int = 500) -> float:
    """google-research/vision_transformer vit_jax/utils.py ``create_learning_rate_schedule`` ('cosine', base 1):
    cosine over the steps after warmup, times ``min(1, step / warmup_steps)``."""
    progress = min(max((step - warmup) / (total - warmup), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * min(1.0, step / warmup)


def test_the_vit_fine_tuning_schedule_is_vit_jaxs() -> None:
    """finetune_cifar10's factor (500 warmup steps from 0, cosine to 0) is vit_jax's at every one of the source's
    10,000 steps when run as long; over its own 9,984 steps (104 whole epochs) it stays within 0.16% of the peak."""
    cfg = to_config(compose(["experiment=finetune_cifar10"]))
    got = resolve(cfg, CARDS["finetune_cifar10"].run)
    floor, start = cfg.scheduler.ratios(got["lr"])
    ours = partial(lr_factor, warmup_steps=got["peak_step"], min_ratio=floor, warmup_start=start)
    assert all(ours(s, 10_000) == pytest.approx(_vit_jax_rate(s), abs=1e-12) for s in range(10_001))
    assert max(abs(ours(s, got["steps"]) - _vit_jax_rate(s)) for s in range(got["steps"])) < 0.0016


def test_deit3_learning_rate_is_not_scaled_by_the_batch() -> None:
    """--unscale-lr: 4e-3 at 64 images a step on one process as at 2048 on eight."""
    cfg = to_config(compose(["experiment=deit3_recipe"]))
    assert [resolve(cfg, Run(b, w, 10_000))["lr"] for b, w in [(64, 1), (2048, 8)]] == [4e-3, 4e-3]


@pytest.mark.parametrize("policy", ["v0", "original", "rand-m9-mstd0.5-inc1"])
def test_low_posterize_levels_do_not_break_a_run(policy: str) -> None:
    """timm's Posterize at low levels keeps 0 bits, which Pillow >= 10 refuses; 400 draws (each sub-policy
    and level many times) all run."""
    from vitrain.data.transforms import augmentation_policy

    random.seed(0)
    augment = augmentation_policy(policy, 16, MEAN, "bicubic")[1]
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert all(augment(image).size == (16, 16) for _ in range(400))
