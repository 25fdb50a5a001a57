"""The ``logger`` group's schema; the backends are :mod:`vitrain.loggers`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vitrain.errors import ConfigError

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
    tracking_uri: str | None = None  # null: sqlite in the run folder (<run>/mlflow.db; an Optuna sweep's trials:
    #   <sweep dir>/mlflow.db); http://host:5000: a server
    experiment: str = "vitrain"  # the MLflow experiment the run goes into (created when missing)
    run_name: str | None = None  # null: the run folder's name (<time>, or <time>/<n> in a multirun)
    log_checkpoint: bool = True  # upload checkpoints/best.pt as an artifact when training ends
    parent_run_id: str | None = None  # nest the run under this MLflow run (an Optuna sweep's trials: the sweep's run)
    tags: dict[str, str] = field(default_factory=dict)  # the run's tags, e.g. {team: vision}; a sweep adds optuna.*


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
