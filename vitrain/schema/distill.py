"""The ``distill`` group's schema (the teacher's, ``distill.teacher``); the losses are :mod:`vitrain.distill`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vitrain.errors import ConfigError

DISTILL_MODES = ("none", "hard", "soft")


REDUCTIONS = ("batchmean", "numel")


@dataclass
class TeacherConfig:
    """``distill.teacher``: the frozen model whose outputs the student also learns from."""

    source: str = "timm"  # where the teacher comes from: vitrain | timm | torchvision
    name: str | None = None  # the teacher's architecture, e.g. resnet18 (a timm name) or a vitrain model name
    checkpoint: str | None = None  # its weights: a vitrain run's checkpoints/best.pt, or a timm/torchvision/DeiT file
    pretrained: bool = False  # ImageNet weights from the hub instead (needs network; the head must fit the task)
    img_size: int | None = None  # the teacher's input size (the batch is resized to it); null: the size its weights
    #   were trained at, else the student's
    mean: list[float] | None = None  # the teacher's normalization mean; null: its weights' own, else the student's
    std: list[float] | None = None  # the teacher's normalization std; null: its weights' own, else the student's

    def __post_init__(self) -> None:
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError(f"distill.teacher.img_size must be positive (or null), got {self.img_size}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ConfigError(f"distill.teacher.mean and distill.teacher.std need one value per channel each, got "
                              f"{self.mean} and {self.std}")
        if self.std is not None and not all(s > 0 for s in self.std):  # the teacher's normalization divides by it
            raise ConfigError(f"distill.teacher.std must be positive in every channel, got {list(self.std)}")


@dataclass
class DistillConfig:
    """The ``distill`` group: none, or DeiT's hard or soft distillation from a teacher."""

    name: str = "none"  # none | hard | soft
    alpha: float = 0.5  # weight of the distillation term: (1 - alpha) * base loss + alpha * distillation loss
    tau: float = 1.0  # temperature of the soft targets (soft only; DeiT: 1.0)
    reduction: str = "batchmean"  # soft KL divided by the batch (timm) | numel: by batch x classes (DeiT's code)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self) -> None:
        if self.name not in DISTILL_MODES:
            raise ConfigError(f"unknown distillation mode '{self.name}' (distill.name); "
                              f"choose one of {', '.join(DISTILL_MODES)}")
        if not 0 <= self.alpha <= 1 or not self.tau > 0:
            raise ConfigError(f"distill.alpha must be in [0, 1] and distill.tau positive, got {self.alpha} "
                              f"and {self.tau}")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"unknown distill.reduction '{self.reduction}'; choose one of {', '.join(REDUCTIONS)}")
        if self.name != "none" and not self.teacher.name:
            raise ConfigError(f"distill.teacher.name has no value; set it on the command line "
                              f"(distill.teacher.name=..., and distill.teacher.checkpoint=PATH): distill={self.name} "
                              f"needs a teacher")
