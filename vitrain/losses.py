"""Training losses, all called as ``loss(inputs, outputs, labels)``.

The inputs are passed so that a loss can run a teacher on them (see :mod:`vitrain.distill`); one
training loop then serves plain fine-tuning and distillation. :class:`LossConfig` is the schema of the
``loss`` config group, :func:`build_base_loss` the loss it names.

``bce`` is the binary cross-entropy of DeiT III and timm's ``--bce-loss``: every class is a separate
sigmoid, against targets t (one-hot, smoothed, or mixup/cutmix's soft targets), averaged over the batch
and the classes: mean of -[t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy
from torch import nn

from vitrain.schema.losses import LOSSES, LossConfig  # noqa: F401


def _heads(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One model output, or the tuple of a two-headed model (DeiT in training: cls and dist logits)."""
    return outputs if isinstance(outputs, tuple) else (outputs,)


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
        smoothing = 0.0 if labels.is_floating_point() else self.label_smoothing
        losses = [F.cross_entropy(h, labels, label_smoothing=smoothing) for h in _heads(outputs)]
        return torch.stack(losses).mean()


class BinaryCrossEntropyLoss(nn.Module):
    """timm's :class:`~timm.loss.BinaryCrossEntropy` (DeiT III, ``--bce-loss``), called as the other losses.

    Class indices become one-hot targets with label smoothing s over C classes: s / C off, 1 - s + s / C on.
    Soft targets (B, classes) from mixup/cutmix are used as they are (the mixing already smoothed them).
    ``target_thresh``: targets above it become 1, the others 0. The logits are taken in float32 (so are
    the targets built from them); two heads give the mean of both heads' losses, as :class:`ClassificationLoss`.
    """

    def __init__(self, label_smoothing: float = 0.0, target_thresh: float | None = None) -> None:
        super().__init__()
        self.label_smoothing, self.target_thresh = label_smoothing, target_thresh
        self.bce = BinaryCrossEntropy(smoothing=label_smoothing, target_threshold=target_thresh)

    def forward(
        self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor
    ) -> torch.Tensor:
        losses = [self.bce(h.float(), labels) for h in _heads(outputs)]
        return torch.stack(losses).mean()


def build_base_loss(cfg: LossConfig) -> nn.Module:
    """The classification loss of the ``loss`` group, called as ``loss(inputs, outputs, labels)``."""
    if cfg.name == "bce":
        return BinaryCrossEntropyLoss(cfg.label_smoothing, cfg.bce_target_thresh)
    return ClassificationLoss(cfg.label_smoothing)
