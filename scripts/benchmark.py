"""Throughput of vitrain's models against timm's, of the data path, and of the Trainer against a bare loop.

Every part runs its contenders interleaved (one after the other, round after round, the order reversed
every other round, after one unrecorded warm-up round) and reports medians over the rounds:

  train    img/s of a full train step (forward, cross-entropy, backward, AdamW step, zero_grad) of vitrain's
           model and timm's model of the same name; the time ratio vitrain/timm; MFU of each
  infer    the same for inference (eval mode, torch.inference_mode)
  data     img/s of the data path alone, 32x32 uint8 images (synthetic) to normalized 224x224 batches on
           the device: vitrain's per-image transforms in DataLoader workers vs GpuAugment + DeviceLoader
  trainer  vitrain.trainer.Trainer for 3 epochs of N steps (checkpoints written in the background, and, as before,
           in place) vs a bare loop doing the same 3N steps; the cost of each save on the training thread and in
           the writer thread, and the overhead per step without the saves

    python scripts/benchmark.py --device cpu
    python scripts/benchmark.py --device cuda --out benchmark_cuda.json

Prints a markdown table, with PASS/MISS against the targets, and writes all figures to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench_data import bench_data, bench_folder, format_folder
from _bench_utils import (
    autocast,
    describe_machine,
    infer_flops,
    interleave,
    pair_row,
    peak_flops,
    seconds_per_call,
    synchronize,
    train_flops,
)
from torch import nn
from torch.utils.data import Dataset

from vitrain.data import DataSplits, cpu_loaders
from vitrain.distill import build_criterion
from vitrain.models import create_model
from vitrain.optim import build_optimizer, build_scheduler
from vitrain.runtime import autocast_dtype
from vitrain.trainer import Loaders, Trainer, TrainerConfig

log = logging.getLogger("benchmark")

PARTS = ("train", "infer", "data", "trainer")
# Per device: small and short on a CPU (the default command runs in minutes on two cores), large on a GPU.
DEFAULTS = {
    "cpu": dict(models=["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"], batch_size=8, precision="fp32",
                steps=3, rounds=5, data_batch_size=32, data_batches=6, trainer_steps=10, peak_size=2048),
    "cuda": dict(models=["vit_base_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224"],
                 batch_size=128, precision="bf16", steps=20, rounds=5, data_batch_size=256, data_batches=20,
                 trainer_steps=50, peak_size=8192),
}
# (device, precision, model): the largest vitrain/timm train-step time ratio and the smallest MFU allowed
TRAIN_TARGETS = {
    ("cpu", "fp32", "vit_tiny_patch16_224"): {"ratio": 1.00},
    ("cpu", "fp32", "swin_tiny_patch4_window7_224"): {"ratio": 1.05},
    ("cuda", "bf16", "vit_base_patch16_224"): {"ratio": 1.00, "mfu": 0.45},
}
DATA_SPEEDUP_TARGET = {"cuda": 3.0}  # device-resident path over the worker loader, by device type
TRAINER_OVERHEAD_TARGET = 0.05  # trainer time / bare-loop time - 1
TRAINER_EPOCHS = 3  # a save after each: the writer thread overlaps all but the last with the next epoch


def add_mfu(row: dict, flops: dict[str, int], peak: float) -> dict:
    """MFU = FLOPs per step / seconds per step / peak FLOP/s, for both contenders."""
    for key in ("a", "b"):
        seconds = row["items"] / row[f"{key}_img_s"]
        row[f"{key}_flops"] = flops[row[key]]
        row[f"{key}_mfu"] = flops[row[key]] / seconds / peak
    return row


def make_train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    amp_dtype: torch.dtype | None) -> Callable[[], None]:
    """A full train step on a fixed batch: forward, cross-entropy, backward, AdamW (fused on CUDA), zero_grad."""
    device = images.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

    def step() -> None:
        with autocast(device, amp_dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_infer_step(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(images.device, amp_dtype):
            model(images)

    return step


def bench_models(name: str, models: dict[str, nn.Module], batch_size: int, amp_dtype: torch.dtype | None,
                 steps: int, rounds: int, peak: float, compile_models: bool = False,
                 parts: tuple[str, ...] = ("train", "infer")) -> list[dict]:
    """``train`` and ``infer`` rows for two models of one architecture (``{"vitrain": m, "timm": m}``),
    on the same random batch at the models' input size."""
    device = next(next(iter(models.values())).parameters()).device
    size = next(iter(models.values())).patch_embed.img_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *size, generator=gen).to(device)
    classes = next(iter(models.values())).num_classes
    labels = torch.randint(0, classes, (batch_size,), generator=gen).to(device)
    runners = {source: torch.compile(m) if compile_models else m for source, m in models.items()}
    rows = []
    if "train" in parts:
        for model in models.values():
            model.train()
        flops = {source: train_flops(m, images, labels, amp_dtype) for source, m in models.items()}
        steps_fn = {s: make_train_step(r, images, labels, amp_dtype) for s, r in runners.items()}
        times = interleave({s: partial(seconds_per_call, f, steps, device) for s, f in steps_fn.items()}, rounds)
        rows.append(add_mfu(pair_row("train", name, times, batch_size), flops, peak))
    if "infer" in parts:
        for model in models.values():
            model.eval()
        flops = {source: infer_flops(m, images, amp_dtype) for source, m in models.items()}
        steps_fn = {s: make_infer_step(r, images, amp_dtype) for s, r in runners.items()}
        times = interleave({s: partial(seconds_per_call, f, steps, device) for s, f in steps_fn.items()}, rounds)
        rows.append(add_mfu(pair_row("infer", name, times, batch_size), flops, peak))
    return rows


