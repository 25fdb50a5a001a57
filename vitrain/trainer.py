"""The training loop: one plain PyTorch loop for fine-tuning and distillation.

batch -> autocast forward -> loss(inputs, outputs, labels) -> backward -> clip -> step -> schedule -> log
-> checkpoint, with evaluation after every epoch. :class:`TrainerConfig` is the schema of the ``trainer``
config group; the guards (NaN/inf, stop signals) are in :mod:`vitrain.guards`, what a checkpoint holds in
:mod:`vitrain.run_state`, the checkpoint files in
:mod:`vitrain.checkpoint`, what is logged and when in :mod:`vitrain.tracking` (to :mod:`vitrain.loggers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn
from tqdm import tqdm

from vitrain import distributed
from vitrain.checkpoint import set_rng_state, write_text
from vitrain.distributed import resolve_device
from vitrain.guards import NonFiniteGuard, StopSignals
from vitrain.loggers import Logger
from vitrain.metrics import LossWindow, full_tensor, gradient_norm, score
from vitrain.optim import set_backbone_trainable
from vitrain.parallel import parallelize, uses_fsdp, weights_of
from vitrain.pruning import NoPruning
from vitrain.run_state import SavesState, TrainState
from vitrain.runtime import autocast_dtype, use_channels_last
from vitrain.saving import BackgroundSaves
from vitrain.schema.trainer import TrainerConfig
from vitrain.tracking import RunLog, default_logger, skipped_samples

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Loaders:
    """What the Trainer reads: training batches, validation batches (model selection: best.pt), timm's
    mixup/cutmix (or None) applied to every training batch on the device, and test batches (or None),
    scored once at the end with the best weights."""

    train: Iterable[Batch]
    val: Iterable[Batch]
    mixup: Callable[[torch.Tensor, torch.Tensor], Batch] | None = None
    test: Iterable[Batch] | None = None


class Trainer(SavesState):
    """Trains ``model`` as ``config`` says and writes checkpoints and ``metrics.json`` under ``run_dir``;
    ``metadata`` (model spec, preprocessing, class names, the run config, ...) goes into every checkpoint. It logs
    through ``logger`` (default: TensorBoard in ``<run_dir>/tb``).

    Under torchrun (a ``torch.distributed`` process group), every rank runs this loop on its share of the
    batches with the model in DistributedDataParallel; rank 0 alone writes files."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, criterion: nn.Module,
                 loaders: Loaders, config: TrainerConfig, run_dir: str | Path,
                 metadata: dict[str, Any] | None = None, logger: Logger | None = None,
                 trial: Any = None) -> None:
        self.config, self.loaders, self.metadata = config, loaders, metadata or {}
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device = resolve_device(config.device)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        channels_last = use_channels_last(config.channels_last, model, self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)  # checkpoints, EMA, evaluation
        if config.freeze_backbone:
            set_backbone_trainable(self.model, False)
        self.criterion = criterion.to(self.device)  # a teacher in it runs on every rank, outside DDP
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay) if config.ema else None  # timm's weight EMA
        if self.ema is not None and uses_fsdp(config.strategy):  # sharded as the model: updated shard by shard
            parallelize(self.ema.module, config.strategy, config.fsdp, self.device, self.amp_dtype)
        self._build_train_model()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.run_dir, self.is_main = Path(run_dir), distributed.is_main()
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = logger if logger is not None else default_logger(self.run_dir, self.is_main)
        self.trial = trial if trial is not None else NoPruning()  # a pruned search's trial: reports every epoch
        self.run_log = RunLog(self.logger, config.epochs, config.histograms_every, config.image_grid, self.metadata)
        self.state = TrainState()
        self.guard = NonFiniteGuard(self.ckpt_dir / "last.pt", config.max_skipped_fraction)
        self.stop = StopSignals()
        self._resumed_rng: dict[str, Any] | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        self.saves, self._side_group = BackgroundSaves(config.async_save), None  # see SavesState._save

    def _build_train_model(self) -> None:
        """The model of the training step: in DDP under torchrun. trainer.compile: the forward and loss
        compile into one graph (the loss fuses into the last kernels); with a distillation loss, whose
        teacher is timed outside any graph, the student alone."""
        self.train_model = parallelize(self.model, self.config.strategy, self.config.fsdp, self.device, self.amp_dtype,
                                       self.optimizer)
        self.forward_loss = self._forward_loss
        if self.config.compile and hasattr(self.criterion, "teacher"):
            self.train_model = torch.compile(self.train_model)
        elif self.config.compile:
            self.forward_loss = torch.compile(self._forward_loss)

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with self._autocast():
            outputs = self.train_model(images)
            return self.criterion(images, outputs, labels), outputs

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def fit(self) -> dict[str, Any]:
        """Train (from where a resumed checkpoint stopped), evaluate after every epoch, checkpoint; return
        (and write) the final metrics. SIGTERM/SIGINT end the current step, save, and raise :class:`Preempted`."""
        start, s = time.perf_counter(), self.state
        with self.run_log.running(s.epoch, s.step), self.stop.catch(), self.saves.flushed():
            for epoch in range(s.epoch, self.config.epochs):
                s.epoch = epoch
                self._run_epoch(epoch)
                if s.pruned:
                    break
        metrics = {"best_top1": s.best_top1, "final_top1": s.history[-1]["val_top1"],
                   "final_val_loss": s.history[-1]["val_loss"], "epochs": self.config.epochs, "steps": s.step,
                   "train_images_per_sec": s.train_images / max(s.train_time, 1e-9),
                   "wall_time_sec": time.perf_counter() - start, "skipped_nonfinite": s.skipped_nonfinite,
                   "epochs_trained": len(s.history), "state": "pruned" if s.pruned else "complete",
                   "history": s.history}
        if self.ema is not None:
            metrics["final_top1_ema"] = s.history[-1]["val_top1_ema"]
        metrics["val_top1"] = metrics["final_top1"]  # final_top1 and best_top1 are validation figures too
        tested = time.perf_counter()
        metrics["test_top1"] = self.test_best() if self.loaders.test is not None and not s.pruned else None
        metrics["test_time_sec"] = time.perf_counter() - tested
        if self.is_main:
            write_text(json.dumps(metrics, indent=2), self.run_dir / "metrics.json")
        self.run_log.end(metrics, s.step, [self.run_dir / "metrics.json"], self.ckpt_dir / "best.pt")
        return metrics

    def _run_epoch(self, epoch: int) -> None:
        """Train one epoch, evaluate (raw and EMA weights), log, and save last.pt (and best.pt)."""
        self._maybe_unfreeze(epoch)
        t0, teacher0 = time.perf_counter(), getattr(self.criterion, "teacher_seconds", None)
        train_loss, seen = self.train_one_epoch(epoch)
        epoch_time = time.perf_counter() - t0
        self.state.train_time += epoch_time
        self.state.train_images += seen
        val = self.evaluate()
        self.guard.check_validation(val["loss"], epoch, self.state.skipped_nonfinite)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"], "val_top1": val["top1"],
               "images_per_sec": seen / epoch_time, **skipped_samples(self.loaders.train)}
        if self.ema is not None:
            row["val_top1_ema"] = self.evaluate(self.ema.module)["top1"]
        if teacher0 is not None:  # what the teacher's forward passes cost of the training time
            row["teacher_time_share"] = (self.criterion.teacher_seconds - teacher0) / epoch_time
        self.state.history.append(row)
        self._log_epoch(row)
        self.state.next_epoch()
        path = self._save(val)
        if stop := self.stop.received():  # a signal during the epoch's last step or its validation
            self._preempt(stop, path)
        self.state.pruned = self._report_trial(epoch, val["top1"]) and epoch + 1 < self.config.epochs  # else done

    def _report_trial(self, epoch: int, top1: float) -> bool:
        """A trial of a pruned Optuna search reports its validation top-1 (rank 0); the study's pruner may stop it
        at this epoch's end, on every rank (not after the last epoch: the trial has run through, and is complete)."""
        return bool(distributed.broadcast_object(self.trial.report(epoch, top1) if self.is_main else False))

    def train_one_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over the training set; returns (mean train loss, images seen by all ranks).

        With ``accum_steps`` > 1 the gradients of that many batches are summed (each loss divided by
        ``accum_steps``) before one optimizer step, which then equals one step on the joined batch."""
        cfg, s = self.config, self.state
        first, bar = s.batch_in_epoch, self._epoch_batches(epoch)  # first > 0: resumed inside this epoch
        if bar is None:  # saved after the epoch's last batch: its training is done, its validation is not
            return s.epoch_loss / max(1, first), 0
        batches = bar.total
        epoch_loss, window = torch.full((), s.epoch_loss, device=self.device), LossWindow(self.device)
        seen = 0
        self.optimizer.zero_grad(set_to_none=True)
        for i, (images, labels) in enumerate(bar, start=first):
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            if self.loaders.mixup is not None:
                images, labels = self.loaders.mixup(images, labels)  # labels become soft targets (B, classes)
            if s.step == 0 and i == 0:  # what the model sees: augmented, mixed
                self.run_log.images(images, s.step)
            steps = (i + 1) % cfg.accum_steps == 0 or i + 1 == batches  # else: keep accumulating gradients
            with self._sync_gradients(steps):
                loss, outputs = self.forward_loss(images, labels)
                if cfg.skip_nonfinite and self.guard.is_bad(loss):
                    self._skip_batch(epoch, i, batches)
                    continue
                self.guard.record(loss, s.step + 1, epoch, i)
                weight = distributed.last_batch_weight(labels.shape[0], self.device) if i + 1 == batches else 1.0
                self.scaler.scale(loss * weight / cfg.accum_steps).backward()
            seen += labels.shape[0]
            window.add(loss, outputs, labels)
            if not steps:
                continue
            grad_norm = self._optimizer_step()
            s.batch_in_epoch = i + 1
            if s.step % cfg.log_every == 0:
                self.guard.check()
                epoch_loss += window.total
                self.run_log.step(s.step, *window.pop(), grad_norm, self.learning_rates(), bar)
            self._checkpoint_mid_epoch(epoch_loss, window)
        self.guard.check()
        epoch_loss += window.total
        seen = int(distributed.all_reduce_sum(torch.tensor(seen)).item())  # images of all ranks
        return distributed.all_reduce_mean(epoch_loss).item() / max(1, batches), seen

    def _epoch_batches(self, epoch: int) -> tqdm | None:
        """The epoch's batches from ``state.batch_in_epoch`` on, in a progress bar whose ``total`` is the
        epoch's batch count; after a resume, the random generators as they were after the saved step. None when
        the checkpoint was saved after the epoch's last batch."""
        self.model.train()
        first, loader = self.state.batch_in_epoch, self.loaders.train
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            if first and first >= len(loader):
                return None
            sampler.set_epoch(epoch, start=first * loader.batch_size)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (self.config.progress and self.is_main), initial=first, total=first + len(loader))
        if self._resumed_rng is not None:
            set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        return bar

    def _sync_gradients(self, steps: bool) -> contextlib.AbstractContextManager:
        """While accumulating, DDP need not average every batch's gradients, only their sum."""
        if steps:
            return contextlib.nullcontext()
        return getattr(self.train_model, "no_sync", contextlib.nullcontext)()

    def _optimizer_step(self) -> torch.Tensor | None:
        """Clip, step (through the fp16 grad scaler when on), clear gradients, schedule, update the EMA. Returns
        the global gradient norm before clipping, when measured: at every clipped step and every logged one."""
        cfg, s, norm = self.config, self.state, None
        if cfg.grad_clip or (s.step + 1) % cfg.log_every == 0:
            self.scaler.unscale_(self.optimizer)
            norm = full_tensor(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip
                               else gradient_norm(self.model.parameters()))
        if self.run_log.histograms_due(s.epoch) and s.batch_in_epoch == 0:  # the epoch's first step
            self.run_log.histograms(self.model, s.step + 1)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        s.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=s.step)
        return norm

    def _maybe_unfreeze(self, epoch: int) -> None:
        """``trainer.unfreeze_after_epochs``: from that epoch on, the whole model trains."""
        after = self.config.unfreeze_after_epochs
        frozen = any(not p.requires_grad for p in self.model.parameters())
        if self.config.freeze_backbone and after is not None and epoch >= after and frozen:
            set_backbone_trainable(self.model, True)
            if distributed.world_size() > 1:  # DDP reduces only the parameters trainable when it wrapped
                self._build_train_model()

    def _skip_batch(self, epoch: int, batch: int, batches: int) -> None:
        """``trainer.skip_nonfinite``: drop a batch whose loss is NaN/inf before it reaches the weights; past
        ``trainer.max_skipped_fraction`` of the epoch's batches, stop."""
        self.state.skipped_nonfinite += 1
        self.state.skipped_in_epoch += 1
        self.guard.check_skipped(self.state.skipped_in_epoch, batches, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        self.logger.log_scalars({"train/skipped_nonfinite": self.state.skipped_nonfinite}, self.state.step)
        log.warning("non-finite loss at epoch %d batch %d: batch skipped (%d so far)", epoch + 1, batch + 1,
                    self.state.skipped_nonfinite)

    def _checkpoint_mid_epoch(self, epoch_loss: torch.Tensor, window: LossWindow) -> None:
        """Every ``checkpoint_every_steps`` steps, and when a stop signal came: save where we are (with the
        epoch's loss so far, so that a resumed epoch reports the same mean)."""
        every, stop = self.config.checkpoint_every_steps, self.stop.received()  # every rank stops after one step
        if not stop and not (every and self.state.step % every == 0):
            return
        self.guard.check()
        self.state.epoch_loss = distributed.all_reduce_mean(epoch_loss + window.total).item()
        path = self._save()
        if stop:
            self._preempt(stop, path)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        """:func:`vitrain.metrics.score` of ``model`` (default: the trained one) on the validation set."""
        return score(self.model if model is None else model, self.loaders.val, self.device, self._autocast,
                     self.memory_format, lockstep=uses_fsdp(self.config.strategy))

    def test_best(self) -> float:
        """Top-1 on the test set of the weights that scored best on the validation set (best.pt's): the one
        look at the test set, after model selection."""
        best = self._best_weights
        if best is None and (self.ckpt_dir / "best.pt").is_file():  # resumed after the last new best
            best = torch.load(self.ckpt_dir / "best.pt", map_location="cpu", weights_only=True)["model"]
        if best is None:
            log.warning("no best weights in memory or in %s: the test set scores the final weights", self.ckpt_dir)
            return score(self.model, self.loaders.test, self.device, self._autocast, self.memory_format,
                         lockstep=uses_fsdp(self.config.strategy))["top1"]
        with weights_of(self.model, best) as model:
            top1 = score(model, self.loaders.test, self.device, self._autocast, self.memory_format,
                         lockstep=uses_fsdp(self.config.strategy))["top1"]
        log.info("test top-1 %.2f%% (the best validation epoch's weights)", top1)
        return top1

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate of each part (``backbone``, ``head``)."""
        return {g.get("name", str(i)).removesuffix("_no_decay"): g["lr"]
                for i, g in enumerate(self.optimizer.param_groups)}

    def _log_epoch(self, row: dict[str, float]) -> None:
        """The epoch's scalars to the loggers, and its line in the log, with the time the whole run still needs."""
        self.run_log.epoch(row, self.state.step)
        extra = "".join(f"  {k} {row[k]:.3g}" for k in ("val_top1_ema", "teacher_time_share") if k in row)
        log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_top1 %.2f%%  %.0f img/s%s  eta %s",
                 row["epoch"], self.config.epochs, row["train_loss"], row["val_loss"], row["val_top1"],
                 row["images_per_sec"], extra, self.run_log.eta(row["epoch"]))
