"""Train and eval transforms of the classic ViT fine-tuning recipe, from torchvision.transforms.v2.

They accept PIL images (image folders) and uint8 CHW tensors (in-memory data sets) alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2


def build_transforms(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    crop_padding: int = 4,
    hflip: bool = True,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """Train: resize, random crop with padding, optional horizontal flip, normalize.
    Eval: resize, center crop, normalize."""
    mode = InterpolationMode(interpolation)
    ops: list[v2.Transform] = [v2.ToImage(), v2.Resize(img_size, interpolation=mode, antialias=True)]
    if train:
        ops.append(v2.RandomCrop(img_size, padding=crop_padding or None))
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        ops.append(v2.CenterCrop(img_size))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(ops)
