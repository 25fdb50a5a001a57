"""``python -m vitrain.evaluate checkpoint=PATH [data=...]``: score a trained checkpoint.

Top-1/top-5, per-class accuracy, the confusion matrix (JSON, PNG and TensorBoard) and inference
throughput, for the raw weights and the EMA weights when the checkpoint has them. The model and the
evaluation transform are rebuilt from the config saved in the checkpoint; ``data=...`` evaluates on
another data set with the same classes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from vitrain.checkpoint import load_checkpoint
from vitrain.config import CONFIG_DIR
from vitrain.errors import ConfigError, VitrainError
from vitrain.visualize import figure_to_array

log = logging.getLogger(__name__)


def load_trained(checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, nn.Module | None, DictConfig, dict]:
    """The model of a vitrain checkpoint (and its EMA twin when saved), its training config and the file."""
    from vitrain.train import build_model

    state = load_checkpoint(checkpoint, map_location="cpu")
    if "config" not in state or "class_names" not in state:
        raise ConfigError(f"{checkpoint} is not a vitrain training checkpoint (no config); give a run's best.pt")
    cfg = OmegaConf.create(state["config"])
    fresh = OmegaConf.merge(cfg.model, {"pretrained": False, "checkpoint": None, "reset_head": False})
    models = []
    for key in ("model", "model_ema"):
        if key in state:
            model = build_model(fresh, len(state["class_names"]))
            model.load_state_dict(state[key])
            models.append(model.to(device).eval())
    return models[0], (models[1] if len(models) > 1 else None), cfg, state


@torch.no_grad()
def score(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> dict[str, Any]:
    """Top-1, top-5 (percent), per-class accuracy, confusion matrix (rows: true, columns: predicted)
    and images per second of the forward passes."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    top5_hits, total, seconds = 0, 0, 0.0
    for images, labels in loader:
        images = images.to(device)
        start = time.perf_counter()
        logits = model(images).float().cpu()
        seconds += time.perf_counter() - start
        k = min(5, num_classes)
        top5_hits += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes)
        total += len(labels)
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1) * 100).tolist()
    return {"top1": 100.0 * confusion.diag().sum().item() / total, "top5": 100.0 * top5_hits / total,
            "per_class_top1": per_class, "confusion": confusion.tolist(), "images": total,
            "images_per_sec": total / max(seconds, 1e-9)}


def confusion_figure(confusion: list[list[int]], class_names: list[str], title: str) -> Figure:
    """The row-normalised confusion matrix as a heatmap (white 0 to dark blue 1), rows the true class and
    columns the predicted one, with the counts written in (up to 20 classes) and the class names as ticks
    (up to 40)."""
    m = np.asarray(confusion, dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(m)
    side = min(12.0, 2.0 + 0.35 * n)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = figure.add_subplot()
    shown = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=ax, shrink=0.8, label="share of the true class")
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90 if max(map(len, class_names)) > 2 else 0)
        ax.set_yticks(range(n), class_names)
    if n <= 20:
        for i, j in zip(*np.nonzero(m), strict=True):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    return figure


def evaluate_checkpoint(checkpoint: str | Path, data: DictConfig | None = None, batch_size: int = 256,
                        device: str = "auto", output: str | Path | None = None) -> dict[str, Any]:
    """Score a checkpoint on its validation set (or ``data``) and write JSON and PNG beside it."""
    from torch.utils.tensorboard import SummaryWriter

    from vitrain.data import build_loaders
    from vitrain.train import build_data
    from vitrain.trainer import resolve_device

    checkpoint = Path(checkpoint)
    dev = resolve_device(device)
    model, ema, cfg, state = load_trained(checkpoint, dev)
    data_cfg = OmegaConf.merge(cfg.data, data) if data is not None else cfg.data
    splits = build_data(data_cfg, cfg.model.img_size)
    if splits.class_names != state["class_names"]:
        raise ConfigError(f"the data's classes {splits.class_names[:5]}... differ from the checkpoint's "
                          f"{state['class_names'][:5]}...; evaluate on data with the same classes")
    loader = build_loaders(splits, batch_size, int(data_cfg.num_workers))[1]
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "data": data_cfg.name, "class_names": splits.class_names,
                              "model": score(model, loader, splits.num_classes, dev)}
    if ema is not None:
        result["model_ema"] = score(ema, loader, splits.num_classes, dev)
    output = Path(output) if output else checkpoint.with_name(f"eval_{checkpoint.stem}.json")
    output.write_text(json.dumps(result, indent=2))
    title = f"{cfg.model.name} on {data_cfg.name}: top-1 {result['model']['top1']:.2f}%"
    figure = confusion_figure(result["model"]["confusion"], splits.class_names, title)
    figure.savefig(output.with_suffix(".png"), dpi=120)
    with SummaryWriter(str(checkpoint.parent.parent / "tb")) as writer:
        writer.add_image(f"eval/{checkpoint.stem}_confusion", figure_to_array(figure), dataformats="HWC")
        writer.add_scalar(f"eval/{checkpoint.stem}_top1", result["model"]["top1"])
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> float:
    """Print a short report; the JSON beside the checkpoint has everything."""
    try:
        result = evaluate_checkpoint(cfg.checkpoint, cfg.get("data"), cfg.batch_size, cfg.device, cfg.output)
    except VitrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for key in ("model", "model_ema"):
        if key in result:
            r = result[key]
            print(f"{key:9s} top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  {r['images_per_sec']:.0f} img/s  "
                  f"({r['images']} images of {result['data']})")
    return result["model"]["top1"]


if __name__ == "__main__":
    main()
