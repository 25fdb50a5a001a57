"""What a training run saves and how it continues: :class:`TrainState` (where training stands) and the
:class:`~vitrain.trainer.Trainer`'s checkpoint methods (what ``last.pt`` and ``best.pt`` hold, and loading them back).
Weights and optimizer states are saved whole whatever the strategy (:mod:`vitrain.parallel`: gathered from FSDP2's
shards on every rank), so a checkpoint continues on any number of ranks.
The files themselves (atomic writes, the pair's order, weights-only loads) are :mod:`vitrain.checkpoint`'s."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from vitrain import __version__, distributed
from vitrain.checkpoint import (
    TRAINING_STATE,
    check_resume_position,
    find_resume_checkpoint,
    is_sharded_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    write_checkpoints,
    write_text,
)
from vitrain.errors import ConfigError, Preempted
from vitrain.parallel import (
    full_model_state,
    full_optimizer_state,
    is_sharded,
    load_full_model_state,
    load_full_optimizer_state,
)
from vitrain.sharded import LAST, load_sharded, save_sharded, tensors_of

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands; all of it goes into every checkpoint, so that a run continues exactly."""

    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained (> 0: saved inside an epoch)
    epoch_loss: float = 0.0  # sum of the current epoch's batch losses so far (mean over the ranks)
    skipped_in_epoch: int = 0  # batches of the current epoch skipped for a non-finite loss
    step: int = 0  # optimizer steps so far
    best_top1: float = float("-inf")
    history: list[dict[str, float]] = field(default_factory=list)
    train_time: float = 0.0
    train_images: int = 0
    skipped_nonfinite: int = 0
    pruned: bool = False  # a trial of a pruned Optuna search, stopped by the study's pruner

    def next_epoch(self) -> None:
        """The epoch is trained, validated and about to be saved: the next one starts at its first batch."""
        self.epoch, self.batch_in_epoch, self.epoch_loss, self.skipped_in_epoch = self.epoch + 1, 0, 0.0, 0


