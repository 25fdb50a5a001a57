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

from vitrain.checkpoint import load_checkpoint
from vitrain.config import CONFIG_DIR, ensure_writable
from vitrain.data import DataSplits, build_datasets, build_loaders, build_samplers
from vitrain.data.gpu import build_device_loaders, resolve_pipeline
from vitrain.distill import TeacherInputs, build_criterion
from vitrain.distributed import (
    World,
    barrier,
    broadcast_object,
    close_distributed,
    init_distributed,
    launcher,
    rank0_first,
    torchrun_world,
)
from vitrain.errors import ConfigError, VitrainError
from vitrain.models import create_model
from vitrain.models.convert import load_pretrained
from vitrain.optim import build_optimizer, build_scheduler, set_backbone_trainable
from vitrain.trainer import Preempted, Trainer

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


def is_cnn(model: torch.nn.Module) -> bool:
    """A convolutional network (more than a patch-embedding convolution): it gains from channels_last."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(setting: bool | str, model: torch.nn.Module, device: torch.device) -> bool:
    """``trainer.channels_last``: auto means CNNs on CUDA, where cuDNN's NHWC kernels are faster."""
    if setting == "auto":
        return device.type == "cuda" and is_cnn(model)
    if not isinstance(setting, bool):
        raise ConfigError(f"trainer.channels_last must be auto, true or false, got {setting}")
    return setting


def enable_grad_checkpointing(model: torch.nn.Module, name: str) -> None:
    """``trainer.grad_checkpointing=true`` through timm's switch, which vitrain's and timm's models have."""
    if not hasattr(model, "set_grad_checkpointing"):
        raise ConfigError(f"model {name} has no activation checkpointing (vitrain and timm models have it); "
                          f"set trainer.grad_checkpointing=false")
    model.set_grad_checkpointing(True)


