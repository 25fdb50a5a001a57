"""``python -m vitrain.predict checkpoint=PATH inputs=<image or folder>``: top-k classes of images.

The preprocessing is the evaluation transform of the checkpoint's own config (resize, center crop,
normalisation), and the labels are the class names stored in the checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image

from vitrain.config import CONFIG_DIR
from vitrain.errors import DataError, VitrainError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_files(inputs: str | Path) -> list[Path]:
    """One image, or every image in a folder (recursively, sorted)."""
    path = Path(inputs)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise DataError(f"no images at inputs={inputs}; give an image file or a folder of images")
    return files


@torch.no_grad()
def predict(checkpoint: str | Path, inputs: str | Path, topk: int = 5, device: str = "auto",
            use_ema: bool = False) -> list[dict[str, Any]]:
    """For every image: the ``topk`` (class name, probability) pairs, most likely first."""
    from vitrain.data.transforms import build_transforms
    from vitrain.evaluate import load_trained
    from vitrain.trainer import resolve_device

    dev = resolve_device(device)
    model, ema, cfg, state = load_trained(checkpoint, dev)
    model = ema if use_ema and ema is not None else model
    d = cfg.data
    transform = build_transforms(cfg.model.img_size, d.mean, d.std, train=False, interpolation=d.interpolation)
    names = state["class_names"]
    results = []
    for path in image_files(inputs):
        try:
            with Image.open(path) as image:
                x = transform(image.convert("RGB"))
        except OSError as e:
            raise DataError(f"cannot read image {path} ({type(e).__name__}); remove or replace the file") from e
        probs = model(x[None].to(dev)).float().softmax(dim=1)[0].cpu()
        values, indices = probs.topk(min(topk, len(names)))
        results.append({"image": str(path), "top": [{"class": names[i], "index": int(i), "probability": float(p)}
                                                      for p, i in zip(values, indices, strict=True)]})
    return results


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Print a table and write predictions.json into the run folder (or ``output``)."""
    try:
        results = predict(cfg.checkpoint, cfg.inputs, cfg.topk, cfg.device, cfg.ema)
    except VitrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    output = Path(cfg.output or Path(HydraConfig.get().runtime.output_dir) / "predictions.json")
    output.write_text(json.dumps(results, indent=2))
    for r in results:
        best = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
        print(f"{r['image']}: {best}")
    print(f"({len(results)} images; {output})")


if __name__ == "__main__":
    main()
