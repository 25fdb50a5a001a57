"""Does distillation help? The digits teacher-student experiment.

Trains one CNN teacher (experiment=digits_teacher: timm's ResNet-18 at 32x32, seed 0, all training
images), then DeiT-Nano students (experiment=digits_distill, 16x16) with distill=none, hard and soft,
the same epochs, for each seed, on all training images and on a stratified 20% of them. Prints a
markdown table of mean +- std test top-1 and writes it to docs/distillation.md.

    python scripts/distill_digits.py --seeds 0 1 2

Each run equals a command-line run (the commands are in the document); they run in-process here
only to skip the start-up of many processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

from vitrain.config import compose
from vitrain.train import train

MODES = ("none", "hard", "soft")


def run(overrides: list[str], out: Path) -> dict:
    return train(compose(["trainer.progress=false", *overrides]), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["1.0:40", "0.2:40"],
                        help="FRACTION:EPOCHS of each setting (training images kept, epochs of every arm)")
    parser.add_argument("--teacher", type=Path, help="reuse this digits_teacher best.pt instead of training one")
    parser.add_argument("--out", type=Path, default=Path("outputs/distill_digits"))
    parser.add_argument("--doc", type=Path, default=Path("docs/distillation.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    if args.teacher:
        checkpoint = args.teacher
        teacher = json.loads((checkpoint.parent.parent / "metrics.json").read_text())
    else:
        teacher = run(["experiment=digits_teacher", "seed=0"], args.out / "teacher")
        checkpoint = args.out / "teacher" / "checkpoints" / "best.pt"
    args.settings = [(float(f), int(e)) for f, e in (s.split(":") for s in args.settings)]
    top1: dict[tuple[float, int, str], list[float]] = {}
    share: list[float] = []
    for fraction, epochs in args.settings:
        for seed in args.seeds:
            for mode in MODES:
                metrics = run(["experiment=digits_distill", f"distill={mode}", f"seed={seed}",
                               f"trainer.epochs={epochs}", f"distill.teacher.checkpoint={checkpoint}",
                               f"data.train_fraction={fraction}"],
                              args.out / f"frac{fraction}_ep{epochs}" / f"seed{seed}" / mode)
                top1.setdefault((fraction, epochs, mode), []).append(metrics["final_top1"])
                share += [row["teacher_time_share"] for row in metrics["history"] if "teacher_time_share" in row]
    table = render(top1, args, teacher, statistics.mean(share), time.perf_counter() - start)
    print(table)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(DOC_HEAD + table + DOC_TAIL)


def fmt(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def render(top1: dict, args: argparse.Namespace, teacher: dict, share: float, seconds: float) -> str:
    lines = ["| training images | epochs (steps) | distill=none | distill=hard | distill=soft |",
             "| --- | --- | --- | --- | --- |"]
    for fraction, epochs in args.settings:
        label = "all (1,437)" if fraction == 1 else f"{fraction:.0%} ({round(1437 * fraction)})"
        steps = epochs * math.ceil(round(1437 * fraction) / 32)  # batches of 32, the last one short
        lines.append(f"| {label} | {epochs} ({steps}) | " + " | ".join(fmt(top1[(fraction, epochs, m)]) for m in MODES)
                     + " |")
    seeds = " ".join(map(str, args.seeds))
    return "\n".join(lines) + (
        f"\n\nStudent test top-1 (%) on the 360 test digits, final epoch, mean ± std over seeds {seeds}. "
        f"Teacher (ResNet-18, all training images): {teacher['final_top1']:.2f}% test top-1. "
        f"The teacher's forward passes took {share:.0%} of the students' training time. "
        f"Measured with `python scripts/distill_digits.py --seeds {seeds} --settings "
        f"{' '.join(f'{f}:{e}' for f, e in args.settings)}` in {seconds / 60:.1f} minutes on a 2-core CPU.\n"
    )


DOC_HEAD = """# Distillation

## DeiT distillation on digits, from a teacher trained with vitrain

A CNN teacher (timm's ResNet-18, digits upsampled to 32x32, 15 epochs) is trained with vitrain on
scikit-learn's digits; DeiT-Nano students (`deit_nano_distilled_patch4_16`: vit_nano with a
distillation token and a second head, 16x16 inputs) are then trained for 40 epochs with
`distill=none` (both heads on the labels), `distill=hard` (the distillation head on the teacher's
top-1 class) and `distill=soft` (KL to the teacher's probabilities, tau 1), alpha 0.5, on all
training images and on a stratified 20% of them. The student batch (16x16) is resized to 32x32
for the teacher. The teacher saw all training images in both settings, as a teacher pretrained on
more data than the student has would.

"""

DOC_TAIL = """
The commands behind each cell (seed S, fraction F):

```bash
python -m vitrain.train experiment=digits_teacher hydra.run.dir=outputs/teacher
python -m vitrain.train experiment=digits_distill distill=hard seed=S data.train_fraction=F \\
    distill.teacher.checkpoint=outputs/teacher/checkpoints/best.pt     # distill=soft | none likewise
```
"""


if __name__ == "__main__":
    main()
