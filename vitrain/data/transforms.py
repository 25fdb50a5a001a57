"""Train and eval transforms of the ViT/DeiT fine-tuning recipe, from torchvision.transforms.v2 and timm.

They accept PIL images (image folders) and uint8 CHW tensors (in-memory data sets) alike. The train
pipeline follows timm's ``create_transform``: resize/crop/flip -> colour jitter or RandAugment ->
float + normalize -> random erasing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.data import transforms as timm_transforms
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import ResizeKeepRatio, str_to_pil_interp
from torchvision.transforms import InterpolationMode, v2

from vitrain.data.config import AUTO_AUGMENT, CROP_MODES, POLICY_FAMILIES, TRIVIAL_AUGMENT, check_policy  # noqa: F401
from vitrain.errors import ConfigError


def check_re_prob(re_prob: float) -> None:
    """``data.re_prob``, the random-erasing probability, for the per-image and the batched paths alike."""
    if not 0 <= re_prob <= 1:
        raise ConfigError(f"data.re_prob is a probability: set it in [0, 1] (0 disables), got {re_prob}")


def build_transforms(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    crop_padding: int = 4,
    hflip: bool = True,
    interpolation: str = "bilinear",
    *,
    auto_augment: str | None = None,
    color_jitter: float = 0.0,
    re_prob: float = 0.0,
    train_crop: str = "pad",
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    crop_pct: float = 1.0,
    crop_mode: str = "center",
) -> v2.Compose:
    """Train: ``train_crop`` ``pad`` (resize, random crop of the zero-padded image: the CIFAR recipe) or
    ``rrc`` (RandomResizedCrop over ``scale`` x ``ratio``: the ImageNet recipe), optional horizontal flip,
    then an augmentation policy (``auto_augment``) and/or colour jitter, normalize, random erasing (``re_prob``).
    Eval, as timm's ``create_transform``: the resize and crop of ``crop_mode`` (:func:`eval_crop`), normalize.
    The geometric steps run on what comes in (PIL images from folders, uint8 tensors from in-memory sets), so a
    PIL image is resized by PIL, as in timm.

    As in timm, colour jitter is off under a policy, except DeiT III's ``3a``, which pairs with it."""
    if color_jitter < 0:
        raise ConfigError(f"data.color_jitter must be >= 0 (0 disables), got {color_jitter}")
    check_re_prob(re_prob)
    mode = InterpolationMode(interpolation)
    if not train:
        return v2.Compose([*eval_crop(img_size, crop_pct, crop_mode, interpolation, mean), v2.ToImage(),
                           *_to_normalized(mean, std)])
    ops = [*_train_crop(img_size, mode, train_crop, crop_padding, scale, ratio),
           *([v2.RandomHorizontalFlip()] if hflip else []), v2.ToImage()]
    if auto_augment:
        ops += augmentation_policy(auto_augment, img_size, mean, interpolation)
    if color_jitter > 0 and (not auto_augment or "3a" in auto_augment):  # timm --color-jitter: no hue
        ops.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    ops += _to_normalized(mean, std)
    if re_prob > 0:
        # timm's RandomErasing, mode "pixel" (per-pixel N(0, 1) noise in normalized space), is DeiT's own
        # (--reprob 0.25 --remode pixel) and draws from Python's `random` like timm's RandAugment.
        ops.append(RandomErasing(re_prob, mode="pixel", device="cpu"))
    return v2.Compose(ops)


