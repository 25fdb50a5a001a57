"""Optimizer parameter groups and learning-rate schedules, as pure functions.

Optimizers: ``adamw`` (fused on CUDA), ``sgd``, ``lamb``, ``lion`` and every other name of timm's
``timm.optim.list_optimizers()``, built by timm from vitrain's parameter groups, which it keeps as they are.

Parameter groups: the classifier head and the backbone get their own learning rates (fine-tuning
uses a small one for the pretrained backbone and a large one for the new head), and each splits into
a weight-decayed part and a part without decay (biases, norm weights, tokens, position embeddings).

Schedules are multipliers of each group's own base learning rate, so warmup and the floor scale
with it, stepped once per optimizer step. An absolute floor or warmup start (``scheduler.min_lr``,
``scheduler.warmup_lr``, DeiT's ``--min-lr`` and ``--warmup-lr``) is given for the group at ``optimizer.lr``
and becomes that multiplier, so the other groups keep their ratio to it (as timm's ``lr_scale`` does).

:class:`OptimizerConfig` and :class:`SchedulerConfig` are the schemas of the ``optimizer`` and
``scheduler`` config groups; :func:`optimizer_and_schedule` turns them into the two objects.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import re
from collections.abc import Iterable
from functools import partial

import torch
from timm import optim as timm_optim
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from vitrain.errors import ConfigError
from vitrain.models.heads import classifier_names  # owned by the model layer; importable from here too
from vitrain.models.heads import in_module as _in_module
from vitrain.schema.optim import SCHEDULES, OptimizerConfig, SchedulerConfig

log = logging.getLogger(__name__)
_EMBEDDING = ("patch_embed.", "cls_token", "dist_token", "pos_embed", "absolute_pos_embed")
_BLOCK = re.compile(r"^(?:blocks\.(\d+)|layers\.(\d+)\.(?:blocks\.(\d+)|downsample))\.")


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Depth of every parameter for layer-wise learning-rate decay (BEiT, timm): 0 for the patch
    embedding, tokens and position embedding, 1..L for the L transformer blocks in order (ViT/DeiT
    ``blocks.i``; Swin ``layers.s.blocks.b``, each stage's patch merging counted as a layer before its
    blocks), L + 1 for what follows (final norm, head)."""
    keys: dict[tuple, int] = {}
    found: dict[str, tuple | None] = {}
    for name, _ in model.named_parameters():
        m = _BLOCK.match(name)
        key = None if m is None else tuple(-1 if g is None else int(g) for g in m.groups())
        if key is not None:
            keys.setdefault(key, len(keys) + 1)
        found[name] = key
    last = len(keys) + 1
    return {name: 0 if name.startswith(_EMBEDDING) else keys[key] if key else last for name, key in found.items()}


