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
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import DataLoader

from vitrain.checkpoint import load_checkpoint
from vitrain.config import CONFIG_DIR
from vitrain.errors import ConfigError, VitrainError

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


def confusion_image(confusion: list[list[int]], cell: int = 24) -> Image.Image:
    """The row-normalised confusion matrix as a heatmap (white 0 to dark blue 1), counts written in."""
    m = np.asarray(confusion, dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(m)
    image = Image.new("RGB", (n * cell, n * cell), "white")
    draw = ImageDraw.Draw(image)
    for i in range(n):
        for j in range(n):
            shade = share[i, j]
            colour = tuple(int(255 - shade * (255 - c)) for c in (8, 48, 107))
            draw.rectangle([j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1], fill=colour)
            if m[i, j]:
                draw.text((j * cell + 3, i * cell + 6), str(int(m[i, j])), fill="white" if shade > 0.5 else "black")
    return image


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
    picture = confusion_image(result["model"]["confusion"])
    picture.save(output.with_suffix(".png"))
    with SummaryWriter(str(checkpoint.parent.parent / "tb")) as writer:
        writer.add_image(f"eval/{checkpoint.stem}_confusion", np.asarray(picture), dataformats="HWC")
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
