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
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vitrain import runfolder
from vitrain.build import build_trainer
from vitrain.checkpoint import remove_partial_saves
from vitrain.cli import check_group_choices, check_override_keys, entry_point, resume_command, run_command
from vitrain.config import CONFIG_DIR, TrainConfig, ensure_writable, to_config
from vitrain.data.remote import NetworkError, network_stop
from vitrain.distributed import World, barrier, close_distributed, init_distributed, torchrun_world
from vitrain.errors import Preempted
from vitrain.pruning import measure, objective_values
from vitrain.runtime import close_workers, command_times, seed_everything

log = logging.getLogger(__name__)


def train(cfg: TrainConfig | DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and write its outputs to ``run_dir``; under torchrun, this
    rank's part of it (rank 0 writes the outputs). Every value is checked before any data is read."""
    cfg, run_dir = to_config(cfg), Path(run_dir)
    world, device = init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    with runfolder.locked(run_dir, enabled=world.is_main):  # one run per folder; rank 0 holds the lock
        return _train(cfg, run_dir, world, device)


def _train(cfg: TrainConfig, run_dir: Path, world: World, device: torch.device) -> dict[str, Any]:
    if world.is_main:
        ensure_writable(run_dir / "checkpoints", "hydra.run.dir")
        remove_partial_saves(run_dir / "checkpoints")  # left by a save that was killed mid-write (logged)
    seed_everything(cfg.seed)
    trainer, splits = build_trainer(cfg, run_dir, world, device)
    if world.is_main:
        runfolder.write_resolved_config(run_dir, trainer.metadata["config"])
    trainer.resume(cfg.trainer.resume, cfg.data.batch_size * world.size)
    log.info("training on %s%s for %d epochs; writing to %s", trainer.device,
             f" x {world.size} processes" if world.size > 1 else "", cfg.trainer.epochs, run_dir)
    try:
        metrics = trainer.fit()
    finally:  # now, not at garbage collection (which waits 5 s for each worker)
        close_workers(trainer.loaders.train, trainer.loaders.val, trainer.loaders.test)
    metrics.update(measure(cfg.sweep.objectives, trainer.model, cfg.model.img_size, trainer.device))
    if cfg.model.lora.rank > 0 and world.is_main:  # the final adapters and head, in peft's format
        from vitrain.lora import save_adapters

        save_adapters(trainer.model, run_dir / "checkpoints" / "adapter")
    if cfg.trainer.log_images and world.is_main:
        from vitrain.figures import log_end_of_training  # matplotlib: imported only when asked for

        pre = trainer.metadata["preprocess"]  # the normalization as resolved (data.mean may be null: auto)
        log_end_of_training(run_dir / "tb", trainer.model, splits.val, trainer.state.step, pre["mean"], pre["std"],
                            splits.class_names)
    log.info("best val top-1 %.2f%%, final val top-1 %.2f%%%s, %.0f train img/s; %s", metrics["best_top1"],
             metrics["final_top1"], "" if metrics["test_top1"] is None else f", test top-1 {metrics['test_top1']:.2f}%",
             metrics["train_images_per_sec"], command_times(metrics, getattr(trainer.model, "feature_seconds", 0.0)))
    return metrics


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
        try:
            metrics = train(cfg, run_dir)
        except NetworkError as e:  # the data's server, not the data: what is kept, and how to go on
            raise NetworkError(network_stop(e, Path(run_dir), resume_command(run_dir))) from e
        top1 = objective_values(metrics, cfg.sweep.objectives)  # what the sweeper records (or PRUNED)
        barrier()  # every rank done before any leaves the group: gloo aborts a rank whose peer is already gone
        return top1

    try:
        return run_command(run, debug=bool(cfg.trainer.get("debug")), on_preempted=resume_hint)
    finally:
        close_distributed()


@entry_point
def main() -> None:
    """``python -m vitrain.train``: an unknown group option, key or a value of the wrong type is refused in one
    line (Hydra's own errors span many), then the Hydra app runs."""
    check_group_choices(sys.argv[1:], CONFIG_DIR)
    check_override_keys(sys.argv[1:], TrainConfig, CONFIG_DIR)
    hydra_main()


if __name__ == "__main__":
    main()
