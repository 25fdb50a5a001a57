"""ViTs against CNNs, measured on the CPU at hand.

Four parts; each one's results go into the JSON as soon as they exist, and a training run already in
the JSON is not run again, so a long run that stops continues where it was:

- cost: parameters and GFLOPs at 224x224 (1,000 classes), inference and training-step throughput.
- digits: test top-1 on scikit-learn's digits (upsampled to 32x32), every model trained with vitrain's
  training entry point for the same epochs with the same recipe, for each seed.
- fraction: the same with 10%, 25%, 50% and 100% of the training images, for a subset of the models.
- resolution: ViT-S/16 against Swin-T at 224, 384 and 512: forward+backward time, activations saved for
  the backward pass, attention FLOPs, and the attention call alone.

    python scripts/compare_vit_cnn.py                          # everything (about 45 minutes on 2 cores)
    python scripts/compare_vit_cnn.py --parts cost             # one part again; the others stay in the JSON
    python scripts/compare_vit_cnn.py --parts                  # only print the tables and redraw the plots
    python scripts/compare_vit_cnn.py --quick --out /tmp/q.json --images /tmp/q   # a smoke run

Each training run equals `python -m vitrain.train <overrides>` (the JSON stores the command); they run
in-process only to skip the start-up of many processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _bench_utils import CPU_ATTENTION_FLOPS, describe_machine
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from vitrain.build import build_model
from vitrain.config import compose, to_config
from vitrain.errors import ConfigError
from vitrain.losses import ClassificationLoss
from vitrain.models.swin import check_window_fit
from vitrain.train import train

log = logging.getLogger("compare_vit_cnn")
PARTS = ("cost", "digits", "fraction", "resolution")
DIGITS_SIZE = 32  # the digits' 8x8 pixels upsampled to this, for every model


@dataclass(frozen=True)
class Arch:
    key: str
    label: str
    family: str  # "ViT" (transformers) or "CNN"
    config: str  # the model config group (configs/model/<config>.yaml)
    name: str  # model.name
    digits: tuple[str, ...] = ()  # overrides that fit the architecture to 32x32 inputs

    def overrides(self, img_size: int) -> list[str]:
        return [f"model={self.config}", f"model.name={self.name}", f"model.img_size={img_size}", "model.drop_path=0.0"]


ARCHS = {a.key: a for a in (
    Arch("vit_ti", "ViT-Ti/16", "ViT", "vit_tiny", "vit_tiny_patch16_224", ("+model.patch_size=8",)),
    Arch("vit_s", "ViT-S/16", "ViT", "vit_small", "vit_small_patch16_224", ("+model.patch_size=8",)),
    Arch("deit_ti", "DeiT-Ti distilled", "ViT", "deit_tiny", "deit_tiny_distilled_patch16_224",
         ("+model.patch_size=8",)),
    Arch("swin_t", "Swin-T", "ViT", "swin", "swin_tiny_patch4_window7_224", ("model.window_size=4",)),
    Arch("resnet18", "ResNet-18", "CNN", "timm", "resnet18"),
    Arch("resnet50", "ResNet-50", "CNN", "timm", "resnet50"),
    Arch("convnext_t", "ConvNeXt-T", "CNN", "timm", "convnext_tiny"),
)}
TEACHER = "resnet18"  # DeiT-Ti is hard-distilled from the ResNet-18 trained on the same images, same seed


def model_from_config(overrides: list[str], num_classes: int) -> nn.Module:
    """The model that `python -m vitrain.train <overrides>` would train (fresh weights)."""
    return build_model(to_config(compose(overrides)).model, num_classes)


def timed(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median wall seconds of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (the median resists
    bursts of load from other processes)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def forward_flops(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one forward pass by op, as torch's FlopCounterMode counts them: matmuls, convolutions and
    attention only (the CPU attention kernel included), two FLOPs per multiply-add (norms, activations and
    additions are not counted)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        model(x)
    return {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}


# ---------------------------------------------------------------------------------------------- cost
def measure_cost(arch: Arch, batch: int, warmup: int, iters: int) -> dict[str, Any]:
    """Parameters and GFLOPs at 224 (1,000 classes); fp32 img/s of inference and of a training step
    (forward, cross-entropy, backward, AdamW step) at batch ``batch``."""
    torch.manual_seed(0)
    model = model_from_config(arch.overrides(224), 1000)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    model.eval()
    with torch.no_grad():
        gflops = sum(forward_flops(model, x[:1]).values()) / 1e9
        infer = timed(lambda: model(x), warmup, iters)
    model.train()
    optimizer, criterion = torch.optim.AdamW(model.parameters(), lr=1e-4), ClassificationLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(x, model(x), y).backward()
        optimizer.step()

    step_seconds = timed(step, warmup, iters)
    return {"model": arch.key, "label": arch.label, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops_224": gflops, "infer_img_s": batch / infer, "train_img_s": batch / step_seconds,
            "batch": batch}


def run_cost(results: dict, archs: list[Arch], batch: int, warmup: int, iters: int, save: Callable) -> None:
    results["cost"] = {"batch": batch, "warmup": warmup, "iters": iters, "load_before": os.getloadavg(), "rows": []}
    for arch in archs:
        log.info("cost: %s", arch.label)
        results["cost"]["rows"].append(measure_cost(arch, batch, warmup, iters))
    results["cost"]["load_after"] = os.getloadavg()
    save()


# ------------------------------------------------------------------------------------- digits, fraction
def digits_overrides(arch: Arch, fraction: float, seed: int, epochs: int, teacher: Path | None) -> list[str]:
    """`python -m vitrain.train` overrides of one digits run; the recipe is the digits default for all."""
    overrides = [*arch.overrides(DIGITS_SIZE), *arch.digits, f"trainer.epochs={epochs}", f"seed={seed}",
                 f"data.train_fraction={fraction}", "trainer.progress=false"]
    if teacher is not None:
        teacher_arch = ARCHS[TEACHER]
        overrides += ["distill=hard", f"distill.teacher.source={compose(teacher_arch.overrides(32)).model.source}",
                      f"distill.teacher.name={teacher_arch.name}", f"distill.teacher.checkpoint={teacher}"]
    return overrides


def run_key(arch: Arch, fraction: float, seed: int, epochs: int) -> str:
    return f"{arch.key}/frac{fraction:g}/seed{seed}/ep{epochs}"


def train_digits(results: dict, arch: Arch, fraction: float, seed: int, epochs: int, runs: Path,
                 save: Callable) -> dict[str, Any]:
    """One digits run (skipped when the JSON has it); DeiT first gets its ResNet-18 teacher of the same
    images and seed. Checkpoints are deleted afterwards, except the teacher's best.pt."""
    key = run_key(arch, fraction, seed, epochs)
    if key in results["runs"]:
        return results["runs"][key]
    teacher = None
    if arch.key == "deit_ti":
        teacher = runs / run_key(ARCHS[TEACHER], fraction, seed, epochs) / "checkpoints" / "best.pt"
        if not teacher.is_file():
            results["runs"].pop(run_key(ARCHS[TEACHER], fraction, seed, epochs), None)
            train_digits(results, ARCHS[TEACHER], fraction, seed, epochs, runs, save)
    run_dir = runs / key
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = digits_overrides(arch, fraction, seed, epochs, teacher)
    log.info("train %s", key)
    metrics = train(compose(overrides), run_dir)
    (run_dir / "checkpoints" / "last.pt").unlink(missing_ok=True)
    if arch.key != TEACHER:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    results["runs"][key] = {
        "model": arch.key, "fraction": fraction, "seed": seed, "epochs": epochs, "steps": metrics["steps"],
        "final_top1": metrics["final_top1"], "best_top1": metrics["best_top1"],
        "val_top1_by_epoch": [row["val_top1"] for row in metrics["history"]],
        "train_img_s": metrics["train_images_per_sec"], "wall_s": metrics["wall_time_sec"],
        "command": "python -m vitrain.train " + " ".join(overrides) + f" hydra.run.dir={run_dir}",
    }
    save()
    return results["runs"][key]


