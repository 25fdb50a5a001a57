"""``python -m vitrain.predict checkpoint=PATH inputs=<image or folder>``: top-k classes of images.

The preprocessing is the evaluation transform saved with the checkpoint (resize and crop of its crop_mode,
normalisation), and the labels are the class names stored in it. ``checkpoint`` may also be an ONNX file
from ``python -m vitrain.export format=onnx``: onnxruntime runs it, preprocessed as its metadata says. Each image is
turned upright as its EXIF orientation says, as in training. The file goes where ``output`` says, or to
``<run>/predictions/<inputs name>.<checkpoint name>.json`` (``.csv``) beside the checkpoint's run folder, so that
predictions of the same images by ``best.pt`` and ``best.onnx`` keep their own files. The JSON records the
checkpoint, its preprocessing and class names beside the predictions; ``format=csv`` writes one row per image
(``image,class_1,probability_1,...``), as timm's inference script does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vitrain.cli import check_override_keys, entry_point, run_command
from vitrain.config import CONFIG_DIR, PredictConfig, to_config
from vitrain.errors import DataError

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


def predict(checkpoint: str | Path, inputs: str | Path, topk: int = 5, device: str = "auto",
            use_ema: bool = False) -> list[dict[str, Any]]:
    """For every image: the ``topk`` (class name, probability) pairs, most likely first. ``checkpoint``: a
    training checkpoint or an exported ``.onnx`` file (which holds one set of weights: ``use_ema`` is moot)."""
    from vitrain.inference import load_for_inference

    return predict_with(load_for_inference(checkpoint, device), inputs, topk, use_ema)


def predict_with(trained: Any, inputs: str | Path, topk: int = 5, use_ema: bool = False) -> list[dict[str, Any]]:
    """:func:`predict` with a loaded model (:func:`vitrain.inference.load_for_inference`)."""
    import torch

    from vitrain.data.datasets import open_rgb

    model, names = trained.pick(use_ema), trained.class_names
    results = []
    for path in image_files(inputs):
        x = trained.transform(open_rgb(path))
        with torch.no_grad():
            probs = model(x[None].to(trained.device)).float().softmax(dim=1)[0].cpu()
        values, indices = probs.topk(min(topk, len(names)))
        results.append({"image": str(path), "top": [{"class": names[i], "index": int(i), "probability": float(p)}
                                                      for p, i in zip(values, indices, strict=True)]})
    return results


def default_output(checkpoint: str | Path, inputs: str | Path, fmt: str = "json") -> Path:
    """``<run>/predictions/<inputs name>.<checkpoint name>.<fmt>``: beside the checkpoint's run folder, as
    visualize's figures; named after the checkpoint too, so that ``best.pt`` and ``best.onnx`` keep their own."""
    from vitrain.inference import run_folder

    inputs = Path(inputs).resolve()
    name = inputs.stem if inputs.is_file() else inputs.name
    return run_folder(checkpoint) / "predictions" / f"{name}.{Path(checkpoint).name}.{fmt}"


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    """Print a table and write the predictions as JSON (``output``, or :func:`default_output`)."""

    def run() -> None:
        c = to_config(cfg, PredictConfig)
        from vitrain.inference import load_for_inference, write_predictions  # torch: once the values have passed

        trained = load_for_inference(c.checkpoint, c.device)
        results = predict_with(trained, c.inputs, c.topk, c.ema)
        output = Path(c.output) if c.output else default_output(c.checkpoint, c.inputs, c.format)
        write_predictions(results, output, c.format, c.checkpoint, trained)
        for r in results:
            print(f"{r['image']}: " + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"]))
        print(f"({len(results)} images; {output})")

    run_command(run)


@entry_point
def main() -> None:
    """``python -m vitrain.predict``: a misspelt key is one line naming the nearest keys; then the Hydra app."""
    check_override_keys(sys.argv[1:], PredictConfig, CONFIG_DIR, groups=())
    hydra_main()


if __name__ == "__main__":
    main()
