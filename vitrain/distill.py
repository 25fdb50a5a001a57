"""The training criterion chosen by the ``distill`` config group.

``distill=none`` is plain supervised training with :class:`vitrain.losses.ClassificationLoss`.
"""

from __future__ import annotations

from torch import nn

from vitrain.errors import ConfigError
from vitrain.losses import ClassificationLoss

DISTILL_MODES = ("none",)


def build_criterion(mode: str = "none", label_smoothing: float = 0.0) -> nn.Module:
    """The loss for ``distill.name``: called as ``criterion(inputs, outputs, labels)``."""
    if mode != "none":
        raise ConfigError(f"unknown distillation mode '{mode}' (distill.name); choose one of {DISTILL_MODES}")
    return ClassificationLoss(label_smoothing)
