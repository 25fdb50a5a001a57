"""``python -m vitrain.train``: compose the config, build plain Python objects, run the Trainer.

Hydra and OmegaConf stop here: everything below :func:`train` takes ordinary arguments.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from timm.data import Mixup

from vitrain.config import CONFIG_DIR
from vitrain.data import DataSplits, build_datasets, build_loaders
from vitrain.distill import TeacherInputs, build_criterion
from vitrain.errors import VitrainError
from vitrain.models import create_model
from vitrain.optim import build_optimizer, build_scheduler, set_backbone_trainable
from vitrain.trainer import Trainer, resolve_device

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_MODEL_KEYS = ("source", "name", "img_size", "pretrained", "checkpoint", "reset_head", "drop_path", "drop_rate")


def build_model(m: DictConfig, num_classes: int) -> torch.nn.Module:
    """The model of the ``model`` group; keys beyond the common ones (Swin's ``window_size``, or
    ``+model.depth=6`` from the shell) go to the constructor."""
    extra = {k: v for k, v in OmegaConf.to_container(m, resolve=True).items() if k not in _MODEL_KEYS}
    return create_model(m.name, num_classes=num_classes, img_size=m.img_size, source=m.source,
                        pretrained=m.pretrained, checkpoint=m.checkpoint, reset_head=m.get("reset_head", False),
                        drop_rate=m.drop_rate, drop_path_rate=m.drop_path, **extra)


def build_distillation(dist: DictConfig, t: DictConfig, d: DictConfig, img_size: int, num_classes: int,
                       device: torch.device) -> torch.nn.Module:
    """The criterion of the ``distill`` group; for hard/soft, the frozen teacher with its input adapter."""
    if dist.name == "none":
        return build_criterion("none", t.label_smoothing)
    spec = dist.teacher
    teacher = create_model(spec.name, num_classes=num_classes, img_size=spec.img_size or img_size,
                           source=spec.source, pretrained=spec.pretrained, checkpoint=spec.checkpoint)
    if not (spec.checkpoint or spec.pretrained):
        log.warning("the teacher %s has random weights: set distill.teacher.checkpoint=PATH", spec.name)
    adapter = TeacherInputs(d.mean, d.std, spec.mean, spec.std, spec.img_size)
    return build_criterion(dist.name, t.label_smoothing, teacher.to(device), dist.alpha, dist.tau,
                           dist.reduction, adapter)


def build_mixup(t: DictConfig, num_classes: int) -> Mixup | None:
    """timm's batch mixup/cutmix (soft targets, label smoothing folded in), or None when both are off."""
    if not (t.mixup > 0 or t.cutmix > 0):
        return None
    return Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob, switch_prob=t.mixup_switch_prob,
                 label_smoothing=t.label_smoothing, num_classes=num_classes)


def build_data(d: DictConfig, img_size: int) -> DataSplits:
    """The train/val sets of the ``data`` group, resized to the model's ``img_size``."""
    return build_datasets(
        d.name, img_size, d.mean, d.std, root=d.root, download=d.download, crop_padding=d.crop_padding,
        hflip=d.hflip, interpolation=d.interpolation, test_fraction=d.get("test_fraction", 0.2),
        split_seed=d.get("split_seed", 0), auto_augment=d.auto_augment, color_jitter=d.color_jitter,
        re_prob=d.re_prob, classes=d.classes, train_fraction=d.get("train_fraction", 1.0),
    )


def build_optimization(
    model: torch.nn.Module, o: DictConfig, s: DictConfig, batch_size: int, steps_per_epoch: int, epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the parameter groups and the per-step schedule. With ``optimizer.lr_base_batch``
    the learning rates scale linearly with the batch (DeiT: lr x batch / 512)."""
    scale = batch_size / o.lr_base_batch if o.get("lr_base_batch") else 1.0
    backbone_lr = None if o.backbone_lr is None else o.backbone_lr * scale
    optimizer = build_optimizer(model, o.name, o.lr * scale, backbone_lr, o.weight_decay, tuple(o.betas),
                                o.get("layer_decay"))
    scheduler = build_scheduler(
        optimizer, total_steps=epochs * steps_per_epoch, name=s.name,
        warmup_steps=math.ceil(s.warmup_epochs * steps_per_epoch), min_lr_ratio=s.min_lr_ratio,
        decay_steps=max(1, round(s.get("decay_epochs", 1) * steps_per_epoch)), decay_rate=s.get("decay_rate", 0.1),
    )
    return optimizer, scheduler


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and write its outputs to ``run_dir``."""
    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    d, m, o, t = cfg.data, cfg.model, cfg.optimizer, cfg.trainer
    splits = build_data(d, m.img_size)
    mixup = build_mixup(t, splits.num_classes)
    train_loader, val_loader = build_loaders(  # mixup pairs images: it needs even, so full, batches
        splits, d.batch_size, d.num_workers, seed=cfg.seed, pin_memory=torch.cuda.is_available(),
        drop_last=mixup is not None,
    )
    device = resolve_device(t.device)
    model = build_model(m, splits.num_classes).to(device)
    criterion = build_distillation(cfg.distill, t, d, m.img_size, splits.num_classes, device)
    if o.freeze_backbone:
        set_backbone_trainable(model, False)
    steps_per_epoch = math.ceil(len(train_loader) / t.accum_steps)
    optimizer, scheduler = build_optimization(model, o, cfg.scheduler, d.batch_size * t.accum_steps,
                                              steps_per_epoch, t.epochs)
    log.info("model %s (%.2fM parameters), data %s: %d train / %d val images, %d classes",
             m.name, sum(p.numel() for p in model.parameters()) / 1e6, d.name,
             len(splits.train), len(splits.val), splits.num_classes)
    trainer = Trainer(
        model, optimizer, scheduler, criterion,
        train_loader, val_loader, run_dir, epochs=t.epochs, device=t.device, precision=t.precision,
        grad_clip=t.grad_clip, log_every=t.log_every, progress=t.progress, accum_steps=t.accum_steps,
        ema_decay=t.ema_decay if t.ema else None, mixup_fn=mixup,
        unfreeze_at_epoch=o.unfreeze_after_epochs if o.freeze_backbone else None,
        checkpoint_extra={"config": OmegaConf.to_container(cfg, resolve=True),
                          "class_names": splits.class_names, "model_name": m.name, "model_source": m.source},
    )
    log.info("training on %s for %d epochs (%d steps); writing to %s",
             trainer.device, t.epochs, t.epochs * steps_per_epoch, run_dir)
    metrics = trainer.fit()
    log.info("best top-1 %.2f%%, final top-1 %.2f%%, %.0f train img/s, %.1f s",
             metrics["best_top1"], metrics["final_top1"], metrics["train_images_per_sec"],
             metrics["wall_time_sec"])
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the final top-1 so that sweepers can optimise it."""
    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)["final_top1"]
    except (VitrainError, MissingMandatoryValue) as e:
        if cfg.trainer.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(e, MissingMandatoryValue):
            e = VitrainError(f"{e.full_key} has no value; set it on the command line ({e.full_key}=...)")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
