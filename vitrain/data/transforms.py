"""Train and eval transforms of the ViT/DeiT fine-tuning recipe, from torchvision.transforms.v2 and timm.

They accept PIL images (image folders) and uint8 CHW tensors (in-memory data sets) alike. The train
pipeline follows timm's ``create_transform``: resize/crop/flip -> colour jitter or RandAugment ->
float + normalize -> random erasing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import InterpolationMode, v2

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
) -> v2.Compose:
    """Train: resize, random crop with padding, optional horizontal flip, then RandAugment (``auto_augment``)
    or colour jitter, normalize, random erasing (``re_prob``). Eval: resize, center crop, normalize.

    As in timm, colour jitter is off when RandAugment is on: the policy already changes colours."""
    if color_jitter < 0:
        raise ConfigError(f"data.color_jitter must be >= 0 (0 disables), got {color_jitter}")
    check_re_prob(re_prob)
    mode = InterpolationMode(interpolation)
    ops: list[Callable] = [v2.ToImage(), v2.Resize(img_size, interpolation=mode, antialias=True)]
    if not train:
        return v2.Compose([*ops, v2.CenterCrop(img_size), *_to_normalized(mean, std)])
    ops.append(v2.RandomCrop(img_size, padding=crop_padding or None))
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if auto_augment:
        ops += _rand_augment(auto_augment, img_size, mean, interpolation)
    elif color_jitter > 0:  # timm's scalar --color-jitter: brightness, contrast, saturation, no hue
        ops.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    ops += _to_normalized(mean, std)
    if re_prob > 0:
        # timm's RandomErasing, mode "pixel" (per-pixel N(0, 1) noise in normalized space), is DeiT's own
        # (--reprob 0.25 --remode pixel) and draws from Python's `random` like timm's RandAugment.
        ops.append(RandomErasing(re_prob, mode="pixel", device="cpu"))
    return v2.Compose(ops)


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _rand_augment(policy: str, img_size: int, mean: Sequence[float], interpolation: str) -> list[Callable]:
    """timm's RandAugment for ``policy`` (e.g. ``rand-m9-mstd0.5-inc1``) with the hparams timm's
    create_transform gives it; it works on PIL images, so the image goes to PIL and back (lossless, uint8)."""
    if not policy.startswith("rand"):
        raise ConfigError(f"data.auto_augment='{policy}' is not a RandAugment policy; use e.g. rand-m9-mstd0.5-inc1")
    hparams = dict(
        translate_const=int(img_size * 0.45),
        img_mean=tuple(min(255, round(255 * m)) for m in mean),  # fill colour of rotations and shears
        interpolation=str_to_pil_interp(interpolation),
    )
    try:
        augment = rand_augment_transform(policy, hparams)
    except (AssertionError, KeyError, ValueError) as e:
        raise ConfigError(
            f"data.auto_augment='{policy}' is not a valid timm RandAugment policy; use e.g. rand-m9-mstd0.5-inc1"
        ) from e
    return [v2.ToPILImage(), augment, v2.ToImage()]