def check_fits(weights: dict[str, Any], model: Any, path: Path) -> None:
    """A checkpoint to resume from has the model's shapes: else one line naming the first tensor and both shapes."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # an FSDP2 shard's .shape is the whole one's
    for key, value in weights.items():
        if key in own and tuple(value.shape) != own[key]:
            raise ConfigError(f"trainer.resume: {path} does not fit this model: {key} is {tuple(value.shape)} in the "
                              f"checkpoint, {own[key]} in the model; resume with the model and data it was written "
                              f"with (its number of classes), or start a new run from its weights with "
                              f"model.checkpoint={path}")


class SavesState:
    """The Trainer's checkpoints: its model, optimizer, scheduler, scaler, EMA, logger, metadata and
    :class:`TrainState` in one dict, written by rank 0 and read back to continue exactly."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, schedule, scaler, EMA, the
        :class:`TrainState` and the random generators, with the metadata."""
        state = {"model": full_model_state(self.model), "optimizer": full_optimizer_state(self.model, self.optimizer),
                 **self._rest_state()}
        if self.ema is not None:
            state["model_ema"] = full_model_state(self.ema.module)
        return state

    def _rest_state(self) -> dict[str, Any]:
        """All but the weights and the optimizer's states."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                **dataclasses.asdict(self.state), "rng": rng_state(), "vitrain_version": __version__,
                "logger": self.logger.state_dict(), **self.metadata}

    def resume(self, resume: str | None, global_batch: int) -> None:
        """``trainer.resume``: continue from the checkpoint it names (rank 0 finds it, every rank loads it), which
        must have been written with the same images per step (``global_batch``) if it stopped inside an epoch.
        A sharded checkpoint (``last.dcp``, of an FSDP2 run) loads into any strategy and number of ranks."""
        path = distributed.broadcast_object(find_resume_checkpoint(resume, self.run_dir))
        if path is None:
            return
        if is_sharded_checkpoint(path):
            state = load_sharded(path, self.model, self.optimizer, self.ema.module if self.ema else None)
            check_resume_position(state, global_batch)
        else:
            state = load_checkpoint(path, map_location=self.device)
            check_resume_position(state, global_batch)
            check_fits(state.get("model", {}), self.model, path)
            self.load_weights(state)
        self.load_rest(state)
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch + 1, self.state.step)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`state_dict`."""
        self.load_weights(state)
        self.load_rest(state)

    def load_weights(self, state: dict[str, Any]) -> None:
        load_full_model_state(self.model, state["model"])
        load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        if self.ema is not None and "model_ema" in state:
            load_full_model_state(self.ema.module, state["model_ema"])

    def load_rest(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        known = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in state.items() if k in known})
        self.state.history = list(self.state.history)
        self._resumed_rng = distributed.own_entry(state.get("rng_ranks"), state["rng"])
        self.logger.load_state_dict(state.get("logger", {}))  # the tracked run to continue (MLflow, W&B)

    def _save(self, val: dict[str, Any] | None = None) -> Path:
        """Write ``last.pt`` (``last.dcp`` under FSDP2) and ``best.pt`` when ``val`` is a new best; with
        ``keep_last`` > 1, also keep that many numbered checkpoints. The files are written in the background
        (``trainer.async_save``). Returns the path of the last checkpoint."""
        best = val is not None and val["top1"] > self.state.best_top1
        weights = None
        if best:
            self.state.best_top1 = val["top1"]
            if self.loaders.test is not None or is_sharded(self.model):  # a collective gathering under FSDP2: once
                weights = full_model_state(self.model)
            if self.loaders.test is not None:  # for the test set at the end, without a file read on every rank
                self._best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        scores = {k: val[k] for k in ("loss", "top1", "top5")} if best else None
        if is_sharded(self.model):
            return self._save_sharded(scores, weights)
        state = self.state_dict()
        if distributed.world_size() > 1:  # each rank's generators, for an exact resume on as many ranks
            state["rng_ranks"] = distributed.gather_objects(state["rng"])
        if not self.is_main:  # the ranks hold the same weights: rank 0 writes them
            return self.ckpt_dir / "last.pt"
        return self.saves.submit(state, partial(write_checkpoints, folder=self.ckpt_dir, best_val=scores,
                                                keep_last=self.config.keep_last), self.ckpt_dir / "last.pt")

    def _save_sharded(self, scores: dict[str, float] | None, weights: dict[str, Any] | None) -> Path:
        """FSDP2: every rank writes its shards into ``last.dcp`` (:mod:`vitrain.sharded`); best.pt, the full
        ``weights`` gathered on rank 0 for a new best, after it."""
        ema = self.ema.module if self.ema is not None else None
        tensors, groups = tensors_of(self.model, self.optimizer, ema)
        rest = self._rest_state()
        rest.update(param_groups=groups, sharded=list(tensors), rng_ranks=distributed.gather_objects(rest["rng"]))
        best = None
        if scores is not None:  # collective: every rank takes part in the gathering
            best = {"model": weights, **({"model_ema": full_model_state(ema)} if ema else {})}
            best.update({k: v for k, v in rest.items() if k not in (*TRAINING_STATE, "param_groups", "sharded")},
                        val=scores)
        if self.saves.background and self._side_group is None:
            self._side_group = distributed.side_group()
        folder, step, keep, group = self.ckpt_dir, self.state.step, self.config.keep_last, self._side_group

        def write(snapshot: dict[str, Any]) -> Path:
            last = save_sharded(snapshot["tensors"], snapshot["rest"], folder, step, keep, group)
            if snapshot["best"] is not None and self.is_main:
                save_checkpoint(snapshot["best"], folder / "best.pt")
            return last

        return self.saves.submit({"tensors": tensors, "rest": rest, "best": best}, write, folder / LAST)

    def _preempt(self, signum: int, checkpoint: Path) -> NoReturn:
        """Stopped by a signal, with ``checkpoint`` written: ``metrics.json`` says so in words a requeue script
        reads whatever the launcher's exit code (torchrun's is 1), then every rank leaves through
        :class:`Preempted`."""
        self.saves.wait()
        if self.is_main:
            s = self.state
            stopped = {"state": "preempted", "signal": signal.Signals(signum).name, "signum": signum,
                       "exit_code": 128 + signum, "epoch": s.epoch, "steps": s.step, "checkpoint": str(checkpoint),
                       "best_top1": s.best_top1, "epochs_trained": len(s.history), "history": s.history}
            write_text(json.dumps(stopped, indent=2), self.run_dir / "metrics.json")
        distributed.barrier()  # the other ranks exit once rank 0 has written the checkpoint
        raise Preempted(signum, self.state.step, checkpoint)

