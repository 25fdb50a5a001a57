"""The one place that turns a config into the objects of a run: data, model, loss, optimizer, Trainer.

Each group's config is a plain dataclass (:class:`~vitrain.config.TrainConfig` gathers them); this module
joins what crosses groups (the model's input size for the data, the data's classes for the model, the loss's
label smoothing for mixup, the data's normalization for the teacher, the global batch for the learning
rate) and hands the pieces to the :class:`~vitrain.trainer.Trainer`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrain import runfolder
from vitrain.checkpoint import remove_partial_saves
from vitrain.config import TrainConfig, ensure_writable
from vitrain.data import DataSplits, build_datasets, build_loaders, build_mixup
from vitrain.data.cache import cache_folder, user_cache_dir
from vitrain.distill import TeacherInputs, build_criterion, build_teacher, resolve_teacher
from vitrain.distributed import World, rank0_first
from vitrain.errors import ConfigError
from vitrain.features import FeatureLoader, FeatureProbe, backbone_digest, cached_features, files_key
from vitrain.loggers import Logger, LoggerConfig, MultiLogger, TensorBoardLogger, WandbLogger
from vitrain.mlflow_logger import MLflowLogger
from vitrain.models import create_model
from vitrain.models.config import ModelConfig
from vitrain.models.weights import ensure_pretrained, weights_preprocess
from vitrain.optim import optimizer_and_schedule
from vitrain.pruning import TrialReporter, measure
from vitrain.runtime import autocast_dtype, close_workers, command_times, seed_everything
from vitrain.trainer import Loaders, Trainer

log = logging.getLogger(__name__)


def resolve_preprocess(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """``cfg`` (a copy) with ``data.mean``, ``std``, ``interpolation``, ``crop_pct`` and ``crop_mode`` set, and a
    line saying the input size and these values and where each came from
    (:meth:`~vitrain.data.config.DataConfig.resolve_preprocess`: set in the config, else the starting weights' own,
    else the data set's, else ImageNet's). The weights' values are read without building the model or loading
    them: before any data is read, and before checkpoints and exports record them."""
    m = cfg.model
    weights = weights_preprocess(m.source, m.name, m.pretrained, m.checkpoint)
    chosen = cfg.data.resolve_preprocess(weights.values)
    resolved = copy.copy(cfg)  # not dataclasses.replace: TrainConfig's checks (and their warnings) ran already
    resolved.data = dataclasses.replace(cfg.data, **{k: v for k, (v, _) in chosen.items()})
    said = ", ".join(f"data.{k}={v} ({source})" for k, (v, source) in chosen.items())
    teacher_said = ""
    if cfg.distill.name != "none":  # the teacher's own inputs, from its weights (distill.resolve_teacher)
        teacher, teacher_said = resolve_teacher(cfg.distill.teacher, resolved.data.mean, resolved.data.std, m.img_size)
        resolved.distill = dataclasses.replace(cfg.distill, teacher=teacher)
    return resolved, f"{size_note(m, weights.values.get('img_size'))}; preprocessing: {said}; the weights: " \
                     f"{weights.origin}" + (f"; {teacher_said}" if teacher_said else "")


def size_note(model: ModelConfig, trained_at: int | None) -> str:
    """What the log says of ``model.img_size``: the weights' own size, or the model's; or, where it was set to
    another size than the weights were trained at, that their position tables are resampled, from which grid."""
    if trained_at is None:
        return f"model.img_size={model.img_size} (the model's own; the starting weights say no size)"
    if trained_at == model.img_size:
        return f"model.img_size={model.img_size} (the starting weights' own)"
    found = re.search(r"patch(\d+)", model.name)
    grids = "" if not found else (f" from a {trained_at // int(found.group(1))}x{trained_at // int(found.group(1))} "
                                  f"grid of patches to {model.img_size // int(found.group(1))}x"
                                  f"{model.img_size // int(found.group(1))}")
    return (f"model.img_size={model.img_size} is set, but the starting weights were trained at {trained_at}: their "
            f"position embedding (Swin: relative position tables) is resampled{grids}; leave model.img_size unset "
            f"(null) to train at {trained_at}")


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
    for distillation, with the frozen teacher at its own input size and the adapter from the data's inputs to the
    teacher's (its own normalization and size: ``distill.teacher.mean``/``std``/``img_size`` as
    :func:`~vitrain.distill.resolve_teacher` resolves them)."""
    d = cfg.distill
    if d.name == "none":
        return build_criterion("none", cfg.loss)
    t, said = resolve_teacher(d.teacher, cfg.data.mean, cfg.data.std, cfg.model.img_size)
    if t != d.teacher:  # not resolved by resolve_preprocess (which logged the line before any data was read)
        log.info(said)
    teacher = build_teacher(t, num_classes, t.img_size, device, cfg.trainer.channels_last)
    adapter = TeacherInputs(cfg.data.mean, cfg.data.std, t.mean, t.std, t.img_size)
    return build_criterion(d.name, cfg.loss, teacher, d.alpha, d.tau, d.reduction, adapter)


