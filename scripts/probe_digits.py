"""What the cached-features path costs and gives: the digits transfer task three ways.

vit_nano is trained on the digits 0-4 (experiment=digits_pretrain, once per seed); on the digits 5-9 (relabelled
0-4) its head is then trained for the same number of epochs three ways: a linear probe on cached features
(trainer.cache_features=true: the frozen backbone runs once), a plain linear probe (the frozen backbone runs on
every batch of every epoch), and full fine-tuning (experiment=digits_finetune). Prints a markdown table of the
wall time of each run (from the command's start to its end, data loading included) and its test top-1, mean +- std
over the seeds. The runs run in-process (each as its command line would) to skip the interpreter start-ups.

    python scripts/probe_digits.py --seeds 0 1 2 --epochs 10
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from vitrain.config import compose
from vitrain.train import train

ARMS = {  # name -> overrides of experiment=digits_finetune
    "linear probe, cached features": ["trainer.freeze_backbone=true", "trainer.cache_features=true",
                                      "optimizer.lr=1e-2"],
    "linear probe, backbone every step": ["trainer.freeze_backbone=true", "optimizer.lr=1e-2"],
    "full fine-tuning (backbone 3e-4, head 1e-3)": [],
}


def timed(overrides: list[str], out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    metrics = train(compose(["trainer.progress=false", "logger=[]", *overrides]), out)
    return time.perf_counter() - start, metrics["final_top1"]


def spread(values: list[float]) -> str:
    return f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            pretrain = Path(tmp) / f"pretrain_{seed}"
            timed(["experiment=digits_pretrain", f"seed={seed}"], pretrain)
            for arm, overrides in ARMS.items():
                run = Path(tmp) / f"{arm.split(',')[0].replace(' ', '_')}_{seed}_{len(results[arm])}"
                results[arm].append(timed(["experiment=digits_finetune", f"seed={seed}",
                                           f"model.checkpoint={pretrain}/checkpoints/best.pt",
                                           f"trainer.epochs={args.epochs}", *overrides], run))
    print(f"| digits 5-9, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))} | wall time (s) | "
          f"test top-1 (%) |")
    print("| --- | --- | --- |")
    for arm, runs in results.items():
        times, top1 = [t for t, _ in runs], [a for _, a in runs]
        print(f"| {arm} | {statistics.mean(times):.1f}{spread(times)} | {statistics.mean(top1):.2f}{spread(top1)} |")


if __name__ == "__main__":
    main()