def eval_crop(img_size: int, crop_pct: float, crop_mode: str, interpolation: str,
              mean: Sequence[float]) -> list[Callable]:
    """timm's evaluation resize and crop (``transforms_imagenet_eval``) to ``img_size`` from side S =
    ``floor(img_size / crop_pct)``: ``center``: the shorter side to S, center crop; ``squash``: both sides to S
    (the aspect ratio is lost), center crop; ``border``: the longer side to S (timm's ``ResizeKeepRatio``), center
    crop or pad with the mean colour (timm's ``CenterCropOrPad``). For PIL images and uint8 (..., C, H, W) tensors
    alike: a batch of images of one size gets each image's own result."""
    if crop_mode not in CROP_MODES:
        raise ConfigError(f"unknown data.crop_mode '{crop_mode}'; choose one of {', '.join(CROP_MODES)}")
    side, mode = math.floor(img_size / crop_pct), InterpolationMode(interpolation)
    if crop_mode == "border":
        resize = ResizeKeepRatio(side, longest=1.0)
        resize.interpolation = mode  # set after: timm's names lack torchvision's nearest-exact
        return [resize, CenterCropOrPad(img_size, fill=[round(255 * m) for m in mean])]
    size = [side, side] if crop_mode == "squash" else side  # a number: the shorter side
    return [v2.Resize(size, interpolation=mode, antialias=True), v2.CenterCrop(img_size)]


class CenterCropOrPad(timm_transforms.CenterCropOrPad):
    """timm's ``CenterCropOrPad``, also for tensors padded with a colour: torchvision pads a tensor with one
    value, so each channel of a tensor goes through timm's function with its own fill."""

    def forward(self, img: Any) -> Any:
        if not isinstance(img, torch.Tensor) or isinstance(self.fill, int | float):
            return super().forward(img)
        planes = [timm_transforms.center_crop_or_pad(img[..., c, :, :], self.size, fill=fill,
                                                     padding_mode=self.padding_mode)
                  for c, fill in enumerate(self.fill)]
        return torch.stack(planes, -3)


def _train_crop(img_size: int, mode: InterpolationMode, train_crop: str, crop_padding: int, scale: Sequence[float],
                ratio: Sequence[float]) -> list[Callable]:
    """``rrc``: RandomResizedCrop; ``pad``: resize, then a random crop of the zero-padded image."""
    if train_crop == "rrc":
        return [v2.RandomResizedCrop(img_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=mode,
                                     antialias=True)]
    return [v2.Resize(img_size, interpolation=mode, antialias=True),
            v2.RandomCrop(img_size, padding=crop_padding or None)]


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def augmentation_policy(policy: str, img_size: int, mean: Sequence[float], interpolation: str) -> list[Callable]:
    """The policy ``policy`` names, built by timm (RandAugment ``rand-...``, AugMix ``augmix-...``,
    AutoAugment ``original``/``v0``/..., DeiT III's ``3a``) with the hparams timm's create_transform gives
    it, or by torchvision (``trivialaugment``). timm's policies work on PIL images: the image goes to PIL
    and back (lossless, uint8)."""
    check_policy(policy)
    if policy in TRIVIAL_AUGMENT:
        return [v2.TrivialAugmentWide(interpolation=InterpolationMode(interpolation))]
    hparams = dict(
        translate_const=int(img_size * 0.45),
        img_mean=tuple(min(255, round(255 * m)) for m in mean),  # fill colour of rotations and shears
        interpolation=str_to_pil_interp(interpolation),
    )
    try:
        if policy.startswith("rand"):
            augment = rand_augment_transform(policy, hparams)
        elif policy.startswith("augmix"):
            augment = augment_and_mix_transform(policy, {**hparams, "translate_pct": 0.3})
        else:
            augment = auto_augment_transform(policy, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as e:
        raise ConfigError(f"data.auto_augment='{policy}' is not a valid timm policy string; use e.g. "
                          f"{POLICY_FAMILIES}") from e
    _posterize_to_at_least_one_bit(augment)
    return [v2.ToPILImage(), augment, v2.ToImage()]


def _posterize_to_at_least_one_bit(augment: Callable) -> None:
    """timm's low Posterize levels keep 0 bits, which Pillow >= 10 refuses (``bits must be between 1 and
    8``) at random, mid-epoch; keep at least 1 (an image of 1 bit per channel, as near to 0 as Pillow goes)."""
    policy = getattr(augment, "policy", None) or [getattr(augment, "ops", [])]  # AutoAugment | RandAugment, AugMix
    for op in (op for sub in policy for op in sub):
        if op.name.startswith("Posterize"):
            op.aug_fn = lambda img, bits, _fn=op.aug_fn, **kw: _fn(img, max(1, int(bits)), **kw)
