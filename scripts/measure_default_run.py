"""Measure the default job as a newcomer runs it: `python -m vitrain.train`, timed end to end.

Runs it once per seed (sequentially, nothing else running), then prints a table of test top-1,
wall time of the whole command and training throughput, as quoted in the README.

    python scripts/measure_default_run.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_once(seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"seed{seed}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitrain.train", f"seed={seed}", "trainer.progress=false",
                    f"hydra.run.dir={run_dir}", *extra], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"seed": seed, "wall": wall, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/measure_default_run"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.epochs=40")
    args = parser.parse_args()
    rows = [run_once(s, args.out, args.overrides) for s in args.seeds]
    print(f"\n{os.cpu_count()} CPU cores; command: python -m vitrain.train seed=S {' '.join(args.overrides)}")
    print("| seed | final top-1 (%) | best top-1 (%) | wall time (s) | train img/s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seed']} | {r['final_top1']:.2f} | {r['best_top1']:.2f} | {r['wall']:.1f} | "
              f"{r['train_images_per_sec']:.0f} |")
    if len(rows) > 1:
        top1 = [r["final_top1"] for r in rows]
        wall = [r["wall"] for r in rows]
        print(f"| mean ± std | {statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f} | | "
              f"{statistics.mean(wall):.1f} ± {statistics.stdev(wall):.1f} | |")


if __name__ == "__main__":
    main()
