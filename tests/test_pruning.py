"""vitrain.pruning: a run attaches to its Optuna trial in shared storage, reports each epoch, and is told to stop
by the study's pruner, which it rebuilds from the spec the sweeper left in the study."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vitrain.errors import ConfigError
from vitrain.pruning import PRUNER_ATTR, NoPruning, SweepConfig, TrialReporter, build_pruner, pruner_spec

optuna = pytest.importorskip("optuna")


def make_study(tmp_path: Path, pruner: dict, finished: list[list[float]]) -> tuple[str, optuna.Study]:
    """A maximising study in sqlite, as the sweeper leaves it: the pruner's spec in its user attributes, and
    ``finished`` trials (their values after each epoch) complete."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="maximize", pruner=build_pruner(pruner))
    study.set_user_attr(PRUNER_ATTR, pruner)
    for curve in finished:
        trial = study.ask()
        for epoch, value in enumerate(curve):
            trial.report(value, epoch)
        study.tell(trial, curve[-1])
    return url, study


def test_the_sweep_config_is_all_or_nothing() -> None:
    assert SweepConfig().trial is None
    SweepConfig(trial=0, storage="sqlite:///x.db", study="s")
    with pytest.raises(ConfigError, match="set together"):
        SweepConfig(trial=3)
    with pytest.raises(ConfigError, match="sweep.trial must be >= 0"):
        SweepConfig(trial=-1, storage="sqlite:///x.db", study="s")


def test_outside_a_search_nothing_is_reported_and_nothing_pruned() -> None:
    reporter = TrialReporter.from_config(SweepConfig())
    assert isinstance(reporter, NoPruning) and reporter.report(0, 0.0) is False


@pytest.mark.parametrize(("name", "cls"), [("none", "NopPruner"), ("median", "MedianPruner"),
                                           ("hyperband", "HyperbandPruner"),
                                           ("successive_halving", "SuccessiveHalvingPruner")])
def test_pruner_names_are_optunas_pruners(name: str, cls: str) -> None:
    assert type(build_pruner(name)) is getattr(optuna.pruners, cls)
    assert pruner_spec(name) == {"_target_": f"optuna.pruners.{cls}"}


def test_a_pruner_spec_passes_its_arguments() -> None:
    pruner = build_pruner({"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 3})
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (2, 3)
    with pytest.raises(ConfigError, match="unknown pruner 'mean'; choose from none, median, hyperband"):
        pruner_spec("mean")
    with pytest.raises(ConfigError, match="needs a _target_"):
        pruner_spec({"n_warmup_steps": 1})


def test_a_trial_behind_the_median_is_pruned_after_warmup(tmp_path: Path) -> None:
    spec = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 1}
    url, study = make_study(tmp_path, spec, [[50.0, 60.0, 70.0], [40.0, 55.0, 80.0]])
    weak, strong = study.ask(), study.ask()  # two trials running at once, judged each on its own
    weak_reporter = TrialReporter.from_config(SweepConfig(trial=weak.number, storage=url, study="s"))
    strong_reporter = TrialReporter(url, "s", strong.number)
    assert weak_reporter.report(0, 10.0) is False  # epoch 0 is the warm-up
    assert strong_reporter.report(0, 90.0) is False
    assert weak_reporter.report(1, 12.0) is True  # below the median (57.5) of the finished trials at epoch 1
    assert strong_reporter.report(1, 91.0) is False
    resumed = TrialReporter(url, "s", weak.number)  # a requeued run reports its last epoch again: kept once
    with pytest.warns(UserWarning, match="already reported"):
        assert resumed.report(1, 13.0) is True
    assert study.trials[weak.number].intermediate_values == {0: 10.0, 1: 12.0}  # in the shared storage

    study.tell(weak.number, state=optuna.trial.TrialState.PRUNED)  # what the sweeper does with PRUNED
    assert study.trials[weak.number].state == optuna.trial.TrialState.PRUNED
    assert study.trials[weak.number].value == 12.0  # Optuna keeps the last reported value


def test_the_run_prunes_with_the_studys_pruner_not_optunas_default(tmp_path: Path) -> None:
    url, study = make_study(tmp_path, {"_target_": "optuna.pruners.NopPruner"}, [[90.0, 95.0]] * 5)
    reporter = TrialReporter(url, "s", study.ask().number)
    assert not any(reporter.report(epoch, 1.0) for epoch in range(3))  # MedianPruner would have stopped it


def test_a_run_in_another_process_reports_to_the_trial(tmp_path: Path) -> None:
    url, study = make_study(tmp_path, {"_target_": "optuna.pruners.ThresholdPruner", "lower": 50.0}, [])
    trial = study.ask()
    code = ("from vitrain.pruning import TrialReporter; r = TrialReporter(*__import__('sys').argv[1:3], "
            "int(__import__('sys').argv[3])); print(r.report(0, 60.0), r.report(1, 40.0))")
    out = subprocess.run([sys.executable, "-c", code, url, "s", str(trial.number)], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "True"]
    assert study.trials[trial.number].intermediate_values == {0: 60.0, 1: 40.0}
