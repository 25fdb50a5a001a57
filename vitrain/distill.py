"""Teacher-student distillation (Touvron et al., 2021, "Training data-efficient image transformers").

The criterion is chosen by the ``distill`` config group and called as ``criterion(inputs, outputs,
labels)``; the distillation loss runs the teacher on the same (possibly mixed) inputs inside the loss,
so fine-tuning and distillation share one training loop. With ``z_cls``, ``z_dist`` the student's
two outputs (a plain model's one output serves as both) and ``z_t`` the teacher's:

    base = CE(z_cls, y), or BCE with loss=bce           (soft targets under mixup/cutmix)
    hard: kd = CE(z_dist, argmax z_t)
    soft: kd = KL(softmax(z_t / tau) || softmax(z_dist / tau)) * tau^2
    loss = (1 - alpha) * base + alpha * kd

:class:`DistillConfig` is the schema of the ``distill`` config group.

The teacher sees what it was trained on (:func:`resolve_teacher`, before any data is read): its normalization
mean/std and input size are ``distill.teacher.mean``/``std``/``img_size`` where set, else its own weights' (the
``preprocess`` of a vitrain checkpoint, timm's ``pretrained_cfg`` of its tag, torchvision's weights, a hub folder's
config.json), else the student's; a teacher whose weights record no normalization (a plain state dict, random
weights) gets the student's, and the log line says so. :class:`TeacherInputs` turns the student's batch into the
teacher's on the device: de-normalized, re-normalized with the teacher's values, resized to its size.

The soft KL is summed over classes and divided by the batch size (``reduction="batchmean"``, as timm
and PyTorch's KLDivLoss recommend), or divided by the number of logits, batch x classes
(``reduction="numel"``, as DeiT's reference code does: that is the batchmean value / classes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitrain.errors import ConfigError
from vitrain.losses import ClassificationLoss, LossConfig, build_base_loss
from vitrain.schema.distill import DISTILL_MODES, REDUCTIONS, DistillConfig, TeacherConfig  # noqa: F401

log = logging.getLogger(__name__)

def soft_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, tau: float, reduction: str = "batchmean"
) -> torch.Tensor:
    """KL(softmax(teacher / tau) || softmax(student / tau)) * tau^2, reduced per ``reduction``."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"unknown distill.reduction '{reduction}'; choose one of {', '.join(REDUCTIONS)}")
    kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                  reduction="sum", log_target=True)
    return kl * tau * tau / (student.shape[0] if reduction == "batchmean" else student.numel())


def hard_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's top-1 class."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


class TeacherInputs(nn.Module):
    """Turn the student's normalised batch into the teacher's: undo the student's normalisation,
    apply the teacher's, and resize to the teacher's input size (bicubic). Identity when they agree."""

    def __init__(
        self, student_mean: Sequence[float], student_std: Sequence[float], teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None, size: int | None = None,
    ) -> None:
        super().__init__()
        t_mean, t_std = teacher_mean or student_mean, teacher_std or student_std
        scale = torch.tensor(student_std) / torch.tensor(t_std)  # x_t = x_s * scale + shift
        shift = (torch.tensor(student_mean) - torch.tensor(t_mean)) / torch.tensor(t_std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)
        self.renormalise = list(t_mean) != list(student_mean) or list(t_std) != list(student_std)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            x = x * self.scale + self.shift
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return x