def run_digits(results: dict, archs: list[Arch], fractions: list[float], seeds: list[int], epochs: int,
               runs: Path, save: Callable) -> None:
    """Every (fraction, seed, model) run, seed by seed so that a stopped run already covers every model."""
    order = sorted(archs, key=lambda a: (a.key != TEACHER, a.key == "deit_ti"))  # teacher first, student last
    for fraction in fractions:
        for seed in seeds:
            for arch in order:
                train_digits(results, arch, fraction, seed, epochs, runs, save)


# ------------------------------------------------------------------------------------------ resolution
@dataclass(frozen=True)
class Series:
    label: str
    config: str
    window_per_224: float | None = None  # Swin: aim for this window x size / 224 (0: always 7)
    math_sdpa: bool = False  # force PyTorch's unfused attention, which keeps the attention matrices


RESOLUTION_SERIES = (
    Series("ViT-S/16", "vit_small"),
    Series("ViT-S/16, unfused attention", "vit_small", math_sdpa=True),
    Series("Swin-T, window nearest 7", "swin", window_per_224=0),
    Series("Swin-T, window 7 x size/224", "swin", window_per_224=7),
)


def fit_window(img_size: int, target: float) -> int:
    """The Swin-T window nearest ``target`` that gives every stage whole windows at ``img_size``."""
    for window in sorted(range(2, img_size // 4 + 1), key=lambda k: (abs(k - target), k)):
        with contextlib.suppress(ConfigError):
            check_window_fit((img_size, img_size), 4, 4, window)
            return window
    raise ConfigError(f"no Swin-T window fits {img_size}x{img_size}")


class RecordAttention(TorchFunctionMode):
    """Records the shapes (and masks) of every F.scaled_dot_product_attention call inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Size, torch.Size, torch.Tensor | None, bool]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            mask = kwargs.get("attn_mask")
            self.calls.append((args[0].shape, args[1].shape, None if mask is None else mask.detach().clone(),
                               mask is not None and mask.requires_grad))
        return func(*args, **kwargs)


@contextlib.contextmanager
def saved_for_backward(exclude: nn.Module | None = None) -> Iterator[dict[int, int]]:
    """Bytes of the distinct storages autograd saves for the backward pass (storage pointer -> bytes),
    without ``exclude``'s parameters and buffers: the activations a training step must keep."""
    skip = {t.untyped_storage().data_ptr() for t in [*exclude.parameters(), *exclude.buffers()]} if exclude else set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def attention_alone(calls: list, warmup: int, iters: int) -> tuple[float, int]:
    """Forward+backward seconds and saved bytes of the recorded attention calls replayed on random
    q, k, v of the same shapes (and the same masks), with nothing else of the model."""
    inputs = [(torch.randn(q, requires_grad=True), torch.randn(k, requires_grad=True),
               torch.randn(k, requires_grad=True), None if m is None else m.clone().requires_grad_(grad))
              for q, k, m, grad in calls]

    def run() -> None:
        for q, k, v, m in inputs:
            F.scaled_dot_product_attention(q, k, v, attn_mask=m).sum().backward()

    with saved_for_backward() as seen:
        outs = [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for q, k, v, m in inputs]
    del outs
    return timed(run, warmup, iters), sum(seen.values())


def measure_resolution(series: Series, img_size: int, batch: int, warmup: int, iters: int) -> dict[str, Any]:
    """One model at one resolution, in training mode, fp32."""
    overrides = [f"model={series.config}", f"model.img_size={img_size}", "model.drop_path=0.0"]
    window = None
    if series.window_per_224 is not None:
        window = fit_window(img_size, series.window_per_224 * img_size / 224 if series.window_per_224 else 7)
        overrides.append(f"model.window_size={window}")
    torch.manual_seed(0)
    model = model_from_config(overrides, 1000).train()
    x = torch.randn(batch, 3, img_size, img_size)
    backend = sdpa_kernel(SDPBackend.MATH) if series.math_sdpa else contextlib.nullcontext()
    with backend:
        flops = forward_flops(model, x)
        with RecordAttention() as record:
            model(x)
        with saved_for_backward(model) as seen:
            out = model(x)
        del out
        seconds = timed(lambda: model(x).sum().backward(), warmup, iters)
        attn_seconds, attn_saved = attention_alone(record.calls, warmup, iters)
    attn_flops = sum(n for op, n in flops.items() if "scaled_dot_product" in op or "bmm" in op)
    matrices = [q[0] * q[1] * q[2] * k[2] * 4 for q, k, _, _ in record.calls]  # fp32 (B, heads, L, S) each
    return {
        "series": series.label, "img_size": img_size, "window": window, "overrides": overrides, "batch": batch,
        "tokens": model.patch_embed.num_patches + (0 if window else 1), "window_tokens": record.calls[0][0][2],
        "gflops_fwd": sum(flops.values()) / 1e9, "attn_gflops_fwd": attn_flops / 1e9,
        "fwd_bwd_ms": seconds * 1e3, "attn_fwd_bwd_ms": attn_seconds * 1e3,
        "saved_mib": sum(seen.values()) / 2**20, "attn_saved_mib": attn_saved / 2**20,
        "attn_matrix_mib_sum": sum(matrices) / 2**20, "attn_matrix_mib_max": max(matrices) / 2**20,
    }


def run_resolution(results: dict, sizes: list[int], batch: int, warmup: int, iters: int, save: Callable) -> None:
    results["resolution"] = {"sizes": sizes, "load_before": os.getloadavg(), "rows": []}
    for series in RESOLUTION_SERIES:
        for size in sizes:
            log.info("resolution: %s at %d", series.label, size)
            results["resolution"]["rows"].append(measure_resolution(series, size, batch, warmup, iters))
            save()


# ---------------------------------------------------------------------------------------------- report
def fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def cost_table(cost: dict) -> str:
    rows = [[r["label"], ARCHS[r["model"]].family, f"{r['params_m']:.2f}", f"{r['gflops_224']:.2f}",
             f"{r['infer_img_s']:.1f}", f"{r['train_img_s']:.1f}"] for r in cost["rows"]]
    return table(["model", "family", "params (M)", "GFLOPs at 224", f"inference img/s (batch {cost['batch']})",
                  f"training img/s (batch {cost['batch']})"], rows)


def runs_of(results: dict, arch: Arch, fraction: float, seeds: list[int], epochs: int) -> list[dict]:
    runs = (results["runs"].get(run_key(arch, fraction, s, epochs)) for s in seeds)
    return [r for r in runs if r is not None]


def digits_table(results: dict, archs: list[Arch], fraction: float, seeds: list[int], epochs: int) -> str:
    rows = []
    for arch in archs:
        runs, size = runs_of(results, arch, fraction, seeds, epochs), results["digits_models"].get(arch.key, {})
        rows.append([arch.label, ARCHS[arch.key].family, f"{size.get('params_m', float('nan')):.2f}",
                     f"{size.get('gflops', float('nan')):.3f}", fmt([r["final_top1"] for r in runs], 2),
                     fmt([r["best_top1"] for r in runs], 2), fmt([r["train_img_s"] for r in runs], 0),
                     fmt([r["wall_s"] for r in runs], 0), len(runs)])
    return table(["model (32x32)", "family", "params (M)", "GFLOPs", "top-1 final epoch", "top-1 best epoch",
                  "train img/s", "wall s per run", "seeds"], rows)


def fraction_table(results: dict, archs: list[Arch], fractions: list[float], seeds: list[int], epochs: int) -> str:
    header = ["model"] + [f"{f:.0%} ({round(1437 * f)} images)" for f in fractions]
    rows = [[a.label] + [fmt([r["final_top1"] for r in runs_of(results, a, f, seeds, epochs)]) for f in fractions]
            for a in archs]
    return table(header, rows)


def resolution_table(rows: list[dict]) -> str:
    return table(
        ["model", "image", "window", "tokens (stage 1)", "GFLOPs fwd", "attention GFLOPs fwd", "fwd+bwd ms",
         "attention alone fwd+bwd ms", "saved activations MiB", "attention alone saved MiB",
         "attention matrices MiB (sum / largest layer)"],
        [[r["series"], r["img_size"], r["window"] or "global", f"{r['tokens']} ({r['window_tokens']} per window)",
          f"{r['gflops_fwd']:.1f}", f"{r['attn_gflops_fwd']:.2f}", f"{r['fwd_bwd_ms']:.0f}",
          f"{r['attn_fwd_bwd_ms']:.0f}", f"{r['saved_mib']:.0f}", f"{r['attn_saved_mib']:.1f}",
          f"{r['attn_matrix_mib_sum']:.0f} / {r['attn_matrix_mib_max']:.1f}"] for r in rows])


# ----------------------------------------------------------------------------------------------- plots
def style(arch: Arch) -> dict[str, Any]:
    return {"linestyle": "-" if arch.family == "ViT" else "--", "marker": "o" if arch.family == "ViT" else "s"}


def plot_fraction(results: dict, archs: list[Arch], fractions: list[float], seeds: list[int], epochs: int,
                  path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arch in archs:
        points = [(f, [r["final_top1"] for r in runs_of(results, arch, f, seeds, epochs)]) for f in fractions]
        points = [(f, v) for f, v in points if v]
        if points:
            ax.errorbar([f * 100 for f, _ in points], [statistics.mean(v) for _, v in points],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in points], capsize=3,
                        label=arch.label, **style(arch))
    ax.set_xscale("log")
    ax.set_xticks([f * 100 for f in fractions], [f"{f:.0%}" for f in fractions])
    ax.set_xlabel(f"share of the 1,437 training images ({epochs} epochs at every share)")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title("Digits at 32x32: accuracy against training data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_digits_curves(results: dict, archs: list[Arch], fraction: float, seeds: list[int], epochs: int,
                       path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arch in archs:
        curves = [r["val_top1_by_epoch"] for r in runs_of(results, arch, fraction, seeds, epochs)]
        if curves:
            mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
            ax.plot(range(1, len(mean) + 1), mean, label=arch.label, **style(arch))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), mean over seeds")
    ax.set_title(f"Digits at 32x32, {fraction:.0%} of the training images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_resolution(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = (("fwd_bwd_ms", "attn_fwd_bwd_ms", "forward+backward ms (batch 1)"),
              ("saved_mib", "attn_matrix_mib_sum", "saved for backward, MiB"),
              ("gflops_fwd", "attn_gflops_fwd", "forward GFLOPs"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    series = list(dict.fromkeys(r["series"] for r in rows))
    colors = dict(zip(series, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, (whole, part, ylabel) in zip(axes, panels, strict=True):
        for name in series:
            rs = [r for r in rows if r["series"] == name]
            sizes = [r["img_size"] for r in rs]
            ax.plot(sizes, [r[whole] for r in rs], "-o", color=colors[name], label=f"{name}: whole model")
            ax.plot(sizes, [r[part] for r in rs], ":^", color=colors[name], label=f"{name}: attention")
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = sorted({r["img_size"] for r in rows})
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("image side (pixels; tokens grow with its square)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[1].set_title("dotted: attention matrices (B x heads x L x S x 4 bytes)", fontsize=9)
    axes[0].set_title("dotted: the attention call alone", fontsize=9)
    axes[2].set_title("dotted: attention matmuls (QK^T, AV)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, args: argparse.Namespace) -> None:
    """Print the tables of the parts present and redraw the plots."""
    archs = [ARCHS[k] for k in args.models]
    fraction_archs = [ARCHS[k] for k in args.fraction_models]
    args.images.mkdir(parents=True, exist_ok=True)
    if "cost" in results:
        print("\n## Cost at 224x224\n\n" + cost_table(results["cost"]))
    full = max(args.fractions)
    if any(runs_of(results, a, full, args.seeds, args.epochs) for a in archs):
        print(f"\n## Digits, {args.epochs} epochs\n\n" + digits_table(results, archs, full, args.seeds, args.epochs))
        plot_digits_curves(results, archs, full, args.seeds, args.epochs, args.images / "vit_vs_cnn_digits.png")
    if any(runs_of(results, a, f, args.seeds, args.epochs) for a in fraction_archs for f in args.fractions):
        print("\n## Top-1 against the share of training images\n\n"
              + fraction_table(results, fraction_archs, args.fractions, args.seeds, args.epochs))
        plot_fraction(results, fraction_archs, args.fractions, args.seeds, args.epochs,
                      args.images / "vit_vs_cnn_fraction.png")
    if results.get("resolution", {}).get("rows"):
        print("\n## Attention cost against resolution\n\n" + resolution_table(results["resolution"]["rows"]))
        plot_resolution(results["resolution"]["rows"], args.images / "vit_vs_cnn_resolution.png")


# ------------------------------------------------------------------------------------------------- main
QUICK = dict(models=["vit_ti", "deit_ti", "resnet18"], fraction_models=["vit_ti", "deit_ti", "resnet18"],
             cost_models=["vit_ti", "resnet18"], fractions=[0.05, 0.1], seeds=[0], epochs=1, sizes=[64, 96],
             batch=1, warmup=0, iters=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS), help="parts to (re-)run")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of every digits run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0],
                        help="shares of the training images; the digits part trains on the largest")
    parser.add_argument("--models", nargs="+", choices=list(ARCHS), default=list(ARCHS), help="digits part")
    parser.add_argument("--fraction-models", nargs="+", choices=list(ARCHS),
                        default=["vit_ti", "deit_ti", "swin_t", "resnet18", "convnext_t"])
    parser.add_argument("--cost-models", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--batch", type=int, default=8, help="batch of the throughput measurements")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--iters", type=int, default=5, help="timed calls (the median is reported)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512], help="resolution part")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny settings, seconds")
    parser.add_argument("--out", type=Path, default=Path("docs/vit_vs_cnn.json"))
    parser.add_argument("--images", type=Path, default=Path("docs/images"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/compare_vit_cnn"), help="training run folders")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("runs", {})
    results.setdefault("digits_models", {})
    results.setdefault("wall_s", {})
    results["machine"] = describe_machine(torch.device("cpu"))  # CPU, cores, threads, versions, load
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=1))

    for part in args.parts:
        start, load = time.perf_counter(), os.getloadavg()
        if part == "cost":
            run_cost(results, [ARCHS[k] for k in args.cost_models], args.batch, args.warmup, args.iters, save)
        elif part == "resolution":
            run_resolution(results, args.sizes, 1, min(args.warmup, 1), max(1, args.iters // 2 + 1), save)
        else:
            archs = args.models if part == "digits" else args.fraction_models
            fractions = [max(args.fractions)] if part == "digits" else args.fractions
            for key in archs:
                model = model_from_config(ARCHS[key].overrides(DIGITS_SIZE) + list(ARCHS[key].digits), 10).eval()
                with torch.no_grad():
                    gflops = sum(forward_flops(model, torch.randn(1, 3, DIGITS_SIZE, DIGITS_SIZE)).values()) / 1e9
                results["digits_models"][key] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                                                 "gflops": gflops}
            run_digits(results, [ARCHS[k] for k in archs], fractions, args.seeds, args.epochs, args.runs, save)
        results["wall_s"][part] = time.perf_counter() - start
        results.setdefault("load_at_start", {})[part] = load
        save()
    report(results, args)
    return results


if __name__ == "__main__":
    main()
