"""Sweeps beyond a grid: an Optuna search as a user runs it (vitrain's sweeper, hydra_plugins/vitrain_optuna_sweeper:
its study in storage, resuming, its params grammar, samplers and pruners), the sweep summary, the SLURM launcher
config."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from omegaconf import DictConfig

from vitrain.config import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
SUMMARIZE = REPO / "scripts" / "summarize_runs.py"
SEARCHED = ("optimizer.lr", "optimizer.weight_decay", "model.drop_path", "data.mixup", "loss.label_smoothing")
# 2 optimizer steps an epoch on the digits (1,293 training images once 10% are held out): a few seconds a trial
TINY = ["trainer.epochs=2", "scheduler.warmup_epochs=0", "data.batch_size=720", "trainer.progress=false"]
# Trials that learn within a few epochs, for pruning to judge: 81 steps an epoch (batch 16), no warm-up, no
# augmentation or regularisation, and only the learning rate searched, log-uniform over 3.5 decades. From
# 1e-4 to 3e-3 a trial reaches 25-45% validation top-1 in 3-4 epochs (chance: 10%); at 1e-2 it stays at chance.
# The 2-epoch runs of batch 720 above (or 4 epochs of 30% of the data at batch 32, with the 2-epoch warm-up) take
# 2-60 steps, which leave a ViT from scratch at chance whatever its learning rate: nothing for a pruner to judge.
# Sampler seed 3: TPE's first (random) proposals include good rates first, then clearly bad ones (1.3e-2).
LEARNING = ["optimizer.lr=tag(log, interval(1e-5, 3e-2))", "optimizer.weight_decay=0.05", "model.drop_path=0.0",
            "data.mixup=0.0", "loss.label_smoothing=0.0", "data.batch_size=16", "data.crop_padding=0",
            "scheduler.warmup_epochs=0", "trainer.progress=false", "logger=[]", "hydra.sweeper.sampler.seed=3"]
MEDIAN = ["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2",
          "hydra.sweeper.pruner.n_warmup_steps=1"]  # judged from the 2nd epoch on, once 2 trials completed


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The training config with its ``hydra`` node, as the command line would compose it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.fixture(scope="module")
def summarize_runs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("summarize_runs", SUMMARIZE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a script, not a package: register it as Python's import would
    spec.loader.exec_module(module)
    return module


def run_sweep(sweep: Path, *overrides: str, threads: int | None = None) -> subprocess.CompletedProcess:
    """``python -m vitrain.train -m hparams_search=optuna`` into ``sweep``, as a user runs it; ``threads``: torch's
    (one is steadier than two on a shared 2-core machine)."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    result = subprocess.run(
        [sys.executable, "-m", "vitrain.train", "-m", "hparams_search=optuna", *overrides, f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Optuna search: 3 trials of 2 epochs on the digits, the study in the sweep folder's optuna.db."""
    sweep = tmp_path_factory.mktemp("optuna") / "sweep"
    run_sweep(sweep, "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=digits", *TINY)
    return sweep


def load_study(db: Path, name: str = "digits"):  # -> optuna.Study
    optuna = pytest.importorskip("optuna")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def run_overrides(run_dir: Path) -> dict[str, str]:
    return dict(o.split("=", 1) for o in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()))


