"""Where a run's numbers go: TensorBoard, MLflow and Weights & Biases, one or several at once.

:class:`Logger` is the small interface the Trainer logs through: the run's config when it starts, scalars at a
step, text, an image grid, histograms, the hyperparameters with the final metrics, files as artifacts, and a
``state_dict`` (the MLflow and W&B run ids) that goes into every checkpoint, so that a resumed run continues the
same tracked run. The base class logs nothing: it stands in on ranks other than 0 and when no logger is chosen.
:class:`MultiLogger` fans out to several. :class:`LoggerConfig` is the schema of the ``logger`` config group;
MLflow and W&B are imported only when chosen. :class:`RunLog` (in :mod:`vitrain.tracking`) is the Trainer's
bookkeeping on top of these.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitrain.errors import ConfigError, VitrainError, first_line

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "mlflow", "wandb")
WANDB_MODES = (None, "online", "offline", "disabled")


@dataclass
class TensorBoardConfig:
    """``logger=tensorboard``: event files in ``<run>/tb``."""

    enabled: bool = False  # on when chosen: logger=tensorboard (the default) or logger=[tensorboard,...]


@dataclass
class MLflowConfig:
    """``logger=mlflow``: a run in an MLflow tracking store."""

    enabled: bool = False  # on when chosen: logger=mlflow or logger=[tensorboard,mlflow]
    tracking_uri: str | None = None  # null: sqlite in the run folder (<run>/mlflow.db); http://host:5000: a server
    experiment: str = "vitrain"  # the MLflow experiment the run goes into (created when missing)
    run_name: str | None = None  # null: the run folder's name (<time>, or <time>/<n> in a multirun)
    log_checkpoint: bool = True  # upload checkpoints/best.pt as an artifact when training ends


@dataclass
class WandbConfig:
    """``logger=wandb``: a Weights & Biases run, online or offline."""

    enabled: bool = False  # on when chosen: logger=wandb or logger=[tensorboard,wandb]
    project: str = "vitrain"  # the W&B project
    entity: str | None = None  # the W&B team or user; null: your default entity
    name: str | None = None  # the run's display name; null: the run folder's name
    group: str | None = None  # groups runs in the W&B UI (e.g. one sweep)
    tags: list[str] = field(default_factory=list)  # the run's tags
    mode: str | None = None  # online | offline (no network; `wandb sync` later) | disabled; null: WANDB_MODE, or online
    log_checkpoint: bool = False  # upload checkpoints/best.pt into the run's files when training ends


@dataclass
class LoggerConfig:
    """The ``logger`` group: which backends log (the files of ``configs/logger/`` switch them on; several at once
    with ``logger=[tensorboard,mlflow]``) and their settings."""

    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        for name in BACKENDS:  # a setting of a backend that is off would be ignored without a word
            section = getattr(self, name)
            changed = [k for k, v in dataclasses.asdict(section).items()
                       if k != "enabled" and v != dataclasses.asdict(type(section)())[k]]
            if changed and not section.enabled:
                raise ConfigError(f"logger.{name}.{changed[0]} is set but {name} is not a chosen logger; "
                                  f"choose it too, e.g. logger=[tensorboard,{name}]")
        if self.wandb.mode not in WANDB_MODES:
            raise ConfigError(f"unknown logger.wandb.mode '{self.wandb.mode}'; choose online, offline or disabled")
        if not self.mlflow.experiment:
            raise ConfigError("logger.mlflow.experiment must not be empty")

    @property
    def backends(self) -> list[str]:
        """The chosen backends, in the order of :data:`BACKENDS`."""
        return [name for name in BACKENDS if getattr(self, name).enabled]


class Logger:
    """The interface every backend implements, and the logger that logs nothing."""

    def start(self, config: dict[str, Any]) -> None:
        """The run begins, or continues after :meth:`load_state_dict`; ``config`` is its whole config (nested)."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Scalars by tag (``train/loss``, ``val/top1``) at an optimizer step."""

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
        """The run is over: ``finished``, ``failed``, or ``killed`` (stopped by a signal, to be resumed)."""


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
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

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
        self.writer.flush()

    def close(self, status: str = "finished") -> None:
        self.writer.close()