def build_pair(name: str, device: torch.device) -> dict[str, nn.Module]:
    """vitrain's and timm's ``name`` with 1000 classes, no dropout and no stochastic depth (the same for both;
    vitrain's Swin would otherwise default to drop path 0.1, timm's create_model to 0)."""
    torch.manual_seed(0)
    return {source: create_model(name, 1000, source=source, drop_rate=0.0, drop_path_rate=0.0).to(device)
            for source in ("vitrain", "timm")}


class FixedImages(Dataset):
    """``length`` samples cycling through 16 random images and labels: a long epoch in little memory."""

    def __init__(self, length: int, size: tuple[int, int], classes: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(16, 3, *size, generator=gen)
        self.labels = torch.randint(0, classes, (16,), generator=gen)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i % 16], int(self.labels[i % 16])


def bare_seconds(parts: dict, device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """One epoch of a hand-written loop: the Trainer's model, optimizer, schedule, loss, autocast and loader,
    with nothing else (no finiteness check, logging, writer or checkpoint)."""
    model, optimizer, scheduler, criterion = parts["model"], parts["optimizer"], parts["scheduler"], parts["criterion"]
    synchronize(device)
    start = time.perf_counter()
    model.train()
    for images, labels in parts["train_loader"]:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            loss = criterion(images, model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    synchronize(device)
    return time.perf_counter() - start


def trainer_seconds(parts: dict, device: torch.device, precision: str, workdir: Path, async_save: bool = True,
                    saves: list | None = None) -> float:
    """Construction and ``fit()`` of a Trainer of ``TRAINER_EPOCHS`` epochs (TensorBoard writer, step logging,
    last.pt and best.pt at each epoch's end, metrics.json; no progress bar), minus the time spent in its evaluation.
    Appends to ``saves`` what its saves cost: seconds on the training thread (copy, and waits for the writer) and
    in the writer thread."""
    synchronize(device)
    start = time.perf_counter()
    config = TrainerConfig(epochs=TRAINER_EPOCHS, device=str(device), precision=precision, progress=False,
                           async_save=async_save)
    trainer = Trainer(parts["model"], parts["optimizer"], parts["scheduler"], parts["criterion"],
                      Loaders(parts["train_loader"], parts["val_loader"]), config, tempfile.mkdtemp(dir=workdir))
    evaluation = [0.0]
    evaluate = trainer.evaluate

    def timed_evaluate(*args: object) -> dict[str, float]:
        t0 = time.perf_counter()
        result = evaluate(*args)
        evaluation[0] += time.perf_counter() - t0
        return result

    trainer.evaluate = timed_evaluate
    trainer.fit()
    synchronize(device)
    seconds = time.perf_counter() - start - evaluation[0]
    s = trainer.saves
    writes = sum(s.write_seconds)
    blocking = sum(s.copy_seconds) + sum(s.wait_seconds) + (0.0 if async_save else writes)
    if saves is not None:
        saves.append({"saves": len(s.copy_seconds), "training_thread": blocking, "writes": writes,
                      "seconds": seconds})
    return seconds


def bench_trainer(name: str, device: torch.device, precision: str, batch_size: int, steps: int, rounds: int,
                  workdir: Path, compile_model: bool = False) -> list[dict]:
    """The Trainer (saves in the background, and in place as before) against a bare loop over the same
    ``TRAINER_EPOCHS`` x ``steps`` batches (fixed random images in memory, no workers), the same model, optimizer
    and loss; a validation set of one batch, whose time is excluded. Two rows, and per row what a save costs."""
    torch.manual_seed(0)
    model = create_model(name, 1000, drop_rate=0.0, drop_path_rate=0.0).to(device)
    size = model.patch_embed.img_size
    splits = DataSplits(FixedImages(steps * batch_size, size, 1000), FixedImages(batch_size, size, 1000),
                        [str(c) for c in range(1000)])
    train_loader, val_loader = cpu_loaders(splits, batch_size, pin_memory=device.type == "cuda")
    optimizer = build_optimizer(model, lr=1e-4)
    parts = dict(model=torch.compile(model) if compile_model else model, optimizer=optimizer,
                 scheduler=build_scheduler(optimizer, total_steps=1, name="constant"),
                 criterion=build_criterion("none"), train_loader=train_loader, val_loader=val_loader)
    saves: dict[str, list] = {"Trainer": [], "Trainer, saves in place": []}
    bare = partial(bare_seconds, parts, device, autocast_dtype(precision, device))
    contenders = {"Trainer": partial(trainer_seconds, parts, device, precision, workdir, True, saves["Trainer"]),
                  "Trainer, saves in place": partial(trainer_seconds, parts, device, precision, workdir, False,
                                                     saves["Trainer, saves in place"]),
                  "bare loop": lambda: sum(bare() for _ in range(TRAINER_EPOCHS))}
    times = interleave(contenders, rounds)
    rows = []
    for trainer in saves:
        row = pair_row("trainer", name, {trainer: times[trainer], "bare loop": times["bare loop"]},
                       TRAINER_EPOCHS * steps * batch_size)
        recorded = saves[trainer][-rounds:]  # after the warm-up round
        count = recorded[0]["saves"]
        save_ms = statistics.median(r["training_thread"] for r in recorded) * 1e3 / count
        write_ms = statistics.median(r["writes"] for r in recorded) * 1e3 / count
        per_step = statistics.median((r["seconds"] - r["training_thread"] - b) / (TRAINER_EPOCHS * steps)
                                     for r, b in zip(recorded, times["bare loop"], strict=True))
        bare_step = statistics.median(times["bare loop"]) / (TRAINER_EPOCHS * steps)
        row.update(saves_per_run=count, save_ms_training_thread=save_ms, save_ms_written=write_ms,
                   step_overhead_ms=per_step * 1e3, bare_step_ms=bare_step * 1e3)
        rows.append(row)
    return rows


def judge(row: dict, device: str, precision: str) -> dict:
    """Set the row's ``target`` (text) and ``result`` (PASS, MISS, or "-" where no target applies)."""
    checks: list[tuple[str, bool]] = []
    if row["a"] is None:
        row.update(target="-", result="not run")
        return row
    if row["part"] == "train":
        target = TRAIN_TARGETS.get((device, precision, row["model"]), {})
        if "ratio" in target:
            checks.append((f"time ratio <= {target['ratio']:.2f}", row["ratio"] <= target["ratio"]))
        if "mfu" in target:
            checks.append((f"MFU >= {target['mfu']:.0%}", row["a_mfu"] >= target["mfu"]))
    elif row["part"] == "data" and device in DATA_SPEEDUP_TARGET:
        speedup = DATA_SPEEDUP_TARGET[device]
        checks.append((f"speedup >= {speedup:g}x", 1 / row["ratio"] >= speedup))
    elif row["part"] == "trainer":
        checks.append((f"overhead <= {TRAINER_OVERHEAD_TARGET:.0%}", row["ratio"] - 1 <= TRAINER_OVERHEAD_TARGET))
    row["target"] = "; ".join(text for text, _ in checks) or "-"
    row["result"] = ("PASS" if all(ok for _, ok in checks) else "MISS") if checks else "-"
    return row


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def figure(row: dict) -> tuple[str, str]:
    """(what the row's figure is, its median [min, max] over the rounds) for the table."""
    if row["a"] is None:
        return "-", "-"
    lo, mid, hi = row["ratio_min"], row["ratio"], row["ratio_max"]
    if row["part"] == "data":
        return "speedup A/B", f"{1 / mid:.2f}x [{1 / hi:.2f}, {1 / lo:.2f}]"
    if row["part"] == "trainer":
        return "overhead A/B - 1", f"{mid - 1:+.1%} [{lo - 1:+.1%}, {hi - 1:+.1%}]"
    return "time A/B", f"{mid:.3f} [{lo:.3f}, {hi:.3f}]"


def format_table(rows: list[dict]) -> str:
    columns = ("part", "model", "A vs B", "A img/s", "B img/s", "figure", "median [min, max]", "MFU A", "MFU B",
               "target", "result")
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        mfu = [f"{row[k]:.1%}" if k in row else "-" for k in ("a_mfu", "b_mfu")]
        what, value = figure(row)
        lines.append(f"| {row['part']} | {row['model']} | {row['a']} vs {row['b']} | {_rate(row.get('a_img_s'))} | "
                     f"{_rate(row.get('b_img_s'))} | {what} | {value} | {mfu[0]} | {mfu[1]} | {row['target']} | "
                     f"{row['result']} |")
    return "\n".join(lines)


def run_parts(args: argparse.Namespace, device: torch.device, report: dict) -> list[dict]:
    """Run the parts asked for, in order: train and infer per model, data, trainer."""
    amp_dtype = autocast_dtype(args.precision, device)
    rows: list[dict] = []
    model_parts = tuple(p for p in ("train", "infer") if p in args.parts)
    if model_parts:
        report["peak_flops"] = peak = peak_flops(device, amp_dtype or torch.float32, args.peak_size)
        log.info("peak %.3g FLOP/s (%d^2 %s matmul)", peak, args.peak_size, args.precision)
        for name in args.models:
            log.info("%s: %s", "/".join(model_parts), name)
            rows += bench_models(name, build_pair(name, device), args.batch_size, amp_dtype, args.steps,
                                 args.rounds, peak, args.compile, model_parts)
    if "data" in args.parts:
        log.info("data: %d batches of %d, %d workers", args.data_batches, args.data_batch_size, args.workers)
        rows.append(bench_data(device, args.data_batch_size, args.data_batches, args.rounds, args.workers))
        if args.data_folder is not None:  # image folder vs shards vs the decode-once cache
            log.info("data: %d generated JPEGs in %s", args.data_images, args.data_folder)
            report["data_folder"] = bench_folder(device, args.data_folder, args.data_images, args.data_batch_size,
                                                 args.workers, args.rounds)
    if "trainer" in args.parts:
        log.info("trainer: %s, %d steps of %d", args.models[0], args.trainer_steps, args.batch_size)
        with tempfile.TemporaryDirectory() as workdir:
            rows += bench_trainer(args.models[0], device, args.precision, args.batch_size, args.trainer_steps,
                                  args.rounds, Path(workdir), args.compile)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=sorted(DEFAULTS), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", help="model names known to vitrain and timm (default: per device)")
    p.add_argument("--batch-size", type=int, help="images per train/inference step (and per trainer step)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="autocast dtype (default: fp32 CPU, bf16 GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--steps", type=int, help="timed steps per contender per round (train, infer)")
    p.add_argument("--rounds", type=int, help="recorded rounds per part, after one warm-up round")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers (data)")
    p.add_argument("--data-batch-size", type=int, help="images per batch of the data part")
    p.add_argument("--data-batches", type=int, help="batches per round of the data part")
    p.add_argument("--data-folder", type=Path, help="data part: also compare loaders on JPEGs generated here")
    p.add_argument("--data-images", type=int, default=2000, help="training JPEGs generated in --data-folder")
    p.add_argument("--trainer-steps", type=int, help="steps per run of the trainer part")
    p.add_argument("--peak-size", type=int, help="side of the square matmul that measures the peak FLOP/s")
    p.add_argument("--out", type=Path, default=Path("benchmark.json"), help="JSON file of all figures")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = tuple(part.strip() for part in args.parts.split(","))
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is visible")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("vitrain").setLevel(logging.WARNING)  # the Trainer's per-epoch lines
    device = torch.device(args.device)
    start = time.perf_counter()
    report: dict = {"machine": describe_machine(device),
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    rows = [judge(row, device.type, args.precision) for row in run_parts(args, device, report)]
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.update(wall_seconds=time.perf_counter() - start, rows=rows)
    args.out.write_text(json.dumps(report, indent=2))
    m = report["machine"]
    print(f"\n{m.get('gpu', m['cpu'])}, {m['cores']} cores, torch {m['torch']}, timm {m['timm']}; {args.precision}"
          f"{', compiled' if args.compile else ''}; load average {m['load_average_1_5_15min'][0]} at start, "
          f"{m['load_average_at_end'][0]} at end; {report['wall_seconds']:.0f} s")
    print(format_table(rows))
    for row in rows:
        if "saves_per_run" in row:
            print(f"{row['a']}: {row['saves_per_run']} saves per run, each {row['save_ms_training_thread']:.0f} ms on "
                  f"the training thread, {row['save_ms_written']:.0f} ms written; the steps without the saves "
                  f"{row['step_overhead_ms']:+.1f} ms each over the bare loop's {row['bare_step_ms']:.0f} ms")
    if "data_folder" in report:
        print(format_folder(report["data_folder"]))
    print(f"figures: {args.out}")
    return report


if __name__ == "__main__":
    main()
