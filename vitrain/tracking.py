"""The Trainer's bookkeeping of what it reports, beside the loop: :class:`RunLog` turns the loop's numbers into
calls of a :class:`~vitrain.loggers.Logger` (whichever backends were chosen) and keeps the clock of the whole run.

What goes where, tag by tag: docs/tracking.md.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrain.errors import Preempted
from vitrain.loggers import Logger, TensorBoardLogger, flatten

# the epoch's scalars: tag -> key of the Trainer's history row
EPOCH_TAGS = {"train/epoch_loss": "train_loss", "train/images_per_sec": "images_per_sec", "val/loss": "val_loss",
              "val/top1": "val_top1", "val/top1_ema": "val_top1_ema", "teacher/time_share": "teacher_time_share",
              "data/skipped_corrupt": "skipped_corrupt"}
# the final metrics of a run's HParams row: tag -> key of metrics.json
FINAL_TAGS = {"final/val_top1": "val_top1", "final/best_val_top1": "best_top1", "final/val_loss": "final_val_loss",
              "final/test_top1": "test_top1"}
MIN_IMAGE_SIDE = 64  # smaller images (the 16x16 digits) are enlarged in the grid, pixel by pixel


class RunLog:
    """What the Trainer reports, as logger calls: the config when training starts, the first training batch as the
    model sees it, each logged step's and each epoch's scalars, weight and gradient histograms every
    ``histograms_every`` epochs, and at the end the HParams row (flattened config, final metrics) and the run's
    files. ``metadata`` is the Trainer's: its ``config`` (the whole run config) and ``preprocess`` (the mean and
    std that undo the normalization of the images) are used when present."""

    def __init__(self, logger: Logger, epochs: int, histograms_every: int = 0, image_grid: int = 16,
                 metadata: dict[str, Any] | None = None) -> None:
        metadata = metadata or {}
        self.logger, self.epochs = logger, epochs
        self.histograms_every, self.image_grid = histograms_every, image_grid
        self.config: dict[str, Any] = metadata.get("config", {})
        self.preprocess: dict[str, Any] | None = metadata.get("preprocess")
        self.started, self.first_epoch = time.perf_counter(), 0

    def start(self, epoch: int, step: int) -> None:
        """Training begins, or continues from ``epoch``: the loggers start (a resumed run continues its tracked
        run), the config is logged as YAML, and the clock of the ETA starts."""
        import yaml

        self.started, self.first_epoch = time.perf_counter(), epoch
        self.logger.start(self.config)
        if self.config:
            self.logger.log_text("config.yaml", yaml.safe_dump(self.config, sort_keys=False), step)

    @contextlib.contextmanager
    def running(self, epoch: int, step: int) -> Iterator[None]:
        """The training loop inside :meth:`start` and the loggers' end: an exception ends the tracked run as
        killed (:class:`~vitrain.errors.Preempted`: to be resumed) or failed, and goes on."""
        try:
            self.start(epoch, step)
            yield
        except BaseException as e:
            self.logger.close("killed" if isinstance(e, Preempted) else "failed")
            raise

    def images(self, images: torch.Tensor, step: int) -> None:
        """A grid of the first ``image_grid`` images of a training batch, augmented and mixed as the model sees
        them, with the normalization undone (without a known mean and std: stretched to [0, 1])."""
        if not self.image_grid:
            return
        from torchvision.utils import make_grid

        batch = images[:self.image_grid].detach().float().cpu()
        if self.preprocess is not None:
            mean, std = (torch.tensor(self.preprocess[k]).view(-1, 1, 1) for k in ("mean", "std"))
            batch = (batch * std + mean).clamp(0, 1)
        if batch.shape[-1] < MIN_IMAGE_SIDE:
            batch = nn.functional.interpolate(batch, scale_factor=math.ceil(MIN_IMAGE_SIDE / batch.shape[-1]))
        grid = make_grid(batch, nrow=math.ceil(math.sqrt(len(batch))), normalize=self.preprocess is None)
        self.logger.log_images("train/batch", grid, step)

    def step(self, step: int, loss: float, top1: float | None, grad_norm: torch.Tensor | None,
             learning_rates: dict[str, float], bar: Any = None) -> None:
        """A logged step: the mean training loss of the window, its top-1 (hard labels only), the global
        gradient norm before clipping and the learning rate of each parameter group; the loss and the largest
        learning rate also on the progress bar (a tqdm)."""
        scalars = {"train/loss": loss, **{f"lr/{name}": lr for name, lr in learning_rates.items()}}
        if top1 is not None:
            scalars["train/top1"] = top1
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        self.logger.log_scalars(scalars, step)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{max(learning_rates.values()):.2e}")

    def epoch(self, row: dict[str, float], step: int) -> None:
        """An epoch's scalars (its row of the history), written out at once."""
        self.logger.log_epoch({tag: row[key] for tag, key in EPOCH_TAGS.items() if key in row}, step, int(row["epoch"]))
        self.logger.flush()

    def eta(self, epoch: int) -> str:
        """The time the whole run still needs after ``epoch`` (1-based): the mean epoch time so far (evaluation
        and saving included) x the epochs left."""
        per_epoch = (time.perf_counter() - self.started) / max(1, epoch - self.first_epoch)
        return format_duration(per_epoch * (self.epochs - epoch))

    def histograms_due(self, epoch: int) -> bool:
        """``trainer.histograms_every=N``: at the first step, and at the first step after every N epochs."""
        return self.histograms_every > 0 and epoch % self.histograms_every == 0

    def histograms(self, model: nn.Module, step: int) -> None:
        """The trainable weights and their gradients, as histograms."""
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        tensors = {f"weights/{name}": p for name, p in trained}
        tensors |= {f"grads/{name}": p.grad for name, p in trained if p.grad is not None}
        self.logger.log_histograms(tensors, step)

    def end(self, metrics: dict[str, Any], step: int, files: list[Path], checkpoint: Path) -> None:
        """The run's row of the HParams table (flattened config, final metrics), its files and best checkpoint as
        artifacts; then the loggers close."""
        finals = {tag: float(metrics[key]) for tag, key in FINAL_TAGS.items() if metrics.get(key) is not None}
        self.logger.log_hparams(flatten(self.config), finals, step)
        for path in files:
            if path.is_file():
                self.logger.log_artifact(path)
        if checkpoint.is_file():
            self.logger.log_artifact(checkpoint, checkpoint=True)
        self.logger.close("pruned" if metrics.get("state") == "pruned" else "finished")


def skipped_samples(loader: object) -> dict[str, int]:
    """``{"skipped_corrupt": n}``: the unreadable samples a loader skipped so far (``data.skip_corrupt``), summed
    over the ranks; empty for loaders that never skip."""
    if not hasattr(loader, "skipped"):
        return {}
    from vitrain import distributed

    return {"skipped_corrupt": int(distributed.all_reduce_sum(torch.tensor(loader.skipped)).item())}


def default_logger(run_dir: str | Path, is_main: bool) -> Logger:
    """The Trainer's logger when it is given none (a notebook): TensorBoard in ``<run_dir>/tb`` on rank 0."""
    return TensorBoardLogger(Path(run_dir) / "tb") if is_main else Logger()


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``1h05m``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