def param_groups(
    model: nn.Module,
    lr: float,
    backbone_lr: float | None = None,
    weight_decay: float = 0.05,
    head: Iterable[str] | None = None,
    layer_decay: float | None = None,
) -> list[dict]:
    """Groups ``backbone``/``head`` x decay/``no_decay`` for a torch optimizer.

    No weight decay for 0-/1-d parameters (biases, LayerNorm) and for the names in
    ``model.no_weight_decay()`` (CLS token, position embedding). Empty groups are dropped.
    ``backbone_lr=None`` trains everything at ``lr``. With ``layer_decay`` (e.g. 0.65) the backbone
    splits further by depth (:func:`layer_ids`): a layer ``k`` below the top gets ``layer_decay ** k``
    times the rate. Frozen parameters stay in their group (so unfreezing needs no new optimizer);
    the optimizer skips them while they have no gradient.
    """
    head = tuple(head) if head is not None else classifier_names(model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    rates = {"backbone": lr if backbone_lr is None else backbone_lr, "head": lr}
    depth = layer_ids(model) if layer_decay is not None else {}
    top = max(depth.values(), default=0)
    if layer_decay is not None and top < 2:
        raise ConfigError("optimizer.layer_decay needs a model with transformer blocks (vitrain's ViT, DeiT or "
                          "Swin); set optimizer.layer_decay=null")
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        part = "head" if _in_module(name, head) else "backbone"
        decay = p.ndim > 1 and name not in skip
        layer = top if part == "head" else depth.get(name, top)
        key = part + (f"_layer{layer}" if layer_decay is not None and part == "backbone" else "")
        key += "" if decay else "_no_decay"
        scale = layer_decay ** (top - layer) if layer_decay is not None else 1.0
        group = groups.setdefault(key, {"name": key, "params": [], "lr": rates[part] * scale,
                                        "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return list(groups.values())


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (linear probing) or unfreeze everything but the classifier head."""
    head = classifier_names(model)
    for name, p in model.named_parameters():
        if not _in_module(name, head):
            p.requires_grad_(trainable)


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    backbone_lr: float | None = None,
    weight_decay: float = 0.05,
    betas: Iterable[float] | None = None,
    layer_decay: float | None = None,
    momentum: float = 0.9,
    nesterov: bool | None = None,
    eps: float | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see :func:`optimizer_names`) over :func:`param_groups`, built by timm.

    timm gets the groups as they are (their ``lr`` and ``weight_decay`` stay). ``betas``, ``eps`` and
    ``nesterov`` left ``None`` keep the optimizer's own defaults; ``momentum`` goes to those that take
    one. AdamW uses fused kernels when every parameter is on CUDA.
    """
    cfg = OptimizerConfig(name=name, lr=lr, backbone_lr=backbone_lr, weight_decay=weight_decay,
                          betas=None if betas is None else list(betas), layer_decay=layer_decay,
                          momentum=momentum, nesterov=nesterov, eps=eps)  # the ranges
    check_optimizer(cfg)  # the name, and the arguments it takes
    groups = param_groups(model, lr, backbone_lr, weight_decay, layer_decay=layer_decay)
    given = {"betas": None if cfg.betas is None else tuple(cfg.betas), "eps": eps, "nesterov": nesterov}
    extra = {key: value for key, value in given.items() if value is not None}  # None: the optimizer's default
    if _base_name(name) == "adamw" and _on_cuda(groups):
        extra["fused"] = True
    try:  # filter_bias_and_bn, layer_decay, param_group_fn only regroup a model; given groups pass through
        opt = timm_optim.create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                             filter_bias_and_bn=False, layer_decay=None, param_group_fn=None,
                                             **extra)
    except (ImportError, AssertionError) as e:  # apex / bitsandbytes optimizers: package or CUDA missing
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"optimizer.name={name} cannot be built here: {why}") from e
    kept = [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in opt.param_groups]
    if kept != [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]:
        raise RuntimeError(f"timm changed vitrain's parameter groups of optimizer '{name}'")
    return opt


def _on_cuda(groups: list[dict]) -> bool:
    """Whether every parameter is on CUDA (AdamW then asks for fused kernels)."""
    return all(p.is_cuda for g in groups for p in g["params"])


LOOKAHEAD = "lookahead_"


def _base_name(name: str) -> str:
    """The optimizer under timm's ``lookahead_`` wrapper."""
    return name[len(LOOKAHEAD):] if name.startswith(LOOKAHEAD) else name


def optimizer_names() -> list[str]:
    """The values ``optimizer.name`` accepts: timm's ``list_optimizers()``, each also as ``lookahead_<name>``."""
    return timm_optim.list_optimizers()


def _takes(name: str, argument: str) -> bool:
    """Whether the optimizer's constructor has ``argument`` (assumed for the apex / bitsandbytes ones,
    which are not imported to check)."""
    opt_class = timm_optim.get_optimizer_info(name).opt_class
    return isinstance(opt_class, str) or argument in inspect.signature(opt_class).parameters


def _check_name(name: str) -> None:
    names = optimizer_names()
    if _base_name(name) not in names:
        close = difflib.get_close_matches(_base_name(name).lower(), names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown optimizer '{name}' (optimizer.name); {hint}all of them: "
                          f"python -c \"import timm.optim; print(timm.optim.list_optimizers())\"")
    if timm_optim.get_optimizer_info(_base_name(name)).second_order:
        raise ConfigError(f"optimizer '{name}' (optimizer.name) needs second-order gradients, which the trainer "
                          "does not compute; choose another")


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
    kind: str = "cosine",
    decay_steps: int = 1,
    decay_rate: float = 0.1,
    warmup_start: float | None = None,
) -> float:
    """Multiplier of the base learning rate at 0-based optimizer step ``step``.

    Linear warmup over ``warmup_steps`` (1/W, 2/W, ..., 1; with ``warmup_start`` s: s at step 0, then
    linear to 1 at step W, as timm's ``warmup_lr_init``), then ``cosine`` decay from 1 to ``min_ratio`` at
    ``total_steps``, ``step`` decay (times ``decay_rate`` every ``decay_steps``, never below ``min_ratio``)
    or ``constant`` 1.
    """
    if step < warmup_steps:
        if warmup_start is not None:
            return warmup_start + (1.0 - warmup_start) * step / warmup_steps
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "step":
        return max(min_ratio, decay_rate ** ((step - warmup_steps) // max(1, decay_steps)))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))




def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    name: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_steps: int = 1,
    decay_rate: float = 0.1,
    warmup_start: float | None = None,
) -> LambdaLR:
    """A per-step LambdaLR applying :func:`lr_factor` to every group's own base learning rate."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown scheduler '{name}' (scheduler.name); choose one of {', '.join(SCHEDULES)}")
    fn = partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_lr_ratio, kind=name,
                 decay_steps=decay_steps, decay_rate=decay_rate, warmup_start=warmup_start)
    return LambdaLR(optimizer, fn)


def optimizer_and_schedule(
    model: nn.Module, optimizer: OptimizerConfig, scheduler: SchedulerConfig, global_batch: int,
    steps_per_epoch: int, epochs: int,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """The optimizer over the parameter groups, at learning rates scaled for ``global_batch`` (the images per
    optimizer step of all processes), and the per-step schedule over ``epochs`` epochs."""
    scale = optimizer.lr_scale(global_batch)
    backbone_lr = None if optimizer.backbone_lr is None else optimizer.backbone_lr * scale
    opt = build_optimizer(model, optimizer.name, optimizer.lr * scale, backbone_lr, optimizer.weight_decay,
                          optimizer.betas, optimizer.layer_decay, optimizer.momentum, optimizer.nesterov, optimizer.eps)
    floor, warmup_start = scheduler.ratios(optimizer.lr * scale)
    schedule = build_scheduler(
        opt, total_steps=epochs * steps_per_epoch, name=scheduler.name,
        warmup_steps=math.ceil(scheduler.warmup_epochs * steps_per_epoch), min_lr_ratio=floor,
        decay_steps=max(1, round(scheduler.decay_epochs * steps_per_epoch)), decay_rate=scheduler.decay_rate,
        warmup_start=warmup_start,
    )
    peak, factor = optimizer.lr * scale, schedule.lr_lambdas[0]
    log.info("learning rate %.3g (optimizer.lr %g x %g at a global batch of %d), %s: first step %.3g, %g warmup "
             "epochs, floor %.3g; stepped every optimizer step", peak, optimizer.lr, scale, global_batch,
             scheduler.name, peak * factor(0), scheduler.warmup_epochs, peak * factor(epochs * steps_per_epoch))
    return opt, schedule


def check_optimizer(cfg: OptimizerConfig) -> None:
    """``optimizer.name`` among timm's optimizers, and betas, eps and nesterov only where it takes them, with the
    right count."""
    _check_name(cfg.name)
    base = _base_name(cfg.name)
    info = timm_optim.get_optimizer_info(base)
    if cfg.betas is not None:
        if not info.has_betas:
            raise ConfigError(f"optimizer.betas is not used by {cfg.name}; set optimizer.betas=null")
        if len(cfg.betas) != info.num_betas or not all(0 <= b < 1 for b in cfg.betas):
            raise ConfigError(f"optimizer.betas must be {info.num_betas} values in [0, 1) for {cfg.name}, "
                              f"got {list(cfg.betas)}")
    if cfg.eps is not None and not info.has_eps:
        raise ConfigError(f"optimizer.eps is not used by {cfg.name}; set optimizer.eps=null")
    if cfg.nesterov is not None and not _takes(base, "nesterov"):
        raise ConfigError(f"optimizer.nesterov is not used by {cfg.name}; set optimizer.nesterov=null")
    nesterov = (info.defaults or {}).get("nesterov") if cfg.nesterov is None else cfg.nesterov
    if nesterov and info.has_momentum and cfg.momentum == 0:
        raise ConfigError(f"Nesterov momentum ({cfg.name}) needs optimizer.momentum > 0, got 0")
