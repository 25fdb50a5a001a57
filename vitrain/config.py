"""Where the Hydra configs live, and composing them outside the command line (tests, notebooks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

_PACKAGED = Path(__file__).resolve().parent / "configs"  # inside an installed wheel
_SOURCE = Path(__file__).resolve().parent.parent / "configs"  # in a source checkout
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else _SOURCE


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the real training config with command-line style overrides, without running Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
