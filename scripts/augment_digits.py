"""What the training crop and an augmentation policy cost and give on small images: the default digits job
(ViT-Nano, 50 epochs, from scratch) with the padded crop (the default), RandomResizedCrop (scale 0.35-1),
and RandomResizedCrop + TrivialAugment, 3 seeds each, every run a fresh `python -m vitrain.train` process.

    python scripts/augment_digits.py --seeds 0 1 2        # prints a Markdown table; runs in outputs/augment_digits/
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

ARMS = {
    "padded crop (default)": [],
    "RRC 0.35-1": ["data.train_crop=rrc", "data.scale=[0.35,1.0]"],
    "RRC 0.35-1 + TrivialAugment": ["data.train_crop=rrc", "data.scale=[0.35,1.0]", "data.auto_augment=trivialaugment"],
}


def run(arm: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / arm.split(" (")[0].replace(" ", "_").replace("+", "plus") / f"seed{seed}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitrain.train", f"seed={seed}", "trainer.progress=false",
                    f"hydra.run.dir={run_dir}", *ARMS[arm], *extra], check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"arm": arm, "seed": seed, "wall": time.perf_counter() - start, "final_top1": metrics["final_top1"],
            "best_top1": metrics["best_top1"], "img_per_sec": metrics["train_images_per_sec"]}


def mean_std(values: list[float], digits: int = 2) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/augment_digits"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    rows = [run(arm, seed, args.out, args.overrides) for arm in ARMS for seed in args.seeds]
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    extra = " ".join(args.overrides)
    print(f"\n{os.cpu_count()} CPU cores; seeds {args.seeds}; python -m vitrain.train seed=S <arm> {extra}")
    print("| training crop | final test top-1 (%) | best epoch (%) | train img/s | wall time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        print(f"| {arm} | {mean_std([r['final_top1'] for r in mine])} | {mean_std([r['best_top1'] for r in mine])} | "
              f"{mean_std([r['img_per_sec'] for r in mine], 0)} | {mean_std([r['wall'] for r in mine], 1)} |")


if __name__ == "__main__":
    main()
