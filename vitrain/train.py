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

from vitrain.config import CONFIG_DIR
from vitrain.data import build_datasets, build_loaders
from vitrain.distill import build_criterion
from vitrain.errors import VitrainError
from vitrain.models import create_model
from vitrain.optim import build_optimizer, build_scheduler
from vitrain.trainer import Trainer

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_MODEL_KEYS = ("source", "name", "img_size", "pretrained", "checkpoint", "drop_path", "drop_rate")


def build_model(m: DictConfig, num_classes: int) -> torch.nn.Module:
    """The model of the ``model`` group; keys beyond the common ones (Swin's ``window_size``, or
    ``+model.depth=6`` from the shell) go to the constructor."""
    extra = {k: v for k, v in OmegaConf.to_container(m, resolve=True).items() if k not in _MODEL_KEYS}
    return create_model(m.name, num_classes=num_classes, img_size=m.img_size, source=m.source,
                        pretrained=m.pretrained, checkpoint=m.checkpoint, drop_rate=m.drop_rate,
                        drop_path_rate=m.drop_path, **extra)


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and write its outputs to ``run_dir``."""
    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    d, m, o, s, t = cfg.data, cfg.model, cfg.optimizer, cfg.scheduler, cfg.trainer
    splits = build_datasets(
        d.name, m.img_size, d.mean, d.std, root=d.root, download=d.download,
        crop_padding=d.crop_padding, hflip=d.hflip, interpolation=d.interpolation,
        test_fraction=d.get("test_fraction", 0.2), split_seed=d.get("split_seed", 0),
    )
    train_loader, val_loader = build_loaders(
        splits, d.batch_size, d.num_workers, seed=cfg.seed, pin_memory=torch.cuda.is_available()
    )
    model = build_model(m, splits.num_classes)
    optimizer = build_optimizer(model, o.name, o.lr, o.backbone_lr, o.weight_decay, tuple(o.betas))
    steps_per_epoch = len(train_loader)
    scheduler = build_scheduler(
        optimizer, total_steps=t.epochs * steps_per_epoch, name=s.name,
        warmup_steps=math.ceil(s.warmup_epochs * steps_per_epoch), min_lr_ratio=s.min_lr_ratio,
    )
    log.info("model %s (%.2fM parameters), data %s: %d train / %d val images, %d classes",
             m.name, sum(p.numel() for p in model.parameters()) / 1e6, d.name,
             len(splits.train), len(splits.val), splits.num_classes)
    trainer = Trainer(
        model, optimizer, scheduler, build_criterion(cfg.distill.name, t.label_smoothing),
        train_loader, val_loader, run_dir, epochs=t.epochs, device=t.device, precision=t.precision,
        grad_clip=t.grad_clip, log_every=t.log_every, progress=t.progress,
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
