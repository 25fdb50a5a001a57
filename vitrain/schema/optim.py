"""The ``optimizer`` and ``scheduler`` groups' schemas; the optimizers and schedules are :mod:`vitrain.optim`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vitrain.errors import ConfigError

SCHEDULES = ("cosine", "step", "constant")


@dataclass
class OptimizerConfig:
    """The ``optimizer`` group: the optimizer and its settings over the backbone/head parameter groups."""

    name: str = "adamw"  # adamw | sgd | lamb | lion | any name of timm.optim.list_optimizers()
    lr: float = 1e-3  # learning rate of the head (and of the whole model when backbone_lr is null)
    backbone_lr: float | None = None  # learning rate of everything but the head; null: lr
    weight_decay: float = 0.05  # AdamW, LAMB, Lion: on the update; SGD: L2 on the gradient; never biases, norms, tokens
    betas: list[float] | None = None  # Adam/LAMB/Lion moment decay rates (3 for adan); null: the optimizer's own
    momentum: float = 0.9  # momentum of sgd and the others that take one (lars, rmsprop, ...); ignored by the rest
    nesterov: bool | None = None  # Nesterov momentum; null: the name decides (timm: sgd yes, momentum no)
    eps: float | None = None  # the optimizer's epsilon; null: its own default
    scale_lr: bool = False  # lr and backbone_lr x global batch / lr_base_batch (DeiT); off (and no base): lr as given
    lr_base_batch: int | None = None  # the batch that lr is given for when scaling (null: 512); setting it scales
    layer_decay: float | None = None  # layer-wise lr decay (e.g. 0.65): block k below the top gets layer_decay^k

    def __post_init__(self) -> None:
        for key in ("lr", "backbone_lr", "eps"):
            value = getattr(self, key)
            if value is not None and not value > 0:  # NaN too
                raise ConfigError(f"optimizer.{key} must be positive, got {value}")
            if value is not None and math.isinf(value):
                raise ConfigError(f"optimizer.{key} must be a finite number, got {value}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"optimizer.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if self.lr_base_batch is not None and self.lr_base_batch <= 0:
            raise ConfigError(f"optimizer.lr_base_batch must be positive (or null), got {self.lr_base_batch}")

    def lr_scale(self, global_batch: int) -> float:
        """With ``scale_lr`` (or an ``lr_base_batch``), the learning rates scale linearly with the images
        per optimizer step of all processes together (DeiT: lr x global batch / 512)."""
        if not (self.scale_lr or self.lr_base_batch):
            return 1.0
        return global_batch / (self.lr_base_batch or 512)


@dataclass
class SchedulerConfig:
    """The ``scheduler`` group: linear warmup, then cosine, step or constant, stepped every optimizer step.

    ``warmup_lr`` and ``min_lr`` are absolute rates of the group at ``optimizer.lr`` (after batch scaling); the
    other groups (``backbone_lr``, ``layer_decay``) get the same multipliers. ``min_lr`` takes precedence over
    ``min_lr_ratio``."""

    name: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0  # length of the linear warmup, in epochs (fractions allowed)
    warmup_lr: float | None = None  # absolute rate of the first step (DeiT's --warmup-lr); null: 1/W of the peak
    min_lr_ratio: float = 0.0  # cosine and step: the floor, as a fraction of each group's base learning rate
    min_lr: float | None = None  # cosine and step: absolute floor (DeiT's --min-lr); set, it replaces min_lr_ratio
    decay_epochs: float = 1.0  # step: epochs between decays
    decay_rate: float = 0.1  # step: factor applied at each decay

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"unknown scheduler '{self.name}' (scheduler.name); choose one of {', '.join(SCHEDULES)}")
        if not self.warmup_epochs >= 0:
            raise ConfigError(f"scheduler.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.decay_epochs > 0 or not 0 < self.decay_rate <= 1:
            raise ConfigError(f"scheduler.decay_epochs must be positive and scheduler.decay_rate in (0, 1], got "
                              f"{self.decay_epochs} and {self.decay_rate}")
        for key in ("min_lr", "warmup_lr"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ConfigError(f"scheduler.{key} must be >= 0 (or null), got {value}")

    def ratios(self, peak_lr: float) -> tuple[float, float | None]:
        """The floor and the warmup start as multipliers of ``peak_lr`` (the optimizer.lr group's rate after
        batch scaling): ``min_lr`` when set, else ``min_lr_ratio``; ``warmup_lr`` / peak, or None (1/W)."""
        for key in ("min_lr", "warmup_lr"):
            value = getattr(self, key)
            if value is not None and value > peak_lr:
                raise ConfigError(f"scheduler.{key}={value:g} is above the peak learning rate {peak_lr:g} "
                                  f"(optimizer.lr after batch scaling); lower it or raise the learning rate")
        floor = self.min_lr_ratio if self.min_lr is None else self.min_lr / peak_lr
        return floor, None if self.warmup_lr is None else self.warmup_lr / peak_lr
