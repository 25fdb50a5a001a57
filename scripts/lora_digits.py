"""LoRA against full fine-tuning and linear probing on the digits transfer task; merging a LoRA checkpoint.

    python scripts/lora_digits.py measure --seeds 0 1 2     # the table of docs/finetuning.md
    python scripts/lora_digits.py merge CHECKPOINT OUT.pt   # a LoRA run's weights as a plain state dict

measure: for each seed, train vit_nano on the digits 0-4 (experiment=digits_pretrain, 50 epochs), then train
it on the digits 5-9 (experiment=digits_finetune: a fresh head at lr 1e-3, cosine schedule, no warmup) for
10 epochs four ways: full fine-tuning (backbone lr 1e-3), LoRA rank 4 and rank 16 (alpha 16, adapters on
qkv/proj/fc1/fc2, adapter lr 3e-3, backbone frozen) and a linear probe (trainer.freeze_backbone=true, head lr
3e-2: the head is all that trains, and 1e-3 left it far behind in a pilot on seed 0). For
each: test top-1 of the final epoch, trainable parameters, peak resident memory of the training process
(ru_maxrss; each run in a fresh Python process, so that no two runs share a peak) and mean time per
optimizer step (training time / steps, data loading included). Prints a Markdown table of mean ± std over
the seeds and writes every run to a JSON file.

Every child process imports peft (when installed) before anything is measured, so all arms carry the same
libraries; the table gives the peak and its growth during training over what the imports left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FINETUNE = ["experiment=digits_finetune", "trainer.epochs=10"]
ARMS = {  # name -> overrides on top of FINETUNE
    "full fine-tuning, backbone lr 1e-3": ["optimizer.backbone_lr=1e-3"],
    "LoRA rank 4, adapter lr 3e-3": ["model.lora.rank=4", "optimizer.backbone_lr=3e-3"],
    "LoRA rank 16, adapter lr 3e-3": ["model.lora.rank=16", "optimizer.backbone_lr=3e-3"],
    "linear probe, head lr 3e-2": ["trainer.freeze_backbone=true", "optimizer.lr=3e-2"],
}
MARK = "LORA_DIGITS_RESULT "  # the child's result line on stdout


def run_child(out: Path, overrides: list[str]) -> dict[str, Any]:
    """One training run in this process (the child side of ``measure``): its metrics and measurements."""
    import resource

    with contextlib.suppress(ImportError):
        import peft  # noqa: F401  (loaded by every arm, so the imports weigh the same in each)
    from vitrain.checkpoint import load_training_checkpoint
    from vitrain.config import compose, to_config
    from vitrain.train import train

    cfg = to_config(compose(["trainer.progress=false", *overrides]))
    before = resource.getrusage(resource.RUSAGE_SELF)
    metrics = train(cfg, out)
    after = resource.getrusage(resource.RUSAGE_SELF)
    imports_kib, peak_kib = before.ru_maxrss, after.ru_maxrss  # KiB on Linux
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime  # training, evaluation, saving
    last = load_training_checkpoint(out / "checkpoints" / "last.pt")
    trainable, total = count_trainable(cfg, len(last["class_names"]))
    return {"top1": metrics["final_top1"], "best_top1": metrics["best_top1"], "steps": last["step"],
            "step_ms": 1000 * last["train_time"] / last["step"], "trainable": trainable, "total": total,
            "peak_rss_mib": peak_kib / 1024, "imports_rss_mib": imports_kib / 1024,
            "train_rss_mib": (peak_kib - imports_kib) / 1024, "wall_s": metrics["wall_time_sec"],
            "cpu_ms_per_step": 1000 * cpu_s / last["step"]}


def count_trainable(cfg: Any, num_classes: int) -> tuple[int, int]:
    """(trainable, all) parameters of the run's model as the Trainer trains it."""
    from vitrain.build import build_model
    from vitrain.lora import trainable_parameters
    from vitrain.optim import set_backbone_trainable

    model = build_model(cfg.model, num_classes)
    if cfg.trainer.freeze_backbone:
        set_backbone_trainable(model, False)
    return trainable_parameters(model)


