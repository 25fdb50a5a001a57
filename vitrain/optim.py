"""Optimizer parameter groups and learning-rate schedules, as pure functions.

Parameter groups: the classifier head and the backbone get their own learning rates (fine-tuning
uses a small one for the pretrained backbone and a large one for the new head), and each splits into
a weight-decayed part and a part without decay (biases, norm weights, tokens, position embeddings).

Schedules are multipliers of each group's own base learning rate, so warmup and the floor scale
with it, stepped once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vitrain.errors import ConfigError


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the classifier head(s): the model's ``head_names`` (vitrain's models and wrapped
    backbones), else timm's ``pretrained_cfg['classifier']``, else ``head``."""
    if getattr(model, "head_names", None):
        return tuple(model.head_names)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _in_module(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def param_groups(
    model: nn.Module,
    lr: float,
    backbone_lr: float | None = None,
    weight_decay: float = 0.05,
    head: Iterable[str] | None = None,
) -> list[dict]:
    """Groups ``backbone``/``head`` x decay/``no_decay`` for a torch optimizer.

    No weight decay for 0-/1-d parameters (biases, LayerNorm) and for the names in
    ``model.no_weight_decay()`` (CLS token, position embedding). Empty groups are dropped.
    ``backbone_lr=None`` trains everything at ``lr``.
    """
    head = tuple(head) if head is not None else classifier_names(model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    rates = {"backbone": lr if backbone_lr is None else backbone_lr, "head": lr}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if _in_module(name, head) else "backbone"
        decay = p.ndim > 1 and name not in skip
        key = part if decay else f"{part}_no_decay"
        group = groups.setdefault(key, {"name": key, "params": [], "lr": rates[part],
                                        "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    backbone_lr: float | None = None,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`."""
    if name != "adamw":
        raise ConfigError(f"unknown optimizer '{name}' (optimizer.name); choose adamw")
    for key, value in (("optimizer.lr", lr), ("optimizer.backbone_lr", backbone_lr)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    return torch.optim.AdamW(param_groups(model, lr, backbone_lr, weight_decay), lr=lr, betas=tuple(betas))


def lr_factor(
    step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, kind: str = "cosine"
) -> float:
    """Multiplier of the base learning rate at 0-based optimizer step ``step``.

    Linear warmup over ``warmup_steps`` (1/W, 2/W, ..., 1), then ``cosine`` decay from 1 to
    ``min_ratio`` at ``total_steps`` or ``constant`` 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES = ("cosine", "constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    name: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A per-step LambdaLR applying :func:`lr_factor` to every group's own base learning rate."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown scheduler '{name}' (scheduler.name); choose one of {', '.join(SCHEDULES)}")
    fn = partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_lr_ratio, kind=name)
    return LambdaLR(optimizer, fn)
