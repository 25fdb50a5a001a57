"""Pruning a hyperparameter-search trial from inside its run.

vitrain's Optuna sweeper (``hydra_plugins/vitrain_optuna_sweeper``) keeps its study in a storage that every
run can reach. When it prunes (``hydra/sweeper/pruner=median``, ...), it gives each run its trial as three
overrides, ``sweep.trial=N sweep.storage=URL sweep.study=NAME`` (:class:`SweepConfig`). After every epoch
the Trainer reports the validation top-1 with :meth:`TrialReporter.report`; when the study's pruner says
stop, the run ends at that epoch boundary, writes ``"state": "pruned"`` in its metrics.json, and its task
function returns :data:`PRUNED` in place of the value, which the sweeper records as a pruned trial.

The pruner is not kept in Optuna's storage, so the sweeper writes its spec (``_target_`` and arguments) into
the study's user attributes (:data:`PRUNER_ATTR`) and each run builds the same pruner from it. Optuna is
imported only by a run that reports.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitrain.errors import ConfigError, import_extra

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

PRUNED = "pruned"  # what a pruned run's task function returns to the sweeper, in place of its value
PRUNER_ATTR = "vitrain.pruner"  # the study's user attribute that holds the pruner's spec
PRUNERS = {  # the pruners by name: `hydra/sweeper/pruner=NAME` or `hydra.sweeper.pruner=NAME`
    "none": "optuna.pruners.NopPruner",
    "median": "optuna.pruners.MedianPruner",
    "hyperband": "optuna.pruners.HyperbandPruner",
    "successive_halving": "optuna.pruners.SuccessiveHalvingPruner",
}


# what a run can return to the sweeper, one per hydra.sweeper.direction: its metrics.json key or measure
OBJECTIVES = {"val_top1": "final_top1", "best_top1": "best_top1", "val_loss": "final_val_loss",
              "test_top1": "test_top1", "train_img_s": "train_images_per_sec", "params": "params",
              "latency_ms": "latency_ms"}


@dataclass
class SweepConfig:
    """``sweep``: what the run returns to a sweeper (``objectives``), and the Optuna trial this run is (the sweeper
    sets ``trial``, ``storage`` and ``study`` together when it prunes; all null otherwise)."""

    trial: int | None = None  # the trial's number in its study
    storage: str | None = None  # the study's storage URL, e.g. sqlite:////abs/path/optuna.db
    study: str | None = None  # the study's name in that storage
    objectives: list[str] = field(default_factory=lambda: ["val_top1"])  # what the run returns, one per
    #   hydra.sweeper.direction: val_top1, best_top1, val_loss, test_top1, train_img_s, params (count),
    #   latency_ms (inference, one image, on the training device)

    def __post_init__(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise ConfigError(f"unknown sweep.objectives {unknown or '[]'}; choose from {', '.join(OBJECTIVES)}")
        given = [v is not None for v in (self.trial, self.storage, self.study)]
        if any(given) and not all(given):
            raise ConfigError("sweep.trial, sweep.storage and sweep.study are set together (the Optuna sweeper "
                              f"sets them), got trial={self.trial}, storage={self.storage}, study={self.study}")
        if self.trial is not None and self.trial < 0:
            raise ConfigError(f"sweep.trial must be >= 0, got {self.trial}")


def pruner_spec(pruner: str | Mapping[str, Any]) -> dict[str, Any]:
    """A pruner given by name (``median``) or as ``{"_target_": class path, **arguments}``, as the latter."""
    if isinstance(pruner, str):
        if pruner not in PRUNERS:
            raise ConfigError(f"unknown pruner '{pruner}'; choose from {', '.join(PRUNERS)}, or give a _target_")
        return {"_target_": PRUNERS[pruner]}
    if "_target_" not in pruner:
        raise ConfigError(f"a pruner needs a _target_ (e.g. optuna.pruners.MedianPruner), got {dict(pruner)}")
    return dict(pruner)


def measure(objectives: list[str], model: Any, img_size: int, device: Any) -> dict[str, float]:
    """What ``objectives`` need beyond the training's metrics: the parameter count, and the median inference
    latency of one image (eval mode, 20 timed calls after 5 warm-up calls) when asked for."""
    import statistics
    import time

    import torch

    measured: dict[str, float] = {"params": float(sum(p.numel() for p in model.parameters()))}
    if "latency_ms" in objectives:
        was_training, image = model.training, torch.zeros(1, 3, img_size, img_size, device=device)
        model.eval()
        times = []
        with torch.inference_mode():
            for i in range(25):
                start = time.perf_counter()
                model(image)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= 5:
                    times.append(time.perf_counter() - start)
        model.train(was_training)
        measured["latency_ms"] = 1e3 * statistics.median(times)
    return measured


def objective_values(metrics: Mapping[str, Any], objectives: list[str]) -> float | str | list[float]:
    """What the run returns to the sweeper: :data:`PRUNED`, one value, or one per objective."""
    if metrics.get("state") == "pruned":
        return PRUNED
    values = [float(metrics[OBJECTIVES[o]]) for o in objectives]
    return values[0] if len(values) == 1 else values


def build_pruner(pruner: str | Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """The Optuna pruner that ``pruner`` (a name or a spec, see :func:`pruner_spec`) describes."""
    spec = pruner_spec(pruner)
    module, _, name = spec.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec)


class NoPruning:
    """The reporter of a run that is not a pruned search's trial: it never asks to stop."""

    def report(self, epoch: int, val_top1: float) -> bool:
        """Nothing to report to; never prune."""
        return False


class TrialReporter:
    """One running trial of a study in shared storage, attached to from the run's own process."""

    def __init__(self, storage: str, study: str, trial: int) -> None:
        optuna = import_extra("optuna", "a pruned Optuna trial (sweep.trial)", "sweep")
        rdb = optuna.storages.RDBStorage(storage)
        study_id = rdb.get_study_id_from_name(study)
        pruner = build_pruner(rdb.get_study_user_attrs(study_id).get(PRUNER_ATTR, "none"))
        # the run never samples: a random sampler spares the default TPE's set-up
        loaded = optuna.load_study(study_name=study, storage=rdb, sampler=optuna.samplers.RandomSampler(),
                                   pruner=pruner)
        self.trial = optuna.trial.Trial(loaded, rdb.get_trial_id_from_study_id_trial_number(study_id, trial))

    @classmethod
    def from_config(cls, sweep: SweepConfig) -> TrialReporter | NoPruning:
        """The reporter for ``sweep``: a :class:`TrialReporter` when the run is a trial, else :class:`NoPruning`."""
        if sweep.trial is None:
            return NoPruning()
        return cls(sweep.storage, sweep.study, sweep.trial)

    def report(self, epoch: int, val_top1: float) -> bool:
        """Report the validation top-1 after epoch ``epoch`` (counted from 0, Optuna's step) and return whether
        the study's pruner stops the trial here. Every trial is judged on its own against the study's others."""
        self.trial.report(val_top1, step=epoch)
        prune = bool(self.trial.should_prune())  # Optuna's pruners answer with numpy's bool
        if prune:
            log.info("Optuna trial %d pruned after epoch %d (val top-1 %.2f%%)", self.trial.number, epoch + 1,
                     val_top1)
        return prune
