"""The one place that turns a config into the objects of a run: data, model, loss, optimizer, Trainer.

Each group's config is a plain dataclass (:class:`~vitrain.config.TrainConfig` gathers them); this module
joins what crosses groups (the model's input size for the data, the data's classes for the model, the loss's
label smoothing for mixup, the data's normalization for the teacher, the global batch for the learning
rate) and hands the pieces to the :class:`~vitrain.trainer.Trainer`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrain.config import TrainConfig
from vitrain.data import DataSplits, build_datasets, build_loaders, build_mixup
from vitrain.distill import TeacherInputs, build_criterion, build_teacher
from vitrain.distributed import World, rank0_first
from vitrain.errors import ConfigError
from vitrain.loggers import Logger, LoggerConfig, MLflowLogger, MultiLogger, TensorBoardLogger, WandbLogger
from vitrain.models import create_model
from vitrain.models.config import ModelConfig
from vitrain.optim import optimizer_and_schedule
from vitrain.pruning import TrialReporter
from vitrain.runtime import seed_everything
from vitrain.trainer import Loaders, Trainer

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model of the ``model`` group with a ``num_classes`` head, with its starting weights; with
    ``model.lora.rank`` > 0, with LoRA adapters and only these and the head trainable."""
    model = create_model(cfg.name, num_classes=num_classes, img_size=cfg.img_size, source=cfg.source,
                         pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, reset_head=cfg.reset_head,
                         **cfg.constructor_kwargs())
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model, cfg.name)
    if cfg.lora.rank > 0:  # after the starting weights are in: the adapters learn a change of them
        from vitrain.lora import apply_lora, trainable_parameters  # peft: imported only when asked for

        model = apply_lora(model, cfg.lora)
        trainable, total = trainable_parameters(model)
        log.info("LoRA rank %d (alpha %g) on %s: %d of %d parameters train (%.2f%%, adapters and head)",
                 cfg.lora.rank, cfg.lora.alpha, "/".join(cfg.lora.targets), trainable, total, 100 * trainable / total)
    return model


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """``model.grad_checkpointing=true`` through timm's switch, which vitrain's and timm's models have."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise ConfigError(f"model {name} has no activation checkpointing (vitrain and timm models have it); "
                          f"set model.grad_checkpointing=false")
    model.set_grad_checkpointing(True)


def build_loss(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The criterion of the ``loss`` and ``distill`` groups, called as ``criterion(inputs, outputs, labels)``;
    for distillation, with the frozen teacher and the adapter from the data's inputs to the teacher's."""
    d = cfg.distill
    if d.name == "none":
        return build_criterion("none", cfg.loss)
    teacher = build_teacher(d.teacher, num_classes, cfg.model.img_size, device, cfg.trainer.channels_last)
    adapter = TeacherInputs(cfg.data.mean, cfg.data.std, d.teacher.mean, d.teacher.std, d.teacher.img_size)
    return build_criterion(d.name, cfg.loss, teacher, d.alpha, d.tau, d.reduction, adapter)


def build_trainer(cfg: TrainConfig, run_dir: str | Path, world: World, device: torch.device) -> tuple[Trainer,
                                                                                                        DataSplits]:
    """Everything a training run needs, in the order that fixes the random draws (data split, loaders,
    model initialisation, teacher): the :class:`Trainer` and the data splits it trains on. The loggers come
    first: an MLflow server that cannot be reached stops the run before any data is read."""
    logger = build_logger(cfg.logger, Path(run_dir), world)
    splits = rank0_first(lambda: build_datasets(cfg.data, cfg.model.img_size))  # a download once, not per process
    train_loader, val_loader, test_loader = build_loaders(splits, cfg.data, cfg.model.img_size, device, cfg.seed,
                                                          world)
    if splits.test is None:
        log.info("validating on the %s split of %s (no data.val_fraction): best.pt and sweeps select on it",
                 "test" if cfg.data.name in ("digits", "cifar10", "cifar100") else "val", cfg.data.name)
    model = build_model(cfg.model, splits.num_classes).to(device)
    criterion = build_loss(cfg, splits.num_classes, device)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.trainer.accum_steps)
    global_batch = cfg.data.batch_size * world.size
    optimizer, scheduler = optimizer_and_schedule(model, cfg.optimizer, cfg.scheduler,
                                                  global_batch * cfg.trainer.accum_steps, steps_per_epoch,
                                                  cfg.trainer.epochs)
    log.info("model %s (%.2fM parameters), data %s: %d train / %d val images, %d classes", cfg.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.data.name, len(splits.train), len(splits.val),
             splits.num_classes)
    if world.size > 1:  # the same weights everywhere so far; now each rank's own drop path, mixup, CPU-side crops
        seed_everything(cfg.seed + world.rank)
    mixup = build_mixup(cfg.data, splits.num_classes, cfg.loss.label_smoothing)
    loaders = Loaders(train_loader, val_loader, mixup, test_loader)
    trainer_cfg = dataclasses.replace(cfg.trainer, device=str(device))  # this rank's device under torchrun
    metadata = checkpoint_metadata(cfg, splits.class_names, global_batch, world.size)
    trial = TrialReporter.from_config(cfg.sweep) if world.is_main else None  # a pruned Optuna search's trial
    return Trainer(model, optimizer, scheduler, criterion, loaders, trainer_cfg, run_dir, metadata, logger,
                   trial), splits


def build_logger(cfg: LoggerConfig, run_dir: Path, world: World) -> Logger:
    """The loggers of the ``logger`` group, on rank 0 (the other ranks log nothing), each ready: an MLflow
    tracking server is probed now, and a missing package is named."""
    if not world.is_main:
        return Logger()
    loggers: list[Logger] = []
    if cfg.tensorboard.enabled:
        loggers.append(TensorBoardLogger(run_dir / "tb"))
    if cfg.mlflow.enabled:
        loggers.append(MLflowLogger(cfg.mlflow, run_dir))
    if cfg.wandb.enabled:
        loggers.append(WandbLogger(cfg.wandb, run_dir))
    log.info("logging to %s", ", ".join(cfg.backends) or "no logger (logger=[])")
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)


def checkpoint_metadata(cfg: TrainConfig, class_names: list[str], global_batch: int,
                        world_size: int) -> dict[str, Any]:
    """What every checkpoint carries besides the training state: the plain model spec and preprocessing
    that inference rebuilds from, the class names, the data config (to evaluate on the same validation set),
    the images per step of all processes (to resume inside an epoch), and the whole config, for the record."""
    preprocess = {"img_size": cfg.model.img_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                  "interpolation": cfg.data.interpolation, "crop_pct": cfg.data.crop_pct}
    return {"model_spec": cfg.model.spec(len(class_names)), "preprocess": preprocess, "class_names": class_names,
            "data_config": dataclasses.asdict(cfg.data), "global_batch": global_batch, "world_size": world_size,
            "config": dataclasses.asdict(cfg)}
