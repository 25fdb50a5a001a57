"""Where the Hydra configs live, and composing them outside the command line (tests, notebooks)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from vitrain.errors import VitrainError

_PACKAGED = Path(__file__).resolve().parent / "configs"  # inside an installed wheel
_SOURCE = Path(__file__).resolve().parent.parent / "configs"  # in a source checkout
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else _SOURCE


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the real training config with command-line style overrides, without running Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def ensure_writable(path: str | Path, key: str) -> None:
    """Create ``path`` and write a probe file in it, or raise a one-line error naming ``key``."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise VitrainError(f"cannot write to {path} ({e.strerror}); set {key} to a writable folder") from e


class CheckOutputFolder(Callback):
    """Hydra callback: the run (or sweep) folder must be writable before the job starts."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(path: str, key: str) -> None:
        try:
            ensure_writable(path, key)
        except VitrainError as e:  # Hydra would print a traceback: one line, and stop
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)


class TorchrunRunFolder(Callback):
    """Hydra callback for a run started by torchrun, before Hydra makes the run folder: join the process
    group, give every rank rank 0's run folder (the default one is named after the start time, which
    can differ between the processes), and leave ``.hydra/`` and the log file to rank 0; the other ranks
    log only warnings and errors, to the console."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from vitrain.distributed import broadcast_object, init_distributed, torchrun_world

        if torchrun_world().size == 1:
            return
        try:
            world, _ = init_distributed(config.trainer.device, config.trainer.dist_backend)
        except VitrainError as e:
            rank = torchrun_world().rank
            print(f"{f'[rank {rank}] ' if rank else ''}error: {e}", file=sys.stderr)
            sys.exit(1)
        with read_write(config):
            config.hydra.run.dir = broadcast_object(str(config.hydra.run.dir))
            if not world.is_main:
                config.hydra.output_subdir = None
                config.hydra.job_logging = console_logging(f"[rank {world.rank}]")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from vitrain.distributed import torchrun_world

        if torchrun_world().size > 1:  # every rank would run its own sweep, in its own folder
            print("error: a multirun (-m) cannot run under torchrun; start one torchrun per run of the sweep",
                  file=sys.stderr)
            sys.exit(1)


def console_logging(prefix: str, level: str = "WARNING") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` that writes records of ``level`` and above to stderr, no file."""
    line = f"{prefix}[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"plain": {"format": line}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain",
                                     "stream": "ext://sys.stderr"}},
            "root": {"level": level, "handlers": ["console"]}}
