"""Where and how the numbers run: seeds, autocast precision, memory layout."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from vitrain.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision``; ``auto`` is bf16 on CUDA and fp32 on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown trainer.precision '{precision}'; choose auto, fp32, bf16 or fp16")
    return PRECISIONS[precision]


def is_cnn(model: nn.Module) -> bool:
    """A convolutional network (more than a patch-embedding convolution): it gains from channels_last."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(setting: bool | str, model: nn.Module, device: torch.device) -> bool:
    """``trainer.channels_last``: auto means CNNs on CUDA, where cuDNN's NHWC kernels are faster."""
    if setting == "auto":
        return device.type == "cuda" and is_cnn(model)
    if not isinstance(setting, bool):
        raise ConfigError(f"trainer.channels_last must be auto, true or false, got {setting}")
    return setting
