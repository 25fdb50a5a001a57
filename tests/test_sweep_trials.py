"""What a long Optuna sweep meets: trials that are refused or fail (recorded as FAIL with their reason, the sweep
going on), a sweep stopped by a signal and continued (the cut trial runs again, nothing is left RUNNING), a study
continued with the same command (no parameter set repeated), several objectives, and every documented sampler and
pruner running a real 3-trial sweep of vitrain.train on the digits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweeps import REPO, TINY, load_study, run_sweep

pytest.importorskip("optuna")


def sweep(path: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_sweep(path, *overrides) if check else subprocess.run(
        [sys.executable, "-m", "vitrain.train", "-m", "hparams_search=optuna", *overrides, f"hydra.sweep.dir={path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_refused_and_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """A refused value (batch size 0) and a run stopped by its NaN guard (a learning rate of 1e30) are FAIL with
    their one-line reason; the other trials complete; the sweep exits 0 within max_failure_rate=1."""
    db = tmp_path / "study.db"
    result = sweep(tmp_path / "s", "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null",
                   "data.batch_size=choice(720,0)", "optimizer.lr=choice(1e-3,1e30)", "hydra.sweeper.n_trials=4",
                   "hydra.sweeper.max_failure_rate=1.0", f"hydra.sweeper.storage=sqlite:///{db}",
                   "hydra.sweeper.study_name=faults", *TINY[1:2], *TINY[3:], "trainer.epochs=1")
    trials = load_study(db, "faults").trials
    by_params = {(t.params["data.batch_size"], t.params["optimizer.lr"]): t for t in trials}
    assert len(by_params) == 4 and not [t for t in trials if t.state.name == "RUNNING"]
    assert by_params[(720, 1e-3)].state.name == "COMPLETE"
    for lr in (1e-3, 1e30):
        refused = by_params[(0, lr)]
        assert refused.state.name == "FAIL"
        assert refused.user_attrs["fail_reason"] == "data.batch_size must be positive, got 0"
    diverged = by_params[(720, 1e30)]
    assert diverged.state.name == "FAIL" and "nan" in diverged.user_attrs["fail_reason"].lower()
    assert "error: data.batch_size must be positive, got 0" in result.stderr


@pytest.mark.slow
def test_a_sweep_stops_at_max_failure_rate_with_its_failures_recorded(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    result = sweep(tmp_path / "s", "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null",
                   "data.batch_size=choice(0,-1)", "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage=sqlite:///{db}",
                   "hydra.sweeper.study_name=faults", *TINY[:2], *TINY[3:], check=False)
    assert result.returncode == 1
    [trial] = load_study(db, "faults").trials
    assert trial.state.name == "FAIL"
    assert trial.user_attrs["fail_reason"] == f"data.batch_size must be positive, got {trial.params['data.batch_size']}"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 1 trials failed, more than hydra.sweeper.max_failure_rate=0.0 allows, the "
                           "last with: data.batch_size must be positive") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_same_command_on_the_same_storage_repeats_no_trial(tmp_path: Path) -> None:
    """hparams_search=optuna seeds its sampler (seed 0): a continued study seeds it from its trial count, so the
    second run proposes 3 new parameter sets, not trials 0-2 again."""
    db = tmp_path / "study.db"
    for name in ("first", "second"):
        run_sweep(tmp_path / name, "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage=sqlite:///{db}",
                  "hydra.sweeper.study_name=again", *TINY[1:], "trainer.epochs=1")
    trials = load_study(db, "again").trials
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6


@pytest.mark.slow
def test_two_objectives_accuracy_and_size(tmp_path: Path) -> None:
    """sweep.objectives: the run returns its final top-1 and its parameter count, NSGA-II keeps both."""
    db = tmp_path / "study.db"
    run_sweep(tmp_path / "s", "hydra/sweeper/sampler=nsgaii", "sweep.objectives=[val_top1,params]",
              "hydra.sweeper.direction=[maximize,minimize]", "hydra.sweeper.params=null",
              "+model.embed_dim=choice(32,64)", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage=sqlite:///{db}",
              "hydra.sweeper.study_name=two", *TINY[1:], "trainer.epochs=1")
    trials = load_study(db, "two").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    from vitrain.models import create_model

    for t in trials:
        embed = t.params["+model.embed_dim"]  # the key as written, with its +
        size = sum(p.numel() for p in create_model("vit_nano_patch4_16", 10, embed_dim=embed).parameters())
        assert t.values[1] == size and 0 <= t.values[0] <= 100


def app_of_ones_own(folder: Path, config: str, body: str = "    return cfg.x\n") -> None:
    """A Hydra app that is not vitrain.train, in ``folder``: ``conf/app.yaml`` holds ``config`` (after the line
    choosing vitrain's sweeper), ``app.py``'s task function runs ``body``."""
    (folder / "conf").mkdir()
    (folder / "conf" / "app.yaml").write_text("defaults:\n  - override hydra/sweeper: vitrain_optuna\n" + config)
    (folder / "app.py").write_text('import hydra\n\n\n@hydra.main(version_base="1.3", config_path="conf", '
                                   f'config_name="app")\ndef main(cfg):\n{body}\n\nmain()\n')


def run_app(folder: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python app.py -m ARGS`` in ``folder``, with vitrain's sweeper (and modules beside the app) importable."""
    return subprocess.run([sys.executable, "app.py", "-m", *args], cwd=folder, check=check, capture_output=True,
                          text=True, timeout=120, env=os.environ | {"PYTHONPATH": f"{REPO}:{folder}"})


def test_a_pruner_with_an_app_that_cannot_report_is_one_line_at_the_start(tmp_path: Path) -> None:
    app_of_ones_own(tmp_path, "  - _self_\nx: 0.0\nhydra:\n  sweeper:\n    n_trials: 2\n"
                              "    params: {x: 'choice(1.0, 2.0)'}\n")
    result = run_app(tmp_path, "hydra/sweeper/pruner=median", f"hydra.sweep.dir={tmp_path}/s", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: a pruner needs runs that report their epochs")
    assert not (tmp_path / "s" / "0").exists()  # no trial ran


def test_a_sweep_killed_outright_leaves_its_trial_to_be_failed_and_run_again(tmp_path: Path) -> None:
    """SIGKILL to the sweep's process group: nothing can be recorded, the trial stays RUNNING; the same command
    continued once the heartbeat is stale (twice hydra.sweeper.heartbeat_interval) marks it FAIL and runs its
    parameters again first (retry_of), and leaves nothing RUNNING."""
    app_of_ones_own(tmp_path, "  - _self_\nx: 0.0\nhydra:\n  sweeper:\n    heartbeat_interval: 1\n"
                              f"    storage: sqlite:///{tmp_path}/study.db\n    study_name: killed\n"
                              "    params: {x: 'interval(0, 1)'}\n",
                    '    import pathlib, time\n    flag = pathlib.Path("started")\n    if not flag.exists():\n'
                    '        flag.write_text(str(cfg.x))\n        time.sleep(120)\n    return cfg.x\n')
    proc = subprocess.Popen([sys.executable, "app.py", "-m", "hydra.sweeper.n_trials=3",
                             f"hydra.sweep.dir={tmp_path}/first"], cwd=tmp_path, start_new_session=True,
                            env=os.environ | {"PYTHONPATH": f"{REPO}:{tmp_path}"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the first heartbeat follows the ask at once
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    [left] = load_study(tmp_path / "study.db", "killed").trials
    assert left.state.name == "RUNNING" and left.params["x"] == float((tmp_path / "started").read_text())
    time.sleep(2.5)  # stale: no heartbeat for more than 2 s
    result = run_app(tmp_path, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/second")
    trials = load_study(tmp_path / "study.db", "killed").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"], result.stderr[-2000:]
    assert trials[1].params == left.params and trials[1].user_attrs["retry_of"] == 0
    assert "was left RUNNING by a sweep killed outright" in result.stdout
    assert "Warning" not in result.stderr


@pytest.mark.slow
def test_a_proposal_that_repeats_a_finished_trial_is_recorded_not_run(tmp_path: Path) -> None:
    """Random sampling of 3 values, 3 trials: each value runs once (the app logs each run); a proposal of a value
    already run is recorded with that trial's result and its repeat_of, and not run."""
    app_of_ones_own(tmp_path, "  - override hydra/sweeper/sampler: random\n  - _self_\nx: 0.0\nhydra:\n"
                              "  sweeper:\n    n_trials: 3\n    direction: maximize\n"
                              f"    storage: sqlite:///{tmp_path}/study.db\n    study_name: repeats\n"
                              "    sampler: {seed: 0}\n    params: {x: 'choice(1.0, 2.0, 3.0)'}\n",
                    '    with open("ran.txt", "a") as f:\n        f.write(f"{cfg.x}\\n")\n    return cfg.x\n')
    run_app(tmp_path, f"hydra.sweep.dir={tmp_path}/s")
    assert sorted((tmp_path / "ran.txt").read_text().split()) == ["1.0", "2.0", "3.0"]
    trials = load_study(tmp_path / "study.db", "repeats").trials
    ran = {t.number: t for t in trials if "repeat_of" not in t.user_attrs}
    assert sorted(t.params["x"] for t in ran.values()) == [1.0, 2.0, 3.0]
    repeats = [t for t in trials if "repeat_of" in t.user_attrs]
    assert repeats  # seed 0 proposes 3.0 twice before 1.0
    for t in repeats:
        earlier = ran[t.user_attrs["repeat_of"]]
        assert t.params == earlier.params and t.values == earlier.values


@pytest.mark.slow
def test_the_removed_motpe_sampler_is_one_line(tmp_path: Path) -> None:
    result = sweep(tmp_path / "s", "hydra/sweeper/sampler=motpe", *TINY, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the motpe sampler was removed in Optuna 4, whose TPE handles several objectives itself: use "
        "hydra/sweeper/sampler=tpe (or nsgaii)")
    assert not (tmp_path / "s" / "0").exists()


@pytest.mark.slow
def test_a_continued_grid_runs_what_is_left_of_it_and_stops(tmp_path: Path) -> None:
    """A grid of 3 points: 2 trials, then the same command with n_trials=5 runs the 1 point left, and stops."""
    app_of_ones_own(tmp_path, "  - override hydra/sweeper/sampler: grid\n  - _self_\nx: 0.0\nhydra:\n"
                              "  sweeper:\n    direction: maximize\n"
                              f"    storage: sqlite:///{tmp_path}/study.db\n    study_name: grid\n"
                              "    params: {x: 'choice(1.0, 2.0, 3.0)'}\n")
    for n, folder in ((2, "first"), (5, "second")):
        run_app(tmp_path, f"hydra.sweeper.n_trials={n}", f"hydra.sweep.dir={tmp_path}/{folder}")
    trials = load_study(tmp_path / "study.db", "grid").trials
    assert sorted(t.params["x"] for t in trials) == [1.0, 2.0, 3.0]
    assert sorted(p.name for p in (tmp_path / "second").iterdir() if p.is_dir()) == ["0"]  # the one point left


@pytest.mark.slow
def test_a_custom_search_space_suggests_more_parameters_per_trial(tmp_path: Path) -> None:
    """hydra.sweeper.custom_search_space: a function of (cfg, trial), as hydra-optuna-sweeper calls it, whose
    suggestions reach the run as overrides."""
    app_of_ones_own(tmp_path, "  - _self_\nx: 0.0\ny: 0.0\nhydra:\n  sweeper:\n    n_trials: 3\n"
                              f"    storage: sqlite:///{tmp_path}/study.db\n    study_name: custom\n"
                              "    custom_search_space: space.extend\n    params: {x: 'interval(0, 1)'}\n",
                    "    return cfg.x + cfg.y\n")
    (tmp_path / "space.py").write_text("def extend(cfg, trial):\n    trial.suggest_float('y', 10.0, 20.0)\n")
    run_app(tmp_path, f"hydra.sweep.dir={tmp_path}/s")
    trials = load_study(tmp_path / "study.db", "custom").trials
    assert len(trials) == 3
    for t in trials:
        assert 10 <= t.params["y"] <= 20 and t.value == pytest.approx(t.params["x"] + t.params["y"])


@pytest.mark.parametrize(("sampler", "keys", "attribute"), [
    ("tpe", ["multivariate=true", "constant_liar=true", "consider_endpoints=true"], ("_multivariate", True)),
    ("cmaes", ["restart_strategy=ipop", "popsize=8", "use_separable_cma=true"], ("_popsize", 8)),
])
def test_the_official_sampler_keys_are_set_without_a_plus(sampler: str, keys: list[str], attribute: tuple) -> None:
    """hydra-optuna-sweeper's sampler keys are in vitrain's configs: set as written, they reach the sampler."""
    from hydra.utils import instantiate
    from test_sweeps import build_sweeper

    config = build_sweeper([f"hydra/sweeper/sampler={sampler}", *(f"hydra.sweeper.sampler.{k}" for k in keys)]).sampler
    built = instantiate(config)
    assert getattr(built, attribute[0]) == attribute[1]


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_leaves_no_running_trial_and_runs_the_cut_one_again(tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    args = [sys.executable, "-m", "vitrain.train", "-m", "hparams_search=optuna",
            f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=cut", "scheduler.warmup_epochs=0",
            "data.batch_size=64", "trainer.progress=false"]
    proc = subprocess.Popen([*args, "hydra.sweeper.n_trials=3", "trainer.epochs=20",
                             f"hydra.sweep.dir={tmp_path / 'first'}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "first" / "0" / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler signals the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    cut = load_study(db, "cut").trials
    assert [(t.state.name, t.user_attrs.get("cut")) for t in cut] == [("FAIL", True)]
    subprocess.run([*args, "hydra.sweeper.n_trials=1", "trainer.epochs=1", f"hydra.sweep.dir={tmp_path / 'second'}"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    trials = load_study(db, "cut").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == cut[0].params and trials[1].user_attrs["retry_of"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["hydra/sweeper/sampler=random"], ["hydra/sweeper/sampler=cmaes"],
                                   ["hydra/sweeper/sampler=gp"], ["hydra/sweeper/sampler=qmc"],
                                   ["hydra/sweeper/sampler=nsgaii"], ["hydra/sweeper/pruner=median"],
                                   ["hydra/sweeper/pruner=hyperband"], ["hydra/sweeper/pruner=successive_halving"]])
def test_every_documented_sampler_and_pruner_runs_a_sweep(extra: list[str], tmp_path: Path) -> None:
    db = tmp_path / "study.db"
    run_sweep(tmp_path / "s", *extra, "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage=sqlite:///{db}",
              "hydra.sweeper.study_name=each", *TINY)
    assert [t.state.name for t in load_study(db, "each").trials] in (
        ["COMPLETE"] * 3, ["COMPLETE", "COMPLETE", "PRUNED"], ["COMPLETE", "PRUNED", "PRUNED"])