def require(module: str, extra: str) -> Any:
    """``import module``, or a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"logger={extra} needs the {extra} package: pip install \"vitrain[{extra}]\"") from e


def probe_server(uri: str, timeout: float = 5.0) -> None:
    """A one-line error unless the tracking server at ``uri`` answers within ``timeout`` seconds; any answer
    counts (its ``/health`` page, or an HTTP error): only a server that cannot be reached fails."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:  # URLError, refused, timed out, a malformed address
        reason = getattr(e, "reason", None) or first_line(e)
        raise VitrainError(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it or fix "
                           f"logger.mlflow.tracking_uri (nothing was trained)") from e


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


class MLflowLogger(Logger):
    """An MLflow run through the client: the flattened config as params, the metrics at their steps, the config
    YAML, the image grid, ``metrics.json`` and ``best.pt`` as artifacts. The store is a sqlite file in the run
    folder unless ``tracking_uri`` names one; a server is probed here, before any data is read. A server that
    fails later stops MLflow's logging with a warning, not the training."""

    def __init__(self, cfg: MLflowConfig, run_dir: Path) -> None:
        mlflow_tracking = require("mlflow.tracking", "mlflow")
        self.cfg, self.run_dir, self.run_id, self.failed = cfg, Path(run_dir), None, False
        self.uri = cfg.tracking_uri or f"sqlite:///{self.run_dir.resolve() / 'mlflow.db'}"
        if self.uri.startswith(("http://", "https://")):
            probe_server(self.uri)
        if cfg.tracking_uri is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.client = mlflow_tracking.MlflowClient(self.uri)
            self.experiment_id = self._experiment_id()
        except Exception as e:  # a store that cannot be opened, an unknown scheme
            raise VitrainError(f"cannot open the MLflow tracking store {self.uri}: {first_line(e)}; "
                               f"fix logger.mlflow.tracking_uri (nothing was trained)") from e

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.cfg.experiment)
        if found is not None:
            return found.experiment_id
        location = None  # a server's, or the store's own default
        if self.uri.startswith("sqlite:///"):  # beside the database file, not in ./mlruns of the working folder
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(self.cfg.experiment, artifact_location=location)

    def start(self, config: dict[str, Any]) -> None:
        if self.run_id is not None and self._continues():  # resumed: the same run, its params already logged
            return
        from mlflow.entities import Param

        name = self.cfg.run_name or run_name(self.run_dir)  # given, MLflow draws no random name (no RNG use)
        self.run_id = self.client.create_run(self.experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._call("log_batch", params=params[i:i + 100])

    def _continues(self) -> bool:
        """Continue the checkpoint's MLflow run, if this store has it."""
        try:
            self.client.update_run(self.run_id, status="RUNNING")
            return True
        except Exception as e:
            log.warning("the checkpoint's MLflow run %s is not in %s (%s); a new MLflow run starts", self.run_id,
                        self.uri, first_line(e))
            self.run_id = None
            return False

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """``client.method(run_id, ...)``; after a failure, a warning and no more MLflow calls."""
        if self.run_id is None or self.failed:
            return
        try:
            getattr(self.client, method)(self.run_id, *args, **kwargs)
        except Exception as e:  # the server went away mid-run: the training goes on
            self.failed = True
            log.warning("MLflow logging stopped (%s); training goes on, the other loggers still log", first_line(e))

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call("log_batch", metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._call("log_text", text, tag)

    def log_images(self, tag: str, grid: torch.Tensor, step: int) -> None:
        pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        self._call("log_image", pixels, artifact_file=f"{tag}.png")

    def log_hparams(self, config: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        self.log_scalars(metrics, step)  # the params went in when the run started

    def log_artifact(self, path: Path, checkpoint: bool = False) -> None:
        if checkpoint and not self.cfg.log_checkpoint:
            return
        self._call("log_artifact", str(path), "checkpoints" if checkpoint else None)

    def state_dict(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("mlflow_run_id") or self.run_id

    def close(self, status: str = "finished") -> None:
        self._call("set_terminated", status.upper())


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
            self.run.finish(exit_code=0 if status == "finished" else 1)
            self.run = None
