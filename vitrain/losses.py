"""Training losses, all called as ``loss(inputs, outputs, labels)``.

The inputs are passed so that a loss can run a teacher on them (see :mod:`vitrain.distill`); one
training loop then serves plain fine-tuning and distillation. :class:`LossConfig` is the schema of the
``loss`` config group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitrain.errors import ConfigError

LOSSES = ("ce",)


@dataclass
class LossConfig:
    """The ``loss`` group: the classification loss (distillation, the ``distill`` group, adds to it)."""

    name: str = "ce"  # ce: cross-entropy (soft-target cross-entropy under mixup/cutmix)
    label_smoothing: float = 0.0  # cross-entropy label smoothing (folded into the mixup targets when mixing)

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ConfigError(f"unknown loss '{self.name}' (loss.name); choose one of {', '.join(LOSSES)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")


class ClassificationLoss(nn.Module):
    """Cross-entropy with optional label smoothing; soft targets (B, classes) from mixup/cutmix, which
    are already smoothed by the mixing, get plain soft-target cross-entropy.

    A model with two heads (DeiT in training mode returns ``(cls_logits, dist_logits)``) gets the
    mean of both heads' losses, so that neither head is left untrained.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor
    ) -> torch.Tensor:
        heads = outputs if isinstance(outputs, tuple) else (outputs,)
        smoothing = 0.0 if labels.is_floating_point() else self.label_smoothing
        losses = [F.cross_entropy(h, labels, label_smoothing=smoothing) for h in heads]
        return torch.stack(losses).mean()