def build_trainer(cfg: TrainConfig, run_dir: str | Path, world: World, device: torch.device) -> tuple[Trainer,
                                                                                                        DataSplits]:
    """Everything a training run needs, in the order that fixes the random draws (data split, loaders,
    model initialisation, teacher): the :class:`Trainer` and the data splits it trains on. The loggers come
    first: an MLflow server that cannot be reached stops the run before any data is read, and so do pretrained
    weights that are neither cached nor reachable. The preprocessing is resolved (:func:`resolve_preprocess`) and
    logged before any data is read; every piece below gets the resolved config."""
    logger = build_logger(cfg.logger, Path(run_dir), world)
    if cfg.model.pretrained:
        ensure_pretrained(cfg.model.source, cfg.model.name)  # seconds, not the hub client's minute of retries
    cfg, said = resolve_preprocess(cfg)
    log.info(said)
    splits = rank0_first(lambda: build_datasets(cfg.data, cfg.model.img_size))  # a download once, not per process
    train_loader, val_loader, test_loader = build_loaders(splits, cfg.data, cfg.model.img_size, device, cfg.seed,
                                                          world)
    log.info(splits.describe(cfg.data.name))  # before the model, its weights and any feature pass
    if splits.test is None and cfg.data.val_fraction > 0:  # the data has no eval split of its own to test on
        log.info("validating on %d training images held out by data.val_fraction=%g: best.pt and sweeps select on "
                 "them; %s has no split of its own left for a final test", len(splits.val), cfg.data.val_fraction,
                 cfg.data.name)
    elif splits.test is None:
        log.info("validating on the %s split of %s (no data.val_fraction): best.pt and sweeps select on it",
                 "test" if cfg.data.name in ("digits", "cifar10", "cifar100") else "val", cfg.data.name)
    model = build_model(cfg.model, splits.num_classes).to(device)
    if cfg.trainer.cache_features:  # the head trains on features the frozen backbone computed once
        model, train_loader, val_loader, test_loader = feature_probe(cfg, model, splits, device, world,
                                                                     train_loader, val_loader, test_loader)
    criterion = build_loss(cfg, splits.num_classes, device)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.trainer.accum_steps)
    global_batch = cfg.data.batch_size * world.size
    optimizer, scheduler = optimizer_and_schedule(model, cfg.optimizer, cfg.scheduler,
                                                  global_batch * cfg.trainer.accum_steps, steps_per_epoch,
                                                  cfg.trainer.epochs)
    log.info("model %s (%.2fM parameters), %d classes", cfg.model.name,
             sum(p.numel() for p in model.parameters()) / 1e6, splits.num_classes)
    if world.size > 1:  # the same weights everywhere so far; now each rank's own drop path, mixup, CPU-side crops
        seed_everything(cfg.seed + world.rank)
    mixup = build_mixup(cfg.data, splits.num_classes, cfg.loss.label_smoothing)
    loaders = Loaders(train_loader, val_loader, mixup, test_loader)
    trainer_cfg = dataclasses.replace(cfg.trainer, device=str(device))  # this rank's device under torchrun
    if cfg.trainer.cache_features:  # batches of features: no image grid, no image memory layout
        trainer_cfg = dataclasses.replace(trainer_cfg, image_grid=0, channels_last=False)
    metadata = checkpoint_metadata(cfg, splits.class_names, global_batch, world.size)
    trial = TrialReporter.from_config(cfg.sweep) if world.is_main else None  # a pruned Optuna search's trial
    return Trainer(model, optimizer, scheduler, criterion, loaders, trainer_cfg, run_dir, metadata, logger,
                   trial), splits


