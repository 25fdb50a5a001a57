"""A two-objective search on the digits: validation top-1 against model size, with NSGA-II, through the training
command as a user runs it (``sweep.objectives=[val_top1,params]``). Prints the markdown table of docs/sweeps.md
(every trial, the Pareto-optimal ones marked) and draws the front as a PNG.

    python scripts/sweep_pareto.py       # 12 trials of 8 epochs: under 2 minutes on a 2-core CPU
    python scripts/sweep_pareto.py --trials 6 --epochs 2 --out /tmp/pareto --image /tmp/pareto/front.png

The search: the width (``model.embed_dim``) and depth (``model.depth``) of the digits' ViT, with the learning rate;
the rest fixed (81 steps an epoch, no warm-up or regularisation). The sweep folder (``--out``) keeps every run,
``optuna.db`` and ``optimization_results.yaml`` (its ``solutions``: the front).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEARCH = ["hydra/sweeper/sampler=nsgaii", "hydra.sweeper.sampler.population_size=6", "hydra.sweeper.params=null",
          "sweep.objectives=[val_top1,params]", "hydra.sweeper.direction=[maximize,minimize]",
          "+model.embed_dim=choice(16,32,64,96)", "+model.depth=choice(1,2,4,6)",
          "optimizer.lr=tag(log, interval(3e-4, 3e-3))", "data.batch_size=16", "data.crop_padding=0",
          "scheduler.warmup_epochs=0", "model.drop_path=0.0", "trainer.progress=false", "logger=[]"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/sweep-pareto"))
    p.add_argument("--image", type=Path, default=Path("docs/images/pareto_digits.png"))
    args = p.parse_args()
    import optuna

    db = args.out.resolve() / "optuna.db"
    command = [sys.executable, "-m", "vitrain.train", "hparams_search=optuna", f"hydra.sweep.dir={args.out}",
               f"hydra.sweeper.n_trials={args.trials}", "hydra.sweeper.study_name=pareto",
               f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweeper.sampler.seed={args.seed}",
               f"trainer.epochs={args.epochs}", *SEARCH]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{db}")
    front = {t.number for t in study.best_trials}
    done = sorted((t for t in study.trials if t.values and "repeat_of" not in t.user_attrs), key=lambda t: t.values[1])
    repeats = [t.number for t in study.trials if "repeat_of" in t.user_attrs]
    print(f"{len(done)} trials of {args.epochs} epochs, {seconds / 60:.1f} min; * = on the Pareto front; proposals "
          f"that repeated a finished trial (recorded, not run): {repeats or 'none'}\n")
    print("| trial | embed_dim | depth | lr | parameters | val top-1 (%) | front |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for t in done:
        print(f"| {t.number} | {t.params['+model.embed_dim']} | {t.params['+model.depth']} | "
              f"{t.params['optimizer.lr']:.2e} | {t.values[1]:,.0f} | {t.values[0]:.1f} | "
              f"{'*' if t.number in front else ''} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], c="0.6", label="trial")
    best = sorted((t for t in done if t.number in front), key=lambda t: t.values[1])
    ax.plot([t.values[1] for t in best], [t.values[0] for t in best], "o-", c="C0", label="Pareto front")
    ax.set(xscale="log", xlabel="parameters", ylabel="validation top-1 (%)",
           title=f"NSGA-II on the digits: {len(done)} trials of {args.epochs} epochs")
    ax.legend()
    args.image.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.image, dpi=100)
    print(f"\nplot: {args.image}")


if __name__ == "__main__":
    main()
