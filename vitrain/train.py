"""``python -m vitrain.train``: compose the config, build the run (:mod:`vitrain.build`), run the Trainer.

Hydra and OmegaConf stop here: :func:`train` takes a :class:`~vitrain.config.TrainConfig` (or the composed
config, which it checks and converts first) and everything below takes plain Python objects.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vitrain import runfolder
from vitrain.cli import check_group_choices, check_override_keys, entry_point, resume_command, run_command
from vitrain.config import CONFIG_DIR, TrainConfig, to_config
from vitrain.errors import Preempted
from vitrain.world import leave_process_group, torchrun_world

log = logging.getLogger(__name__)


def train(cfg: TrainConfig | DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and write its outputs to ``run_dir``; under torchrun, this
    rank's part of it (rank 0 writes the outputs). Every value is checked before any data is read."""
    cfg, run_dir = to_config(cfg), Path(run_dir)
    cfg.check_files()
    from vitrain.build import run_training
    from vitrain.distributed import init_distributed

    world, device = init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    with runfolder.locked(run_dir, enabled=world.is_main):  # one run per folder; rank 0 holds the lock
        return run_training(cfg, run_dir, world, device)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | str | list[float]:
    """The Hydra app; returns what ``sweep.objectives`` names (the final top-1) for sweepers. Exit codes: 1 for a user
    error (one line on stderr), 143 after SIGTERM and 130 after SIGINT (the checkpoint is written first, and
    the command that resumes is printed)."""
    run_dir = HydraConfig.get().runtime.output_dir

    def resume_hint(e: Preempted) -> None:
        if torchrun_world().rank == 0:
            print(f"{e}\nresume with: {resume_command(run_dir)}", file=sys.stderr)

    def run() -> float | str | list[float]:
        from vitrain.data.remote import NetworkError, network_stop

        try:
            metrics = train(cfg, run_dir)
        except NetworkError as e:  # the data's server, not the data: what is kept, and how to go on
            raise NetworkError(network_stop(e, Path(run_dir), resume_command(run_dir))) from e
        from vitrain.distributed import barrier
        from vitrain.pruning import objective_values

        top1 = objective_values(metrics, cfg.sweep.objectives)  # what the sweeper records (or PRUNED)
        barrier()  # every rank done before any leaves the group: gloo aborts a rank whose peer is already gone
        return top1

    try:
        return run_command(run, debug=bool(cfg.trainer.get("debug")), on_preempted=resume_hint)
    finally:
        leave_process_group()


@entry_point
def main() -> None:
    """``python -m vitrain.train``: an unknown group option, key or a value of the wrong type is refused in one
    line (Hydra's own errors span many), then the Hydra app runs."""
    check_group_choices(sys.argv[1:], CONFIG_DIR)
    check_override_keys(sys.argv[1:], TrainConfig, CONFIG_DIR)
    hydra_main()


if __name__ == "__main__":
    main()
