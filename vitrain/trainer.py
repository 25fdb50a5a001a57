"""The training loop: one plain PyTorch loop for fine-tuning and distillation.

batch -> autocast forward -> loss(inputs, outputs, labels) -> backward -> clip -> step -> schedule,
with TensorBoard logging, evaluation every epoch and ``last.pt``/``best.pt`` checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from vitrain import __version__, distributed
from vitrain.checkpoint import rng_state, set_rng_state, write_checkpoints
from vitrain.distributed import resolve_device  # also imported from here by the entry points
from vitrain.errors import ConfigError, NonFiniteLoss, Preempted
from vitrain.optim import set_backbone_trainable

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision``; ``auto`` is bf16 on CUDA and fp32 on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown trainer.precision '{precision}'; choose auto, fp32, bf16 or fp16")
    return PRECISIONS[precision]


class Trainer:
    """Trains ``model`` for ``epochs`` epochs and writes TensorBoard logs, checkpoints and metrics
    under ``run_dir``. ``checkpoint_extra`` (config, class names, ...) is stored in every checkpoint.

    Under torchrun (a ``torch.distributed`` process group), every rank runs this loop on its share of
    the batches with the model in DistributedDataParallel; rank 0 alone writes files."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        criterion: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader,
        run_dir: str | Path,
        epochs: int,
        device: str = "auto",
        precision: str = "auto",
        grad_clip: float | None = None,
        log_every: int = 10,
        progress: bool = True,
        checkpoint_extra: dict[str, Any] | None = None,
        accum_steps: int = 1,
        ema_decay: float | None = None,
        mixup_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        unfreeze_at_epoch: int | None = None,
        checkpoint_every_steps: int | None = None,
        keep_last: int = 1,
        skip_nonfinite: bool = False,
        compile: bool = False,
        channels_last: bool = False,
    ) -> None:
        if epochs <= 0:
            raise ConfigError(f"trainer.epochs must be positive, got {epochs}")
        if accum_steps < 1:
            raise ConfigError(f"trainer.accum_steps must be at least 1, got {accum_steps}")
        self.device = resolve_device(device)
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)  # checkpoints, EMA, evaluation
        self.criterion = criterion.to(self.device)  # a teacher in it runs on every rank, outside DDP
        self.compile, self.is_main = compile, distributed.is_main()
        self._build_train_model()
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.epochs, self.grad_clip, self.progress = epochs, grad_clip, progress
        self.log_every = max(1, log_every)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.run_dir = Path(run_dir)
        self.checkpoint_extra = checkpoint_extra or {}
        self.accum_steps, self.mixup_fn, self.unfreeze_at_epoch = accum_steps, mixup_fn, unfreeze_at_epoch
        # timm's EMA of the weights, evaluated and saved beside them
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay else None
        self.checkpoint_every_steps, self.keep_last = checkpoint_every_steps, keep_last
        self.skip_nonfinite = skip_nonfinite
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.writer = SummaryWriter(str(self.run_dir / "tb")) if self.is_main else distributed.NullWriter()
        # where training stands: all of it goes into every checkpoint, so a run can continue exactly
        self.epoch, self.batch_in_epoch, self.step, self.best_top1 = 0, 0, 0, float("-inf")
        self.history: list[dict[str, float]] = []
        self.train_time, self.train_images, self.skipped = 0.0, 0, 0
        self._resumed_rng: dict[str, Any] | None = None
        self._stop_signal: int | None = None
        # losses of steps not yet checked for NaN/inf, with (step, epoch, batch): checked in one host
        # sync when the loss is logged and before every checkpoint, not after every step
        self._unchecked: list[tuple[torch.Tensor, int, int, int]] = []

    def _build_train_model(self) -> None:
        """The model of the training step: in DDP under torchrun. trainer.compile: the forward and loss
        compile into one graph (the loss fuses into the last kernels); with a distillation loss, whose
        teacher is timed outside any graph, the student alone."""
        self.train_model, self.forward_loss = distributed.wrap_ddp(self.model, self.device), self._forward_loss
        if self.compile and hasattr(self.criterion, "teacher"):
            self.train_model = torch.compile(self.train_model)
        elif self.compile:
            self.forward_loss = torch.compile(self._forward_loss)

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.criterion(images, self.train_model(images), labels)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def fit(self) -> dict[str, Any]:
        """Train (from where a resumed checkpoint stopped), evaluate after every epoch, checkpoint;
        return (and write) the final metrics. SIGTERM/SIGINT end the current step, save, and raise
        :class:`Preempted`."""
        start = time.perf_counter()
        with self._catch_stop_signals():
            for epoch in range(self.epoch, self.epochs):
                self.epoch = epoch
                self._run_epoch(epoch)
        metrics = {
            "best_top1": self.best_top1,
            "final_top1": self.history[-1]["val_top1"],
            "final_val_loss": self.history[-1]["val_loss"],
            "epochs": self.epochs,
            "steps": self.step,
            "train_images_per_sec": self.train_images / max(self.train_time, 1e-9),
            "wall_time_sec": time.perf_counter() - start,
            "skipped_nonfinite": self.skipped,
            "history": self.history,
        }
        if self.ema is not None:
            metrics["final_top1_ema"] = self.history[-1]["val_top1_ema"]
        if self.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.writer.close()
        return metrics

    def _run_epoch(self, epoch: int) -> None:
        frozen = any(not p.requires_grad for p in self.model.parameters())
        if self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch and frozen:
            set_backbone_trainable(self.model, True)
            if distributed.world_size() > 1:  # DDP reduces only the parameters trainable when it wrapped
                self._build_train_model()
        t0, teacher0 = time.perf_counter(), getattr(self.criterion, "teacher_seconds", None)
        train_loss, seen = self.train_one_epoch(epoch)
        epoch_time = time.perf_counter() - t0
        self.train_time, self.train_images = self.train_time + epoch_time, self.train_images + seen
        val = self.evaluate()
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"], "val_top1": val["top1"],
               "images_per_sec": seen / epoch_time}
        if self.ema is not None:
            row["val_top1_ema"] = self.evaluate(self.ema.module)["top1"]
        if teacher0 is not None:  # what the teacher's forward passes cost of the training time
            row["teacher_time_share"] = (self.criterion.teacher_seconds - teacher0) / epoch_time
        self.history.append(row)
        self._log_epoch(row)
        self.epoch, self.batch_in_epoch = epoch + 1, 0
        self._save(val)

    @contextlib.contextmanager
    def _catch_stop_signals(self) -> Any:
        """While training, SIGTERM and SIGINT only set a flag that the loop checks after each step."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def request_stop(signum: int, frame: Any) -> None:
            self._stop_signal = signum

        for s in previous:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def train_one_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over the training set; returns (mean train loss, images seen).

        With ``accum_steps`` > 1 the gradients of that many batches are summed (each loss divided by
        ``accum_steps``) before one optimizer step, which then equals one step on the joined batch.
        """
        self.model.train()
        epoch_loss = torch.zeros((), device=self.device)
        window_loss, window_batches, seen = torch.zeros((), device=self.device), 0, 0
        first = self.batch_in_epoch  # > 0 when resuming inside this epoch
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch, start=first * self.train_loader.batch_size)
        batches = first + len(self.train_loader)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                   disable=not (self.progress and self.is_main), dynamic_ncols=True, initial=first, total=batches)
        if self._resumed_rng is not None:  # the generators as they were after the saved step
            set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        self.optimizer.zero_grad(set_to_none=True)
        for i, (images, labels) in enumerate(bar, start=first):
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            if self.mixup_fn is not None:
                images, labels = self.mixup_fn(images, labels)  # labels become soft targets (B, classes)
            steps = (i + 1) % self.accum_steps == 0 or i + 1 == batches  # else: keep accumulating gradients
            # while accumulating, DDP need not average every batch's gradients, only their sum
            with contextlib.nullcontext() if steps else getattr(self.train_model, "no_sync", contextlib.nullcontext)():
                loss = self.forward_loss(images, labels)
                if self.skip_nonfinite and not self._keep_batch(loss, epoch, i):
                    continue
                self._unchecked.append((loss.detach(), self.step + 1, epoch, i))
                weight = distributed.last_batch_weight(labels.shape[0], self.device) if i + 1 == batches else 1.0
                self.scaler.scale(loss * weight / self.accum_steps).backward()
            seen += labels.shape[0]
            window_loss += loss.detach().float()  # summed on the device
            window_batches += 1
            if not steps:
                continue
            self._optimizer_step()
            self.batch_in_epoch = i + 1
            if self.step % self.log_every == 0:
                self._check_finite()
                epoch_loss += window_loss
                # logged: the mean over the ranks of their windows' mean losses
                self._log_step(bar, distributed.all_reduce_mean(window_loss / max(1, window_batches)).item())
                window_loss.zero_()
                window_batches = 0
            self._checkpoint_mid_epoch()
        self._check_finite()
        epoch_loss += window_loss
        seen = int(distributed.all_reduce_sum(torch.tensor(seen)).item())  # images of all ranks
        return distributed.all_reduce_mean(epoch_loss).item() / max(1, batches - first), seen

    def _keep_batch(self, loss: torch.Tensor, epoch: int, batch: int) -> bool:
        """``skip_nonfinite``: drop a batch whose loss is NaN/inf before it reaches the weights (this
        costs one host sync per step, which is why it is opt-in)."""
        if not distributed.any_rank(int(not torch.isfinite(loss).item())):  # all ranks keep the batch, or none
            return True
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.writer.add_scalar("train/skipped_nonfinite", self.skipped, self.step)
        log.warning("non-finite loss at epoch %d batch %d: batch skipped (%d so far)", epoch + 1, batch + 1,
                    self.skipped)
        return False

    def _check_finite(self) -> None:
        """Stop at the first NaN/inf loss since the last check, naming its step and the last good
        checkpoint. Called before every log and checkpoint, so weights that a bad step may have
        touched are never saved; one host sync per check instead of one per step."""
        if not self._unchecked:
            return
        losses = torch.stack([loss.float() for loss, *_ in self._unchecked])
        losses = distributed.all_reduce_sum(losses).cpu()  # NaN when NaN on any rank: all ranks stop together
        unchecked, self._unchecked = self._unchecked, []
        bad = torch.nonzero(~torch.isfinite(losses)).flatten()
        if len(bad) == 0:
            return
        _, step, epoch, batch = unchecked[bad[0]]
        last = self.ckpt_dir / "last.pt"
        raise NonFiniteLoss(
            f"the loss is {losses[bad[0]].item()} at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
            f"last good checkpoint: {last if last.exists() else 'none yet'}; lower optimizer.lr, set "
            f"trainer.grad_clip, or trainer.skip_nonfinite=true to skip such batches"
        )

    def _checkpoint_mid_epoch(self) -> None:
        """Every ``checkpoint_every_steps`` steps, and when a stop signal came: save where we are."""
        every = self.checkpoint_every_steps
        stop = distributed.any_rank(self._stop_signal or 0)  # every rank stops after the same step
        if not stop and not (every and self.step % every == 0):
            return
        self._check_finite()
        path = self._save()
        if stop:
            distributed.barrier()  # the other ranks exit once rank 0 has written the checkpoint
            raise Preempted(stop, self.step, path)

    def _optimizer_step(self) -> None:
        """Clip, step (through the fp16 grad scaler when on), clear gradients, schedule, update the EMA."""
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Mean cross-entropy and top-1 accuracy (percent) of ``model`` (default: the trained one)
        on the validation set."""
        model = model if model is not None else self.model
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        total = 0
        for images, labels in self.val_loader:
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            with self._autocast():
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
            total += labels.shape[0]
        # exact over the whole set: each rank scored its own images (none twice), the sums add up
        correct, total = distributed.all_reduce_sum(torch.stack([correct, correct.new_tensor(total)])).tolist()
        return {"loss": distributed.all_reduce_sum(loss_sum).item() / total, "top1": 100.0 * correct / total}

    def learning_rates(self) -> dict[str, float]:
        """Current learning rate of each part (``backbone``, ``head``)."""
        return {g.get("name", str(i)).removesuffix("_no_decay"): g["lr"]
                for i, g in enumerate(self.optimizer.param_groups)}

    def _log_step(self, bar: tqdm, loss: float) -> None:
        self.writer.add_scalar("train/loss", loss, self.step)
        lrs = self.learning_rates()
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, self.step)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(lrs.values()):.2e}")

    def _log_epoch(self, row: dict[str, float]) -> None:
        step = self.step
        self.writer.add_scalar("train/epoch_loss", row["train_loss"], step)
        self.writer.add_scalar("train/images_per_sec", row["images_per_sec"], step)
        self.writer.add_scalar("val/loss", row["val_loss"], step)
        self.writer.add_scalar("val/top1", row["val_top1"], step)
        for key in ("val_top1_ema", "teacher_time_share"):
            if key in row:
                self.writer.add_scalar(f"{key.split('_', 1)[0]}/{key.split('_', 1)[1]}", row[key], step)
        self.writer.flush()
        extra = "".join(f"  {k} {row[k]:.3g}" for k in ("val_top1_ema", "teacher_time_share") if k in row)
        log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_top1 %.2f%%  %.0f img/s%s",
                 row["epoch"], self.epochs, row["train_loss"], row["val_loss"], row["val_top1"],
                 row["images_per_sec"], extra)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, schedule, scaler, EMA, position
        (epoch, batch within it, step), history and the random generators."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                 "best_top1": self.best_top1, "history": self.history, "train_time": self.train_time,
                 "train_images": self.train_images, "skipped_nonfinite": self.skipped, "rng": rng_state(),
                 "vitrain_version": __version__, **self.checkpoint_extra}
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "model_ema" in state:
            self.ema.module.load_state_dict(state["model_ema"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.best_top1, self.history = state["best_top1"], list(state["history"])
        self.train_time, self.train_images = state["train_time"], state["train_images"]
        self.skipped = state.get("skipped_nonfinite", 0)
        self._resumed_rng = distributed.own_entry(state.get("rng_ranks"), state["rng"])

    def _save(self, val: dict[str, float] | None = None) -> Path:
        """Write ``last.pt`` (and ``best.pt`` when ``val`` is a new best); with ``keep_last`` > 1, also
        keep that many numbered checkpoints. Returns the path written."""
        state = self.state_dict()
        if distributed.world_size() > 1:  # each rank's generators, for an exact resume on as many ranks
            state["rng_ranks"] = distributed.gather_objects(state["rng"])
        best = val is not None and val["top1"] > self.best_top1
        if best:
            self.best_top1 = state["best_top1"] = val["top1"]
        if not self.is_main:  # the ranks hold the same weights: rank 0 writes them
            return self.ckpt_dir / "last.pt"
        return write_checkpoints(state, self.ckpt_dir, val if best else None, self.keep_last)
