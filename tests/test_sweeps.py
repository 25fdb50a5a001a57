"""Sweeps beyond a grid: an Optuna search as a user runs it, the sweep summary, the SLURM launcher config."""

from __future__ import annotations

import csv
import importlib.util
import json
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


@pytest.fixture(scope="module")
def optuna_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Optuna search: 4 trials of 1 epoch on the digits."""
    sweep = tmp_path_factory.mktemp("optuna") / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "vitrain.train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=4",
         "trainer.epochs=1", "trainer.progress=false", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return sweep


def final_top1(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["final_top1"]


def test_optuna_sweep_runs_one_folder_per_trial(optuna_sweep: Path) -> None:
    runs = sorted(p for p in optuna_sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    lrs = set()
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["epochs"] == 1
        # selected on 10% of the training digits; the 360 test digits are scored once, at the end
        assert metrics["val_top1"] == metrics["final_top1"] and 0 <= metrics["test_top1"] <= 100
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()))
        assert set(SEARCHED) <= set(overrides) and overrides["trainer.epochs"] == "1"
        lrs.add(float(overrides["optimizer.lr"]))
        assert 1e-4 <= float(overrides["optimizer.lr"]) <= 3e-3 and overrides["data.mixup"] in ("0.0", "0.2", "0.8")
    assert len(lrs) == 4  # every trial got its own learning rate


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
    assert len(rows) == 4 and scores == sorted(scores, reverse=True)
    best = max(final_top1(p) for p in optuna_sweep.iterdir() if p.is_dir())
    assert final_top1(optuna_sweep / rows[0][0]) == best  # the first row is the best run
    assert "in every run: " in out and "trainer.epochs=1" in out  # shared overrides, once
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
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert set(SEARCHED) <= set(sweeper.params) and sweeper.n_jobs == 1
    assert sweeper.params["optimizer.lr"].startswith("tag(log, interval(")
    assert compose_with_hydra([]).hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def test_slurm_launcher_config_composes() -> None:
    from hydra.utils import instantiate

    assert importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher"), \
        "hydra-submitit-launcher is missing: pip install -e '.[dev]' (or '.[slurm]')"
    launcher = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == ("gpu", 1, 1, 1)
    assert launcher.timeout_min > 0 and launcher.submitit_folder.endswith(".submitit/%j")
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"  # submits nothing until launch()
