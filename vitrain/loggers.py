"""Where a run's numbers go: TensorBoard, MLflow and Weights & Biases, one or several at once.

:class:`Logger` is the small interface the Trainer logs through: the run's config when it starts, scalars at a
step, text, an image grid, histograms, the hyperparameters with the final metrics, files as artifacts, and a
``state_dict`` (the MLflow and W&B run ids) that goes into every checkpoint, so that a resumed run continues the
same tracked run. The base class logs nothing: it stands in on ranks other than 0 and when no logger is chosen.
:class:`MultiLogger` fans out to several. :class:`LoggerConfig` is the schema of the ``logger`` config group;
the MLflow logger is in :mod:`vitrain.mlflow_logger`; MLflow and W&B are imported only when chosen.
:class:`RunLog` (in :mod:`vitrain.tracking`) is the Trainer's bookkeeping on top of these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vitrain.errors import ConfigError, VitrainError, first_line
from vitrain.schema.loggers import BACKENDS, WANDB_MODES, LoggerConfig, MLflowConfig, TensorBoardConfig, WandbConfig  # noqa: F401

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's tag of a nested run: its parent's run id


class Logger:
    """The interface every backend implements, and the logger that logs nothing."""

    def start(self, config: dict[str, Any]) -> None:
        """The run begins, or continues after :meth:`load_state_dict`; ``config`` is its whole config (nested)."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Scalars by tag (``train/loss``, ``val/top1``) at an optimizer step."""

    def log_epoch(self, scalars: dict[str, float], step: int, epoch: int) -> None:
        """An epoch's scalars (validation, epoch loss): at the optimizer step, where a backend has one axis for all;
        a backend whose runs are browsed epoch by epoch (MLflow) takes the epoch (1-based) as their step."""
        self.log_scalars(scalars, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A text (the config's YAML); ``tag`` is also its file name where a backend stores files."""

    def log_images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """One image, (3, H, W) with values in [0, 1]."""

    def log_histograms(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """The distribution of each tensor's values (weights, gradients)."""

    def log_hparams(self, config: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """The run's flattened config and its final metrics: its row in the table of a sweep."""

    def log_artifact(self, path: Path, checkpoint: bool = False) -> None:
        """A file of the run (``metrics.json``); ``checkpoint``: a model checkpoint, which a backend may leave out."""

    def flush(self) -> None:
        """Write what is buffered (at every epoch's end)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same tracked run; it goes into every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the tracked run of a checkpoint's :meth:`state_dict` (before :meth:`start`)."""

    def close(self, status: str = "finished") -> None:
        """The run is over: ``finished``, ``failed``, ``killed`` (stopped by a signal, to be resumed), or ``pruned``
        (stopped by a sweep's pruner)."""


class MultiLogger(Logger):
    """Several loggers as one: every call goes to each, in order."""

    def __init__(self, loggers: Iterable[Logger]) -> None:
        self.loggers = list(loggers)

    def _each(self, method: str, *args: Any) -> None:
        for logger in self.loggers:
            getattr(logger, method)(*args)

    def start(self, config: dict[str, Any]) -> None:
        self._each("start", config)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._each("log_scalars", scalars, step)

    def log_epoch(self, scalars: dict[str, float], step: int, epoch: int) -> None:
        self._each("log_epoch", scalars, step, epoch)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._each("log_text", tag, text, step)

    def log_images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        self._each("log_images", tag, grid, step)

    def log_histograms(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        self._each("log_histograms", tensors, step)

    def log_hparams(self, config: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self._each("log_hparams", config, metrics, step)

    def log_artifact(self, path: Path, checkpoint: bool = False) -> None:
        self._each("log_artifact", path, checkpoint)

    def flush(self) -> None:
        self._each("flush")

    def state_dict(self) -> dict[str, Any]:
        return {k: v for logger in self.loggers for k, v in logger.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._each("load_state_dict", state)

    def close(self, status: str = "finished") -> None:
        self._each("close", status)


class TensorBoardLogger(Logger):
    """TensorBoard event files in ``log_dir``. The HParams summary goes into the run's own event file (not into
    a subfolder, as ``SummaryWriter.add_hparams`` does), so that each run of a sweep is one row of the table."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir, self._writer = Path(log_dir), None

    @property
    def writer(self) -> Any:
        """The SummaryWriter, made at the first thing logged: a run refused before it trains (a missing data set,
        an empty class folder) leaves no event file, and its run folder is taken away."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        return self._writer

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)  # markdown code

    def log_images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, grid, step)

    def log_histograms(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        for tag, tensor in tensors.items():
            self.writer.add_histogram(tag, tensor.detach().float().cpu(), step)

    def log_hparams(self, config: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {k: str(v).lower() if isinstance(v, bool) else v for k, v in config.items()}  # else 1.0/0.0
        for summary in hparams(values, metrics):  # the plugin reads each metric from the scalar of its tag
            self.writer.file_writer.add_summary(summary)
        self.log_scalars(metrics, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self, status: str = "finished") -> None:
        if self._writer is not None:
            self._writer.close()


def require(module: str, extra: str) -> Any:
    """``import module``, or a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"logger={extra} needs the {extra} package: pip install \"vitrain[{extra}]\"") from e


def run_name(run_dir: Path) -> str:
    """A run's name from its folder: ``<date>/<time>``, or ``<time>/<n>`` in a multirun."""
    return "/".join(Path(run_dir).resolve().parts[-2:])


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"name": "vit"}}`` -> ``{"model.name": "vit"}``; a list becomes its text, ``[0.5, 0.5]``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(list(value)) if isinstance(value, list | tuple) else value
    return flat


class WandbLogger(Logger):
    """A Weights & Biases run, in ``<run>/wandb``; ``mode=offline`` (or ``WANDB_MODE=offline``) needs no network.
    The run starts with the Trainer, after a resumed checkpoint has given its id: the same run continues."""

    def __init__(self, cfg: WandbConfig, run_dir: Path) -> None:
        self.wandb = require("wandb", "wandb")
        self.cfg, self.run_dir, self.run, self.run_id = cfg, Path(run_dir), None, None

    def start(self, config: dict[str, Any]) -> None:
        c = self.cfg
        try:
            self.run = self.wandb.init(project=c.project, entity=c.entity, name=c.name or run_name(self.run_dir),
                                       group=c.group, tags=c.tags or None, config=config, dir=str(self.run_dir),
                                       mode=c.mode, id=self.run_id, resume="allow" if self.run_id else None,
                                       reinit="create_new")
        except Exception as e:  # not logged in, no network
            raise VitrainError(f"cannot start the W&B run: {first_line(e)}; log in (wandb login) or run offline: "
                               f"logger.wandb.mode=offline (nothing was trained)") from e
        self.run_id = self.run.id

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        self.run.log({tag: self.wandb.Image(grid)}, step=step)

    def log_histograms(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        self.run.log({k: self.wandb.Histogram(v.detach().float().cpu().numpy()) for k, v in tensors.items()},
                     step=step)

    def log_hparams(self, config: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self.run.summary.update(metrics)  # the config is the run's config since it started

    def log_artifact(self, path: Path, checkpoint: bool = False) -> None:
        if not checkpoint or self.cfg.log_checkpoint:
            self.run.save(str(path), base_path=str(Path(path).parent.parent if checkpoint else Path(path).parent),
                          policy="now")

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("wandb_run_id") or self.run_id

    def close(self, status: str = "finished") -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status in ("finished", "pruned") else 1)
            self.run = None
