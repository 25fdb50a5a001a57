"""What does the median pruner save on an Optuna search? The same search on the digits twice, without and with
``hydra/sweeper/pruner=median`` (the same sampler seed), each through the training command as a user runs it.

Prints the markdown table of docs/sweeps.md (best validation top-1, the test top-1 of the best trial, epochs
trained in all, wall time) and writes Optuna's optimization-history plot of both searches as a PNG.

    python scripts/sweep_pruning.py            # 20 trials of 8 epochs each way: 6.5 minutes on a 2-core CPU
    python scripts/sweep_pruning.py --trials 8 --epochs 4 --out /tmp/pruning --image /tmp/pruning/history.png

The runs train with one thread (OMP_NUM_THREADS=1), the steadier choice on a small shared machine; the sweep
folders (``--out``) keep every run, ``optuna.db`` and ``optimization_results.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Trials that learn in a few epochs (81 steps an epoch, no warm-up, augmentation or regularisation) over a learning
# rate wide enough that some diverge and some barely move; the weight decay as hparams_search=optuna searches it.
SEARCH = ["optimizer.lr=tag(log, interval(1e-5, 3e-2))", "optimizer.weight_decay=interval(0.0, 0.1)",
          "model.drop_path=0.0", "data.mixup=0.0", "loss.label_smoothing=0.0", "data.batch_size=16",
          "data.crop_padding=0", "scheduler.warmup_epochs=0", "trainer.progress=false", "logger=[]"]
MEDIAN = ["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=5",
          "hydra.sweeper.pruner.n_warmup_steps=2"]  # judged from the 3rd epoch on, once 5 trials completed
SEARCHES = {"no pruner": [], "median pruner": MEDIAN}  # name -> the overrides that differ


def run_search(folder: Path, study: str, trials: int, epochs: int, seed: int, overrides: list[str]) -> float:
    """One search through ``python -m vitrain.train hparams_search=optuna``; its wall time in seconds."""
    command = [sys.executable, "-m", "vitrain.train", "hparams_search=optuna", f"hydra.sweep.dir={folder}",
               f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.study_name={study}",
               f"hydra.sweeper.sampler.seed={seed}", f"trainer.epochs={epochs}", *SEARCH, *overrides]
    print(f"$ {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"the search in {folder} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def table_row(name: str, study, folder: Path, wall: float) -> list[str]:  # study: optuna.Study
    """The search's row: trials by state, epochs trained, wall time, the best trial's validation and test top-1."""
    runs = {int(p.name): json.loads((p / "metrics.json").read_text()) for p in folder.iterdir() if p.name.isdigit()}
    best = study.best_trial
    states = [t.state.name for t in study.trials]
    return [name, f"{states.count('COMPLETE')} / {states.count('PRUNED')}",
            str(sum(m["epochs_trained"] for m in runs.values())), f"{wall / 60:.1f} min",
            f"{best.value:.2f}", f"{runs[best.number]['test_top1']:.2f}",
            f"{best.params['optimizer.lr']:.2e} (trial {best.number})"]


def plot_history(studies: list, path: Path) -> None:
    """Optuna's optimization-history plot of the searches in one axes: each completed trial's value and the best
    so far, by trial number (pruned trials have no final value: Optuna leaves them out)."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    ax = optuna.visualization.matplotlib.plot_optimization_history(studies, target_name="val top-1 (%)")
    ax.figure.set_size_inches(8, 4.5)
    ax.figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials in each search")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of a trial that is not pruned")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed, the same in both searches")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "sweep_pruning", help="the sweep folders")
    parser.add_argument("--image", type=Path, default=REPO / "docs" / "images" / "sweep_pruning_history.png")
    args = parser.parse_args()
    import optuna

    rows, studies = [], []
    for name, overrides in SEARCHES.items():
        folder, study_name = args.out / name.replace(" ", "_"), name.replace(" ", "-")
        wall = run_search(folder, study_name, args.trials, args.epochs, args.seed, overrides)
        studies.append(optuna.load_study(study_name=study_name, storage=f"sqlite:///{folder.resolve()}/optuna.db"))
        rows.append(table_row(name, studies[-1], folder, wall))
    plot_history(studies, args.image)
    header = ["search", "trials complete / pruned", "epochs trained", "wall time", "best val top-1 (%)",
              "its test top-1 (%)", "its learning rate"]
    print("\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]))


if __name__ == "__main__":
    main()