def child(out: Path, overrides: list[str]) -> dict[str, Any]:
    """Run ``overrides`` in a fresh Python process; its result."""
    proc = subprocess.run([sys.executable, __file__, "run", str(out), *overrides], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not lines:
        sys.exit(f"run {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def measure(args: argparse.Namespace) -> None:
    """Pretrain, fine-tune every arm for every seed, print the table and write the JSON."""
    start, runs, pre = time.perf_counter(), [], []
    for seed in args.seeds:
        pre_dir = args.out / f"seed{seed}" / "pretrain_0-4"
        pre.append(child(pre_dir, ["experiment=digits_pretrain", f"seed={seed}"])["top1"])
        checkpoint = pre_dir / "checkpoints" / "best.pt"
        for i, (arm, extra) in enumerate(ARMS.items()):
            overrides = [*FINETUNE, f"model.checkpoint={checkpoint}", f"seed={seed}", *extra]
            result = child(args.out / f"seed{seed}" / f"arm{i}", overrides)
            runs.append({"arm": arm, "seed": seed, "overrides": overrides, **result})
            print(f"seed {seed} {arm}: top-1 {result['top1']:.1f}%, {result['trainable']} trainable, "
                  f"peak {result['peak_rss_mib']:.0f} MiB, {result['step_ms']:.1f} ms/step", flush=True)
    minutes = (time.perf_counter() - start) / 60
    table = render(runs, args.seeds, pre, minutes)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seeds": args.seeds, "finetune": FINETUNE, "arms": ARMS, "pretrain_top1": pre,
                                     "minutes": minutes, "threads": _threads(), "runs": runs,
                                     "table": table}, indent=2))
    print(f"wrote {args.json}")


def fmt(values: list[float], digits: int = 1) -> str:
    """``mean ± std`` of ``values`` (std 0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def render(runs: list[dict[str, Any]], seeds: list[int], pre: list[float], minutes: float) -> str:
    """The Markdown table: one row per arm, mean ± std over the seeds."""
    lines = ["| digits 5-9, 10 epochs | test top-1 (%) | trainable parameters | peak RSS (MiB) | "
             "RSS growth in training (MiB) | step time (ms) |", "| --- | --- | --- | --- | --- | --- |"]
    for arm in ARMS:
        rows = [r for r in runs if r["arm"] == arm]
        col = {k: [r[k] for r in rows] for k in rows[0] if isinstance(rows[0][k], float | int)}
        share = 100 * rows[0]["trainable"] / rows[0]["total"]
        lines.append(f"| {arm} | {fmt(col['top1'])} | {rows[0]['trainable']:,} ({share:.1f}%) | "
                     f"{fmt(col['peak_rss_mib'], 0)} | {fmt(col['train_rss_mib'], 1)} | {fmt(col['step_ms'], 2)} |")
    steps = runs[0]["steps"]
    return "\n".join(lines) + (
        f"\n\nMean ± std over seeds {' '.join(map(str, seeds))}; {steps} optimizer steps of 32 images. The 0-4 "
        f"models reached {fmt(pre)}% on the 0-4 test images. {minutes:.1f} minutes on {_threads()} CPU threads.\n")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def merge(args: argparse.Namespace) -> None:
    """Write the merged plain state dict of a (LoRA) training checkpoint, checked to load into the plain model."""
    import torch

    from vitrain.inference import load_trained
    from vitrain.models import create_model

    trained = load_trained(args.checkpoint, "cpu")
    state = {k: v.detach().clone() for k, v in trained.merged(args.ema).state_dict().items()}
    create_model(**trained.spec).load_state_dict(state, strict=True)  # exactly the plain model's keys
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.output)
    how = f"LoRA rank {trained.lora['rank']} merged" if trained.lora else "no LoRA adapters: weights as trained"
    print(f"wrote {args.output}: {len(state)} tensors of {trained.spec['name']} ({how}); "
          f"train from it with model.checkpoint={args.output}")


def main() -> None:
    """``measure``, ``merge`` or (internal) ``run``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="the LoRA / full fine-tuning / linear probe table")
    m.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    m.add_argument("--out", type=Path, default=Path("outputs/lora_digits"))
    m.add_argument("--json", type=Path, default=Path("outputs/lora_digits/results.json"))
    g = sub.add_parser("merge", help="a checkpoint's LoRA adapters merged: a plain state dict")
    g.add_argument("checkpoint", type=Path)
    g.add_argument("output", type=Path)
    g.add_argument("--ema", action="store_true", help="merge the EMA weights (when the checkpoint has them)")
    r = sub.add_parser("run", help="(internal) one training run, measured, in this process")
    r.add_argument("out", type=Path)
    r.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.command == "run":
        print(MARK + json.dumps(run_child(args.out, args.overrides)), flush=True)
    else:
        {"measure": measure, "merge": merge}[args.command](args)


if __name__ == "__main__":
    main()