class DistillationLoss(nn.Module):
    """DeiT's loss: the student's base loss plus a hard or soft distillation term from a frozen teacher.

    The teacher runs in eval mode under ``no_grad`` (and the trainer's autocast); its parameters
    never change. ``teacher_seconds`` accumulates the teacher's forward time, for its share of a step
    (on CUDA measured with events and read only when asked for, so timing adds no host sync per step).
    """

    def __init__(
        self, base: nn.Module, teacher: nn.Module, mode: str = "hard", alpha: float = 0.5, tau: float = 1.0,
        reduction: str = "batchmean", teacher_inputs: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("hard", "soft"):
            raise ConfigError(f"unknown distillation mode '{mode}' (distill.name); choose one of {DISTILL_MODES}")
        if not 0 <= alpha <= 1 or tau <= 0:
            raise ConfigError(f"distill.alpha must be in [0, 1] and distill.tau positive, got {alpha} and {tau}")
        self.base, self.mode, self.alpha, self.tau, self.reduction = base, mode, alpha, tau, reduction
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_inputs = teacher_inputs or nn.Identity()
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA timings not yet read

    @property
    def teacher_seconds(self) -> float:
        """Total time of the teacher's forward passes so far."""
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000
            self._events.clear()
        return self._seconds

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        self.teacher.eval()  # the teacher stays in inference mode (dropout, batch norm statistics)
        return self

    def forward(
        self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        z_cls, z_dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = self.base(inputs, z_cls, labels)
        z_t = self._teacher_logits(inputs)
        z_dist = z_dist.float()
        if self.mode == "hard":
            kd = hard_distillation_loss(z_dist, z_t)
        else:
            kd = soft_distillation_loss(z_dist, z_t, self.tau, self.reduction)
        return (1 - self.alpha) * base + self.alpha * kd


    def _teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            begin = time.perf_counter()
        with torch.no_grad():
            z_t = self.teacher(self.teacher_inputs(inputs)).float()
        if inputs.is_cuda:
            end.record()
            self._events.append((start, end))
        else:
            self._seconds += time.perf_counter() - begin
        return z_t


def resolve_teacher(cfg: TeacherConfig, student_mean: Sequence[float], student_std: Sequence[float],
                    student_size: int) -> tuple[TeacherConfig, str]:
    """``cfg`` (a copy) with ``mean``, ``std`` and ``img_size`` set, and a line saying each and where it came from:
    set in the config, else the teacher's own weights' (its checkpoint's, else its pretrained weights':
    :func:`~vitrain.models.weights.weights_preprocess`), else the student's (``data.mean``/``std``,
    ``model.img_size``). A teacher whose weights record no normalization gets the student's, and the line says so
    and names the keys to set. Reads no weights (only what they record), so it runs before any data is read;
    a resolved config resolves to itself. A teacher without a name (``distill=none``) is returned as it is."""
    if not cfg.name:
        return cfg, ""
    from vitrain.models.weights import weights_preprocess

    weights = weights_preprocess(cfg.source, cfg.name, cfg.pretrained, cfg.checkpoint).values
    student = {"img_size": (student_size, "model.img_size"), "mean": (list(student_mean), "data.mean"),
               "std": (list(student_std), "data.std")}
    chosen: dict[str, tuple[object, str]] = {}
    for key, (fallback, student_key) in student.items():
        for value, source in ((getattr(cfg, key), "set"), (weights.get(key), "the teacher's weights'"),
                              (fallback, f"the student's {student_key}")):
            if value is not None:
                chosen[key] = (list(value) if isinstance(value, list | tuple) else value, source)
                break
    said = ", ".join(f"distill.teacher.{key}={value} ({source})" for key, (value, source) in chosen.items())
    line = f"distillation teacher {cfg.name}: {said}"
    if any(chosen[key][1].startswith("the student's") for key in ("mean", "std")):
        origin = (f"its checkpoint {cfg.checkpoint}" if cfg.checkpoint else
                  "its pretrained weights" if cfg.pretrained else "its random weights")
        line += (f"; {origin} record no normalization, so the teacher gets the student's: set "
                 f"distill.teacher.mean=[...] distill.teacher.std=[...] to the values it was trained with")
    return dataclasses.replace(cfg, **{key: value for key, (value, _) in chosen.items()}), line


def build_teacher(cfg: TeacherConfig, num_classes: int, img_size: int, device: torch.device,
                  channels_last: bool | str = "auto") -> nn.Module:
    """The frozen teacher of ``distill.teacher`` on ``device``, with a ``num_classes`` classifier: a checkpoint
    whose classifier has another size is refused (the teacher must know the student's classes)."""
    from vitrain.models import create_model
    from vitrain.models.convert import load_pretrained
    from vitrain.runtime import use_channels_last

    teacher = create_model(cfg.name, num_classes=num_classes, img_size=cfg.img_size or img_size, source=cfg.source,
                           pretrained=cfg.pretrained)
    if cfg.checkpoint and load_pretrained(teacher, cfg.checkpoint).reinitialized:
        raise ConfigError(f"the teacher checkpoint {cfg.checkpoint} has a classifier for another number of "
                          f"classes than the student's data ({num_classes}); give a teacher trained on these classes")
    if not (cfg.checkpoint or cfg.pretrained):
        log.warning("the teacher %s has random weights: set distill.teacher.checkpoint=PATH", cfg.name)
    teacher = teacher.to(device)
    if use_channels_last(channels_last, teacher, device):
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher


def build_criterion(
    mode: str = "none", loss: LossConfig | nn.Module | float = 0.0, teacher: nn.Module | None = None,
    alpha: float = 0.5, tau: float = 1.0, reduction: str = "batchmean", teacher_inputs: nn.Module | None = None,
) -> nn.Module:
    """The loss for ``distill.name``: called as ``criterion(inputs, outputs, labels)``.

    ``loss``: the base loss, as the ``loss`` group's :class:`LossConfig`, a loss module called as
    ``loss(inputs, outputs, labels)``, or a number: the label smoothing of cross-entropy."""
    if isinstance(loss, nn.Module):
        base = loss
    elif isinstance(loss, LossConfig):
        base = build_base_loss(loss)
    else:
        base = ClassificationLoss(float(loss))
    if mode == "none":
        return base
    if teacher is None:
        raise ConfigError(f"distill={mode} needs a teacher: set distill.teacher.name (and its checkpoint)")
    return DistillationLoss(base, teacher, mode, alpha, tau, reduction, teacher_inputs)
