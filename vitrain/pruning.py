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
from dataclasses import dataclass
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


@dataclass
class SweepConfig:
    """``sweep``: the Optuna trial this run is. The sweeper sets all three when it prunes; all null otherwise."""

    trial: int | None = None  # the trial's number in its study
    storage: str | None = None  # the study's storage URL, e.g. sqlite:////abs/path/optuna.db
    study: str | None = None  # the study's name in that storage

    def __post_init__(self) -> None:
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