def build_distillation(dist: DictConfig, t: DictConfig, d: DictConfig, img_size: int, num_classes: int,
                       device: torch.device) -> torch.nn.Module:
    """The criterion of the ``distill`` group; for hard/soft, the frozen teacher with its input adapter."""
    if dist.name == "none":
        return build_criterion("none", t.label_smoothing)
    spec = dist.teacher
    teacher = create_model(spec.name, num_classes=num_classes, img_size=spec.img_size or img_size,
                           source=spec.source, pretrained=spec.pretrained)
    if spec.checkpoint and load_pretrained(teacher, spec.checkpoint).reinitialized:
        raise ConfigError(f"the teacher checkpoint {spec.checkpoint} has a classifier for another number of "
                          f"classes than the student's data ({num_classes}); give a teacher trained on these classes")
    if not (spec.checkpoint or spec.pretrained):
        log.warning("the teacher %s has random weights: set distill.teacher.checkpoint=PATH", spec.name)
    adapter = TeacherInputs(d.mean, d.std, spec.mean, spec.std, spec.img_size)
    teacher = teacher.to(device)
    if use_channels_last(t.get("channels_last", "auto"), teacher, device):
        teacher = teacher.to(memory_format=torch.channels_last)
    return build_criterion(dist.name, t.label_smoothing, teacher, dist.alpha, dist.tau,
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


def build_data_loaders(d: DictConfig, splits: DataSplits, img_size: int, device: torch.device, seed: int,
                       drop_last: bool, world: World | None = None) -> tuple[Any, Any]:
    """Train/val loaders of ``data.pipeline``: batched augmentation on the device for in-memory data (gpu),
    or per-image transforms in loader workers (cpu). Under torchrun, this rank's shares of the batches
    (``data.batch_size`` images per rank and step)."""
    world = world or World()
    pipeline = resolve_pipeline(d.get("pipeline", "auto"), splits.train, device, d.auto_augment, d.color_jitter)
    log.info("data pipeline: %s", pipeline)
    if pipeline == "gpu":
        train_sampler, val_sampler = build_samplers(splits, d.batch_size, seed, drop_last, world.rank, world.size)
        return build_device_loaders(splits, img_size, d.mean, d.std, d.batch_size, device, seed=seed,
                                    crop_padding=d.crop_padding, hflip=d.hflip, interpolation=d.interpolation,
                                    re_prob=d.re_prob, drop_last=drop_last, train_sampler=train_sampler,
                                    val_sampler=val_sampler)
    return build_loaders(splits, d.batch_size, d.num_workers, seed=seed, pin_memory=device.type == "cuda",
                         drop_last=drop_last, rank=world.rank, world_size=world.size)


def build_optimization(
    model: torch.nn.Module, o: DictConfig, s: DictConfig, global_batch: int, steps_per_epoch: int, epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the parameter groups and the per-step schedule. With ``optimizer.scale_lr`` (or an
    ``optimizer.lr_base_batch``) the learning rates scale linearly with the images per optimizer step of
    all processes together (DeiT: lr x global batch / 512)."""
    scaled = o.get("scale_lr") or o.get("lr_base_batch")
    scale = global_batch / (o.get("lr_base_batch") or 512) if scaled else 1.0
    backbone_lr = None if o.backbone_lr is None else o.backbone_lr * scale
    optimizer = build_optimizer(model, o.name, o.lr * scale, backbone_lr, o.weight_decay, tuple(o.betas),
                                o.get("layer_decay"))
    scheduler = build_scheduler(
        optimizer, total_steps=epochs * steps_per_epoch, name=s.name,
        warmup_steps=math.ceil(s.warmup_epochs * steps_per_epoch), min_lr_ratio=s.min_lr_ratio,
        decay_steps=max(1, round(s.get("decay_epochs", 1) * steps_per_epoch)), decay_rate=s.get("decay_rate", 0.1),
    )
    return optimizer, scheduler


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """``trainer.resume``: null (start fresh), ``auto`` (this run folder's last.pt, if any) or a path."""
    if not resume:
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    if not Path(resume).is_file():
        raise ConfigError(f"trainer.resume={resume}: no such file; give a last.pt, or trainer.resume=auto")
    return Path(resume)


def check_resume_position(state: dict[str, Any], global_batch: int) -> None:
    """A checkpoint written inside an epoch continues from its position in the epoch's order, which is
    counted in global batches (``data.batch_size`` x processes): they must be the same as when it was saved."""
    saved = state.get("config", {}).get("data", {}).get("batch_size", 0) * state.get("world_size", 1)
    if state.get("batch_in_epoch", 0) and saved and saved != global_batch:
        raise ConfigError(f"the checkpoint stopped inside an epoch with {saved} images per step (data.batch_size x "
                          f"processes), this run has {global_batch}; resume with the same, or from an epoch's end")


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and write its outputs to ``run_dir``; under torchrun, this
    rank's part of it (rank 0 writes the outputs)."""
    run_dir = Path(run_dir)
    d, m, o, t = cfg.data, cfg.model, cfg.optimizer, cfg.trainer
    world, device = init_distributed(t.device, t.get("dist_backend", "auto"))
    if world.is_main:
        ensure_writable(run_dir / "checkpoints", "hydra.run.dir")
    seed_everything(cfg.seed)
    splits = rank0_first(lambda: build_data(d, m.img_size))  # a download once, not by every process
    mixup = build_mixup(t, splits.num_classes)
    # mixup pairs images: it needs even, so full, batches
    train_loader, val_loader = build_data_loaders(d, splits, m.img_size, device, cfg.seed, mixup is not None, world)
    model = build_model(m, splits.num_classes).to(device)
    if t.grad_checkpointing:
        enable_grad_checkpointing(model, m.name)
    criterion = build_distillation(cfg.distill, t, d, m.img_size, splits.num_classes, device)
    if o.freeze_backbone:
        set_backbone_trainable(model, False)
    steps_per_epoch = math.ceil(len(train_loader) / t.accum_steps)
    optimizer, scheduler = build_optimization(model, o, cfg.scheduler, d.batch_size * t.accum_steps * world.size,
                                              steps_per_epoch, t.epochs)
    log.info("model %s (%.2fM parameters), data %s: %d train / %d val images, %d classes",
             m.name, sum(p.numel() for p in model.parameters()) / 1e6, d.name,
             len(splits.train), len(splits.val), splits.num_classes)
    if world.size > 1:  # the same weights everywhere so far; now each rank's own drop path, mixup, CPU-side crops
        seed_everything(cfg.seed + world.rank)
    trainer = Trainer(
        model, optimizer, scheduler, criterion,
        train_loader, val_loader, run_dir, epochs=t.epochs, device=str(device), precision=t.precision,
        grad_clip=t.grad_clip, log_every=t.log_every, progress=t.progress, accum_steps=t.accum_steps,
        ema_decay=t.ema_decay if t.ema else None, mixup_fn=mixup,
        unfreeze_at_epoch=o.unfreeze_after_epochs if o.freeze_backbone else None,
        checkpoint_every_steps=t.checkpoint_every_steps, keep_last=t.keep_last, skip_nonfinite=t.skip_nonfinite,
        compile=t.compile, channels_last=use_channels_last(t.channels_last, model, device),
        checkpoint_extra={"config": OmegaConf.to_container(cfg, resolve=True), "world_size": world.size,
                          "class_names": splits.class_names, "model_name": m.name, "model_source": m.source},
    )
    resume_from = broadcast_object(find_resume_checkpoint(t.resume, run_dir))  # rank 0's; every rank loads it
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=device)
        check_resume_position(state, d.batch_size * world.size)
        trainer.load_state_dict(state)
        log.info("resumed from %s at epoch %d, step %d", resume_from, trainer.epoch + 1, trainer.step)
    log.info("training on %s%s for %d epochs (%d steps); writing to %s", trainer.device,
             f" x {world.size} processes" if world.size > 1 else "", t.epochs, t.epochs * steps_per_epoch, run_dir)
    metrics = trainer.fit()
    if t.log_images and world.is_main:
        from vitrain.visualize import log_end_of_training  # matplotlib: imported only when asked for

        log_end_of_training(run_dir / "tb", trainer.model, splits.val, trainer.step, d.mean, d.std, splits.class_names)
    log.info("best top-1 %.2f%%, final top-1 %.2f%%, %.0f train img/s, %.1f s",
             metrics["best_top1"], metrics["final_top1"], metrics["train_images_per_sec"],
             metrics["wall_time_sec"])
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the final top-1 so that sweepers can optimise it.

    Exit codes: 1 for a user error (one line on stderr), 143 after SIGTERM and 130 after SIGINT
    (the checkpoint is written first, and the command to resume is printed).
    """
    run_dir = HydraConfig.get().runtime.output_dir
    rank = torchrun_world().rank
    try:
        top1 = train(cfg, run_dir)["final_top1"]
        barrier()  # every rank done before any leaves the group: gloo aborts a rank whose peer is already gone
        return top1
    except Preempted as e:
        overrides = " ".join(o for o in HydraConfig.get().overrides.task if not o.startswith("trainer.resume="))
        if rank == 0:
            print(f"{e}\nresume with: {launcher()} -m vitrain.train {overrides} hydra.run.dir={run_dir} "
                  f"trainer.resume=auto", file=sys.stderr)
        sys.exit(128 + e.signum)
    except (VitrainError, MissingMandatoryValue) as e:
        if cfg.trainer.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(e, MissingMandatoryValue):
            e = VitrainError(f"{e.full_key} has no value; set it on the command line ({e.full_key}=...)")
        print(f"{f'[rank {rank}] ' if rank else ''}error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        close_distributed()


def one_line(error: Exception) -> str:
    """The message itself, also when a data loader worker wrapped it in a traceback."""
    text = str(error).strip()
    if "Traceback" in text:  # "Caught DataError in DataLoader worker ...": keep the original message
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    main()
