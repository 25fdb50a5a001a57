"""The ``loss`` group's schema; the losses are :mod:`vitrain.losses`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitrain.errors import ConfigError

LOSSES = ("ce", "bce")


@dataclass
class LossConfig:
    """The ``loss`` group: the classification loss (distillation, the ``distill`` group, adds to it)."""

    name: str = "ce"  # ce: cross-entropy (soft-target under mixup/cutmix) | bce: per-class binary cross-entropy
    label_smoothing: float = 0.0  # label smoothing (folded into the mixup targets when mixing)
    bce_target_thresh: float | None = None  # bce only: targets above it become 1, the others 0 (null: kept soft)

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ConfigError(f"unknown loss '{self.name}' (loss.name); choose one of {', '.join(LOSSES)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.bce_target_thresh is not None and self.name != "bce":
            raise ConfigError(f"loss.bce_target_thresh applies to loss.name=bce only, not {self.name}; "
                              f"set loss=bce or loss.bce_target_thresh=null")
        if self.bce_target_thresh is not None and not 0 <= self.bce_target_thresh < 1:
            raise ConfigError(f"loss.bce_target_thresh must be in [0, 1) or null, got {self.bce_target_thresh}")