def final_top1(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["final_top1"]


def test_optuna_sweep_runs_one_folder_per_trial(optuna_sweep: Path) -> None:
    runs = sorted(p for p in optuna_sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1", "2"]
    lrs = set()
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["epochs"] == 2
        # selected on 10% of the training digits; the 360 test digits are scored once, at the end
        assert metrics["val_top1"] == metrics["final_top1"] and 0 <= metrics["test_top1"] <= 100
        overrides = run_overrides(run)
        assert set(SEARCHED) <= set(overrides) and overrides["trainer.epochs"] == "2"
        assert not any(k.startswith("sweep.") for k in overrides)  # no pruner: the runs report nothing
        lrs.add(float(overrides["optimizer.lr"]))
        assert 1e-4 <= float(overrides["optimizer.lr"]) <= 3e-3 and overrides["data.mixup"] in ("0.0", "0.2", "0.8")
    assert len(lrs) == 3  # every trial got its own learning rate


def test_the_study_in_storage_holds_every_trial(optuna_sweep: Path) -> None:
    """The study is kept in <sweep dir>/optuna.db (storage: null), where Optuna's tools and the dashboard read it."""
    study = load_study(optuna_sweep / "optuna.db")
    assert [(t.number, t.state.name) for t in study.trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert study.direction.name == "MAXIMIZE" and study.user_attrs["vitrain.pruner"] == {
        "_target_": "optuna.pruners.NopPruner"}
    for trial in study.trials:  # trial N is run folder N: its value and parameters are that run's
        run = optuna_sweep / str(trial.number)
        assert trial.user_attrs["run_dir"] == str(run)
        assert trial.value == pytest.approx(final_top1(run))
        overrides = run_overrides(run)
        assert trial.params["optimizer.lr"] == pytest.approx(float(overrides["optimizer.lr"]))
        assert str(trial.params["data.mixup"]) == overrides["data.mixup"]
    assert yaml.safe_load((optuna_sweep / "optimization_results.yaml").read_text())["study_name"] == "digits"


@pytest.mark.slow
def test_a_resumed_study_continues_its_trial_numbers(optuna_sweep: Path, tmp_path: Path) -> None:
    """The same storage and study name, more trials: Optuna numbers them on from where the study stopped."""
    db = tmp_path / "study.db"
    shutil.copy(optuna_sweep / "optuna.db", db)  # the module's sweep keeps its own three trials
    run_sweep(tmp_path / "more", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{db}",
              "hydra.sweeper.study_name=digits", *TINY[1:], "trainer.epochs=1")
    study = load_study(db)
    assert [(t.number, t.state.name) for t in study.trials] == [(n, "COMPLETE") for n in range(5)]
    assert [t.value for t in study.trials[:3]] == [t.value for t in load_study(optuna_sweep / "optuna.db").trials]
    runs = sorted(p.name for p in (tmp_path / "more").iterdir() if p.is_dir())
    assert runs == ["0", "1"] and not (tmp_path / "more" / "optuna.db").exists()  # Hydra's job numbers, per sweep
    assert [t.user_attrs["run_dir"] for t in study.trials[3:]] == [str(tmp_path / "more" / r) for r in runs]
    assert [t.value for t in study.trials[3:]] == pytest.approx([final_top1(tmp_path / "more" / r) for r in runs])


def test_optuna_best_value_is_the_best_runs_final_top1(optuna_sweep: Path) -> None:
    result = yaml.safe_load((optuna_sweep / "optimization_results.yaml").read_text())
    runs = [p for p in optuna_sweep.iterdir() if (p / "metrics.json").is_file()]
    assert result["best_value"] == pytest.approx(max(final_top1(p) for p in runs))
    best_lr = f"optimizer.lr={result['best_params']['optimizer.lr']}"
    (best,) = [p for p in runs if best_lr in yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text())]
    assert final_top1(best) == pytest.approx(result["best_value"])  # the best params are the best run's


def markdown_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and data rows of the first markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]


def test_summary_of_the_sweep_is_sorted_best_first(optuna_sweep: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(SUMMARIZE), str(optuna_sweep), "--markdown", "--csv",
                          str(tmp_path / "sweep.csv")], capture_output=True, text=True, check=True).stdout
    header, rows = markdown_rows(out)
    assert header[:2] == ["run", "final_top1"] and set(SEARCHED) - {"loss.label_smoothing"} <= set(header)
    scores = [float(row[1]) for row in rows]
    assert len(rows) == 3 and scores == sorted(scores, reverse=True)
    best = max(final_top1(p) for p in optuna_sweep.iterdir() if p.is_dir())
    assert final_top1(optuna_sweep / rows[0][0]) == best  # the first row is the best run
    assert "in every run: " in out and "trainer.epochs=2" in out  # shared overrides, once
    assert "Optuna best value" in out
    with open(tmp_path / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [r[0] for r in rows] and table[0]["status"] == "finished"


def make_run(run_dir: Path, overrides: list[str], metrics: dict | None) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_summary_of_hand_made_runs(summarize_runs: ModuleType, tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    make_run(sweep / "day" / "0", ["optimizer.lr=0.001", "trainer.epochs=5"],
             {"final_top1": 90.0, "best_top1": 97.0, "wall_time_sec": 12.0})
    make_run(sweep / "day" / "1", ["optimizer.lr=0.0005", "trainer.epochs=5"],
             {"final_top1": 95.5, "best_top1": 96.0, "wall_time_sec": 11.0})
    make_run(sweep / "day" / "2", ["optimizer.lr=0.01", "trainer.epochs=5"], None)  # failed: no metrics.json
    make_run(sweep / "other" / "10", ["optimizer.lr=0.0001", "trainer.epochs=5"],
             {"final_top1": 80.0, "best_top1": 81.0, "wall_time_sec": 10.0})
    (sweep / "day" / "optimization_results.yaml").write_text(yaml.safe_dump(
        {"name": "optuna", "best_params": {"optimizer.lr": 0.0005}, "best_value": 95.5}))

    out = summarize_runs.summarize(sweep, markdown=True)
    header, rows = markdown_rows(out)
    assert header == ["run", "final_top1", "best_top1", "wall_time_sec", "optimizer.lr"]
    assert rows[0] == ["day/1", "95.50", "96.00", "11.0", "0.0005"]
    assert [r[0] for r in rows] == ["day/1", "day/0", "other/10", "day/2"]  # the failed run last, not dropped
    assert rows[-1][1] == "no metrics.json"
    assert "in every run: trainer.epochs=5" in out
    assert "1 of 4 runs have no metrics.json (failed or unfinished): day/2" in out
    assert "Optuna best value 95.50 (day/optimization_results.yaml): optimizer.lr=0.0005" in out

    by_best = summarize_runs.sort_runs(summarize_runs.find_runs(sweep), "best_top1")
    assert [r.name for r in by_best] == ["day/0", "day/1", "other/10", "day/2"]
    by_time = summarize_runs.sort_runs(summarize_runs.find_runs(sweep), "wall_time_sec", lower_is_better=True)
    assert [r.name for r in by_time] == ["other/10", "day/1", "day/0", "day/2"]

    plain = summarize_runs.summarize(sweep)  # the terminal table: aligned columns, no pipes
    assert plain.splitlines()[2].split()[:2] == ["run", "final_top1"] and "|" not in plain
    with pytest.raises(SystemExit, match="no run has final_top in its metrics.json; choose one of best_top1"):
        summarize_runs.summarize(sweep, metric="final_top")  # a typo stops with the keys there are


def test_summary_csv_keeps_every_run(summarize_runs: ModuleType, tmp_path: Path) -> None:
    make_run(tmp_path / "s" / "0", ["optimizer.lr=0.001"], {"final_top1": 90.0, "history": [{"epoch": 1}]})
    make_run(tmp_path / "s" / "1", ["optimizer.lr=0.01"], None)
    summarize_runs.main([str(tmp_path / "s"), "--csv", str(tmp_path / "s.csv")])
    with open(tmp_path / "s.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["final_top1"], r["optimizer.lr"]) for r in table] == [
        ("0", "finished", "90.0", "0.001"), ("1", "no metrics.json", "", "0.01")]
    assert "history" not in table[0]


def test_optuna_search_composes_and_the_default_stays_a_grid() -> None:
    sweeper = compose_with_hydra(["hparams_search=optuna"]).hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.vitrain_optuna_sweeper.optuna_sweeper.VitrainOptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.pruner._target_ == "optuna.pruners.NopPruner"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert set(SEARCHED) <= set(sweeper.params) and sweeper.n_jobs == 1
    assert sweeper.params["optimizer.lr"].startswith("tag(log, interval(")
    assert compose_with_hydra([]).hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def build_sweeper(overrides: list[str]):  # -> VitrainOptunaSweeper
    """The sweeper as Hydra builds it from ``hparams_search=optuna`` and ``overrides`` (no sweep is started)."""
    from hydra.utils import instantiate

    return instantiate(compose_with_hydra(["hparams_search=optuna", *overrides]).hydra.sweeper)


@pytest.mark.parametrize(("choice", "cls"), [("tpe", "TPESampler"), ("random", "RandomSampler"),
                                             ("cmaes", "CmaEsSampler"), ("nsgaii", "NSGAIISampler"),
                                             ("gp", "GPSampler"), ("qmc", "QMCSampler")])
def test_each_sampler_composes_with_the_searchs_seed_and_builds(choice: str, cls: str) -> None:
    from hydra.utils import instantiate

    optuna = pytest.importorskip("optuna")
    sampler = build_sweeper([f"hydra/sweeper/sampler={choice}"]).sampler
    assert sampler.seed == 0 and type(instantiate(sampler)) is getattr(optuna.samplers, cls)


@pytest.mark.parametrize(("choice", "cls"), [("none", "NopPruner"), ("median", "MedianPruner"),
                                             ("hyperband", "HyperbandPruner"),
                                             ("successive_halving", "SuccessiveHalvingPruner")])
def test_pruner_choices_are_optunas_pruners(choice: str, cls: str) -> None:
    """``hydra/sweeper/pruner=NAME`` (the group, with its arguments) and ``hydra.sweeper.pruner=NAME`` (a name)."""
    optuna = pytest.importorskip("optuna")
    from vitrain.pruning import build_pruner

    for override in (f"hydra/sweeper/pruner={choice}", f"hydra.sweeper.pruner={choice}"):
        sweeper = build_sweeper([override])
        assert type(build_pruner(sweeper.pruner)) is getattr(optuna.pruners, cls)
        assert sweeper.prunes == (choice != "none")
    median = build_sweeper(["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_warmup_steps=3"]).pruner
    assert build_pruner(median)._n_warmup_steps == 3


def test_the_sweeper_refuses_what_optuna_cannot_do() -> None:
    from hydra.errors import InstantiationException

    pytest.importorskip("optuna")
    with pytest.raises(InstantiationException, match="prunes single-objective studies only"):
        build_sweeper(["hydra/sweeper/pruner=median", "hydra.sweeper.direction=[maximize,minimize]"])
    with pytest.raises(InstantiationException, match="direction must be minimize, maximize"):
        build_sweeper(["hydra.sweeper.direction=max"])
    assert build_sweeper(["hydra.sweeper.direction=[maximize,minimize]"]).directions == ["maximize", "minimize"]


def test_params_grammar_gives_optunas_distributions() -> None:
    pytest.importorskip("optuna")
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.vitrain_optuna_sweeper._search_space import parse_search_space

    space = parse_search_space([
        "a=interval(0.0, 0.1)", "b=tag(log, interval(1e-4, 3e-3))", "c=int(interval(8, 64))",
        "d=tag(log, int(interval(8, 256)))", "e=range(1, 5)", "f=range(0, 10, 3)", "g=range(0.1, 0.5, 0.1)",
        "h=choice(0.0, 0.2, 0.8)", "i=adamw,sgd", "j=shuffle(range(1, 4))", "+k=choice(1, 2)", "trainer.epochs=3",
        "a=interval(0.5, 1)"])  # a later override of a key (the shell's, after the YAML's) replaces it
    assert space.distributions == {
        "a": FloatDistribution(0.5, 1.0), "b": FloatDistribution(1e-4, 3e-3, log=True),
        "c": IntDistribution(8, 64), "d": IntDistribution(8, 256, log=True),
        "e": IntDistribution(1, 5), "f": IntDistribution(0, 9, step=3),  # range: up to the stop, included
        "g": FloatDistribution(0.1, 0.5, step=0.1), "h": CategoricalDistribution([0.0, 0.2, 0.8]),
        "i": CategoricalDistribution(["adamw", "sgd"]), "j": CategoricalDistribution([1, 2, 3]),
        "+k": CategoricalDistribution([1, 2])}
    assert space.fixed == ["trainer.epochs=3"]  # passed to every trial as written
    for bad, message in [("x=glob(*)", "cannot be searched"), ("x=tag(log, choice(1, 10))", "interval"),
                         ("x=range(5, 1)", "is empty")]:
        with pytest.raises(ValueError, match=message):
            parse_search_space([bad])


def test_trial_overrides_write_each_value_back_as_it_parses() -> None:
    pytest.importorskip("optuna")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.vitrain_optuna_sweeper._search_space import parse_search_space

    space = parse_search_space(["s=choice('x,y', 'a b', plain)", "l=choice([1,2],[3])", "n=interval(0, 1)",
                                "~logger", "e=3"])
    overrides = space.overrides({"s": "x,y", "l": "[3]", "n": 0.25})
    parsed = {o.get_key_element(): o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed == {"s": "x,y", "l": [3], "n": 0.25, "~logger": None, "e": 3}


def test_the_grid_sampler_searches_every_discrete_value() -> None:
    pytest.importorskip("optuna")
    from hydra.utils import instantiate

    from hydra_plugins.vitrain_optuna_sweeper._search_space import grid, parse_search_space

    values = grid(parse_search_space(["a=choice(x, y)", "b=range(1, 4)", "c=range(0.0, 0.3, 0.1)"]).distributions)
    assert values["a"] == ["x", "y"] and values["b"] == [1, 2, 3, 4]  # the stop included, as hydra-optuna-sweeper
    assert values["c"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    sampler = instantiate(build_sweeper(["hydra/sweeper/sampler=grid"]).sampler, search_space=values)
    assert type(sampler).__name__ == "GridSampler"
    with pytest.raises(ValueError, match=r"grid sampler needs choice\(\) or range\(\) for d"):
        grid(parse_search_space(["d=interval(0, 1)"]).distributions)


def test_each_run_result_becomes_its_trials_state() -> None:
    """A number: COMPLETE with it; vitrain.pruning.PRUNED: PRUNED; an exception or no number: FAIL."""
    optuna = pytest.importorskip("optuna")
    from hydra.core.utils import JobReturn, JobStatus

    from hydra_plugins.vitrain_optuna_sweeper.optuna_sweeper import tell
    from vitrain.pruning import PRUNED

    study = optuna.create_study(direction="maximize")
    results = [JobReturn(status=JobStatus.COMPLETED, _return_value=90.5),
               JobReturn(status=JobStatus.COMPLETED, _return_value=PRUNED),
               JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("diverged")),
               JobReturn(status=JobStatus.COMPLETED, _return_value="90%")]
    failures = [tell(study, study.ask(), result, 1) for result in results]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]
    assert study.trials[0].value == 90.5 and failures[:2] == [None, None]
    assert str(failures[2]) == "diverged" and "returned '90%', not 1 number" in str(failures[3])
    two = optuna.create_study(directions=["maximize", "minimize"])
    assert tell(two, two.ask(), JobReturn(status=JobStatus.COMPLETED, _return_value=(90.0, 3.5)), 2) is None
    assert two.trials[0].values == [90.0, 3.5]


PRUNED_APP = """
import hydra
from vitrain.pruning import PRUNED, SweepConfig, TrialReporter


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg):
    \"\"\"Three 'epochs' at a constant score x, each reported as the Trainer reports its validation top-1.\"\"\"
    reporter = TrialReporter.from_config(SweepConfig(**cfg.sweep))
    for epoch in range(3):
        if reporter.report(epoch, cfg.x):
            return PRUNED
    return cfg.x


main()
"""
PRUNED_APP_CONFIG = """
defaults:
  - override hydra/sweeper: vitrain_optuna
  - override hydra/sweeper/sampler: grid
  - override hydra/sweeper/pruner: threshold  # conf/hydra/sweeper/pruner/threshold.yaml: a pruner of one's own
  - _self_
x: 0.0
sweep: {trial: null, storage: null, study: null}
hydra:
  sweeper:
    direction: maximize
    n_trials: 10  # the grid has 4 points: 4 trials
    n_jobs: 2
    params: {x: "choice(1.0, 2.0, 3.0, 4.0)"}
"""


def test_a_pruning_sweep_gives_each_trial_its_identity_and_records_pruned_runs(tmp_path: Path) -> None:
    """The sweeper and vitrain.pruning together, around a stand-in for the Trainer: ThresholdPruner(lower=2.5)
    stops the runs whose score is 1 or 2 after their first epoch; they return PRUNED and are recorded so."""
    pytest.importorskip("optuna")
    (tmp_path / "conf" / "hydra" / "sweeper" / "pruner").mkdir(parents=True)
    (tmp_path / "app.py").write_text(PRUNED_APP)
    (tmp_path / "conf" / "app.yaml").write_text(PRUNED_APP_CONFIG)
    (tmp_path / "conf" / "hydra" / "sweeper" / "pruner" / "threshold.yaml").write_text(
        "_target_: optuna.pruners.ThresholdPruner\nlower: 2.5\n")
    result = subprocess.run([sys.executable, "app.py", "-m", "hydra.sweep.dir=sweep", "hydra.sweeper.study_name=s"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    study = load_study(tmp_path / "sweep" / "optuna.db", "s")
    states = {t.params["x"]: t.state.name for t in study.trials}
    assert states == {1.0: "PRUNED", 2.0: "PRUNED", 3.0: "COMPLETE", 4.0: "COMPLETE"}
    assert all(len(t.intermediate_values) == (1 if t.state.name == "PRUNED" else 3) for t in study.trials)
    assert yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())["best_value"] == 4.0
    for trial in study.trials:  # what each run was given to find its trial
        overrides = run_overrides(tmp_path / "sweep" / str(trial.number))
        assert overrides["sweep.trial"] == str(trial.number) and overrides["sweep.study"] == "s"
        assert overrides["sweep.storage"].replace("\\", "") == f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"


def trial_runs(sweep: Path) -> dict[int, dict]:
    """Each trial's metrics.json, by trial number (its run folder's name)."""
    return {int(p.name): json.loads((p / "metrics.json").read_text()) for p in sweep.iterdir() if p.name.isdigit()}


def check_pruned_search(sweep: Path, epochs: int):  # -> optuna.Study
    """What a median-pruned search through the training command leaves: every trial COMPLETE or PRUNED in the
    study, as its run's metrics.json says; each epoch reported once, as the run's history has it; a pruned run
    stopped early, behind the median of the trials completed before it, with its last.pt and metrics.json kept."""
    study = load_study(sweep / "optuna.db", "s")
    runs = trial_runs(sweep)
    assert sorted(runs) == [t.number for t in study.trials]
    assert any(t.state.name == "PRUNED" for t in study.trials)
    for trial in study.trials:
        metrics, curve = runs[trial.number], trial.intermediate_values
        assert metrics["state"] == trial.state.name.lower() and metrics["epochs"] == epochs  # complete | pruned
        assert sorted(curve) == list(range(metrics["epochs_trained"])) == list(range(len(metrics["history"])))
        assert list(curve.values()) == pytest.approx([row["val_top1"] for row in metrics["history"]])
        assert (sweep / str(trial.number) / "checkpoints" / "last.pt").is_file()
        if trial.state.name == "COMPLETE":
            assert metrics["epochs_trained"] == epochs and trial.value == pytest.approx(metrics["final_top1"])
            continue
        assert 2 <= metrics["epochs_trained"] < epochs and metrics["test_top1"] is None  # spared the 1st epoch
        step = max(curve)  # MedianPruner: its best so far is below the earlier complete trials' median there
        done = [t.intermediate_values[step] for t in study.trials[:trial.number] if t.state.name == "COMPLETE"]
        assert max(curve.values()) < statistics.median(done)
    return study


@pytest.mark.slow
def test_a_median_pruned_search_through_the_training_command(tmp_path: Path) -> None:
    """``hparams_search=optuna`` with the median pruner: 5 trials of 3 epochs (about 30 s). The trials learn (the
    best reaches 2.5x chance); those behind stop early, as the study, the run folders and the summary say."""
    pytest.importorskip("optuna")
    sweep = tmp_path / "sweep"
    run_sweep(sweep, "hydra.sweeper.n_trials=5", "hydra.sweeper.study_name=s", "trainer.epochs=3", *LEARNING,
              *MEDIAN, threads=1)
    study = check_pruned_search(sweep, epochs=3)
    assert study.best_value >= 25.0  # chance: 10%
    pruned = [str(t.number) for t in study.trials if t.state.name == "PRUNED"]
    assert sum(m["epochs_trained"] for m in trial_runs(sweep).values()) < 5 * 3  # 5 x 3 without the pruner
    summary = subprocess.run([sys.executable, str(SUMMARIZE), str(sweep)], capture_output=True, text=True,
                             check=True).stdout
    header = summary.splitlines()[2].split()
    assert header[:6] == ["run", "final_top1", "best_top1", "wall_time_sec", "state", "epochs_trained"]
    assert f"{len(pruned)} of 5 runs were pruned (stopped early by the search's pruner): {', '.join(pruned)}" in summary


@pytest.mark.slow
def test_pruning_trains_fewer_epochs_and_keeps_the_best_trial(tmp_path: Path) -> None:
    """8 trials of 4 epochs with and without the median pruner, the same sampler seed (about 2 min). TPE's first
    10 proposals are random, so both searches try the same learning rates, and a trial that runs through gets the
    same value in both (seeded training on the CPU). Pruning trains fewer epochs and finds the same best trial; the
    trials it stopped ended, unpruned, behind the median of those it kept."""
    common = ["hydra.sweeper.n_trials=8", "hydra.sweeper.study_name=s", "trainer.epochs=4", *LEARNING]
    run_sweep(tmp_path / "full", *common, threads=1)
    run_sweep(tmp_path / "pruned", *common, *MEDIAN, threads=1)
    full, pruned = load_study(tmp_path / "full" / "optuna.db", "s"), check_pruned_search(tmp_path / "pruned", 4)
    assert [t.params for t in full.trials] == [t.params for t in pruned.trials]
    kept = [a.value for a, b in zip(full.trials, pruned.trials, strict=True) if b.state.name == "COMPLETE"]
    assert [b.value for b in pruned.trials if b.state.name == "COMPLETE"] == pytest.approx(kept)
    assert all(a.value < statistics.median(kept) for a, b in zip(full.trials, pruned.trials, strict=True)
               if b.state.name == "PRUNED")
    assert pruned.best_trial.number == full.best_trial.number
    epochs = {name: sum(m["epochs_trained"] for m in trial_runs(tmp_path / name).values()) for name in ("full",
                                                                                                        "pruned")}
    assert epochs["full"] == 8 * 4 and epochs["pruned"] < epochs["full"]


@pytest.mark.slow
def test_an_mlflow_search_is_one_run_with_a_nested_run_per_trial(tmp_path: Path) -> None:
    """``logger=mlflow``: the sweeper keeps one store for the whole sweep (<sweep dir>/mlflow.db) and creates the
    sweep's run there; each trial's run nests under it, tagged with its trial and study, its config (the searched
    values among it) as params. The sweep's run has the search, each trial's value, and the best parameters."""
    pytest.importorskip("optuna")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    run_sweep(sweep, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=digits", "logger=mlflow",
              "+logger.mlflow.tags.team=vision", *TINY[1:], "trainer.epochs=1")
    client, study = MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}"), load_study(sweep / "optuna.db")
    runs = client.search_runs([client.get_experiment_by_name("vitrain").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags),
                      key=lambda r: int(r.data.tags["optuna.trial"]))
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"{tmp_path.name}/sweep"
    assert parent.data.tags["optuna.study"] == "digits" and parent.data.tags["team"] == "vision"
    assert parent.data.params["space.optimizer.lr"] == str(study.trials[0].distributions["optimizer.lr"])
    assert parent.data.params["best.optimizer.lr"] == str(study.best_params["optimizer.lr"])
    assert parent.data.metrics["trials_complete"] == 2 and parent.data.metrics["best_value"] == study.best_value
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "trial_value")] == [
        (t.number, t.value) for t in study.trials]
    for trial, child in zip(study.trials, children, strict=True):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        assert {k: child.data.tags[k] for k in ("optuna.trial", "optuna.study", "team")} == {
            "optuna.trial": str(trial.number), "optuna.study": "digits", "team": "vision"}
        assert float(child.data.params["optimizer.lr"]) == trial.params["optimizer.lr"]
        assert child.data.params["data.mixup"] == str(trial.params["data.mixup"])
        assert child.data.metrics["final/val_top1"] == pytest.approx(trial.value)
        assert not (sweep / str(trial.number) / "mlflow.db").exists()  # one store for the sweep, none per run


def test_slurm_launcher_config_composes() -> None:
    from hydra.utils import instantiate

    assert importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher"), \
        "hydra-submitit-launcher is missing: pip install -e '.[dev]' (or '.[slurm]')"
    launcher = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == ("gpu", 1, 1, 1)
    assert launcher.timeout_min > 0 and launcher.submitit_folder.endswith(".submitit/%j")
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"  # submits nothing until launch()