def feature_probe(cfg: TrainConfig, model: nn.Module, splits: DataSplits, device: torch.device, world: World,
                  *loaders: Any) -> tuple[nn.Module, Any, Any, Any]:
    """``trainer.cache_features``: the model as a :class:`~vitrain.features.FeatureProbe` and loaders of its
    cached features (computed now, or read from the feature cache), in place of the image loaders."""
    if world.size > 1:
        raise ConfigError("trainer.cache_features runs in one process; start it without torchrun")
    probe = FeatureProbe(model)  # refuses a model without one head and forward_head, before any image is read
    key = {"model": dataclasses.asdict(cfg.model), "weights": backbone_digest(model), "seed": cfg.seed,
           "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("batch_size", "num_workers")},
           "views": cfg.trainer.feature_views, **{name: files_key(getattr(splits, name)) for name in ("train", "val")},
           "test": files_key(splits.test) if splits.test is not None else None}
    folder = cache_folder(cfg.data.cache_dir, Path(cfg.data.root)) if cfg.data.root else user_cache_dir() / "features"
    dtype = autocast_dtype(cfg.trainer.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    started = time.perf_counter()
    features = cached_features(model, dict(zip(("train", "val", "test"), loaders, strict=True)),
                               cfg.trainer.feature_views, key, folder, device, autocast)
    probe.feature_seconds = time.perf_counter() - started  # for the run's closing line
    batch = cfg.data.batch_size
    return (probe, FeatureLoader(features["train"], batch, seed=cfg.seed), FeatureLoader(features["val"], batch),
            FeatureLoader(features["test"], batch) if "test" in features else None)


def build_logger(cfg: LoggerConfig, run_dir: Path, world: World) -> Logger:
    """The loggers of the ``logger`` group, on rank 0 (the other ranks log nothing), each ready: an MLflow
    tracking server is probed now, and a missing package is named."""
    if not world.is_main:
        return Logger()
    loggers: list[Logger] = []
    if cfg.mlflow.enabled:  # first: a tracking server that cannot be reached stops the run before any file is written
        loggers.append(MLflowLogger(cfg.mlflow, run_dir))
    if cfg.tensorboard.enabled:
        loggers.insert(0, TensorBoardLogger(run_dir / "tb"))
    if cfg.wandb.enabled:
        loggers.append(WandbLogger(cfg.wandb, run_dir))
    log.info("logging to %s", ", ".join(cfg.backends) or "no logger (logger=[])")
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)


def checkpoint_metadata(cfg: TrainConfig, class_names: list[str], global_batch: int,
                        world_size: int) -> dict[str, Any]:
    """What every checkpoint carries besides the training state: the plain model spec and preprocessing
    that inference rebuilds from, the class names, the data config (to evaluate on the same validation set),
    the images per step of all processes (to resume inside an epoch), and the whole config, for the record; the
    preprocessing as resolved (:func:`resolve_preprocess`), which is what the run fed the model."""
    cfg, _ = resolve_preprocess(cfg)
    m = cfg.model
    preprocess = {"img_size": m.img_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                  "interpolation": cfg.data.interpolation, "crop_pct": cfg.data.crop_pct,
                  "crop_mode": cfg.data.crop_mode}
    test_size = weights_preprocess(m.source, m.name, m.pretrained, m.checkpoint).values.get("test_img_size")
    if test_size:  # timm's test_input_size: what `evaluate img_size=test` evaluates at, on request
        preprocess["test_img_size"] = test_size
    return {"model_spec": cfg.model.spec(len(class_names)), "preprocess": preprocess, "class_names": class_names,
            "data_config": dataclasses.asdict(cfg.data), "global_batch": global_batch, "world_size": world_size,
            "config": dataclasses.asdict(cfg)}


def run_training(cfg: TrainConfig, run_dir: Path, world: World, device: torch.device) -> dict[str, Any]:
    """The training run of :func:`vitrain.train.train`, its config checked and its process group joined: build it,
    resume it, train, and write what a run leaves (adapters, figures) besides the Trainer's checkpoints."""
    if world.is_main:
        ensure_writable(run_dir / "checkpoints", "hydra.run.dir")
        remove_partial_saves(run_dir / "checkpoints")  # left by a save that was killed mid-write (logged)
    seed_everything(cfg.seed)
    trainer, splits = build_trainer(cfg, run_dir, world, device)
    if world.is_main:
        runfolder.write_resolved_config(run_dir, trainer.metadata["config"])
    trainer.resume(cfg.trainer.resume, cfg.data.batch_size * world.size)
    log.info("training on %s%s for %d epochs; writing to %s", trainer.device,
             f" x {world.size} processes" if world.size > 1 else "", cfg.trainer.epochs, run_dir)
    try:
        metrics = trainer.fit()
    finally:  # now, not at garbage collection (which waits 5 s for each worker)
        close_workers(trainer.loaders.train, trainer.loaders.val, trainer.loaders.test)
    metrics.update(measure(cfg.sweep.objectives, trainer.model, cfg.model.img_size, trainer.device))
    if cfg.model.lora.rank > 0 and world.is_main:  # the final adapters and head, in peft's format
        from vitrain.lora import save_adapters

        save_adapters(trainer.model, run_dir / "checkpoints" / "adapter")
    if cfg.trainer.log_images and world.is_main:
        from vitrain.figures import log_end_of_training  # matplotlib: imported only when asked for

        pre = trainer.metadata["preprocess"]  # the normalization as resolved (data.mean may be null: auto)
        log_end_of_training(run_dir / "tb", trainer.model, splits.val, trainer.state.step, pre["mean"], pre["std"],
                            splits.class_names)
    log.info("best val top-1 %.2f%%, final val top-1 %.2f%%%s, %.0f train img/s; %s", metrics["best_top1"],
             metrics["final_top1"], "" if metrics["test_top1"] is None else f", test top-1 {metrics['test_top1']:.2f}%",
             metrics["train_images_per_sec"], command_times(metrics, getattr(trainer.model, "feature_seconds", 0.0)))
    return metrics
