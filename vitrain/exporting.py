"""A trained checkpoint for serving and for other libraries: ONNX, ``torch.export``, a timm hub folder, safetensors.

Every format starts from :func:`vitrain.inference.load_trained`, on the CPU, in eval mode (a distilled DeiT then
averages its two heads, as at inference): the EMA weights when the checkpoint has them (``weights=auto``), LoRA
adapters merged into the weights. The formats that run the model (ONNX, ``torch.export``, timm) are checked after
writing: on random inputs of another batch size than the one traced, their logits must match PyTorch's within
``atol``, or the export fails with one line. The files carry the preprocessing and the class names (ONNX
``metadata_props``, the ``.pt2``'s ``vitrain.json``, the safetensors header, timm's ``config.json``).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitrain import __version__
from vitrain.errors import ConfigError, VitrainError, first_line, import_extra
from vitrain.inference import OnnxClassifier, TrainedModel, load_trained
from vitrain.models import DistilledVisionTransformer, SwinTransformer, VisionTransformer
from vitrain.schema import FORMATS, WEIGHTS  # noqa: F401

TRACE_BATCH, CHECK_BATCH = 2, 3  # the check runs another batch size than the trace: the batch axis is dynamic

# timm's model of each vitrain class, for a vitrain name that timm lacks (vit_nano_patch4_16, ...): the
# architecture arguments in config.json make it the same network
TIMM_BASES: dict[type, str] = {  # the subclass first
    DistilledVisionTransformer: "deit_tiny_distilled_patch16_224",
    VisionTransformer: "vit_tiny_patch16_224",
    SwinTransformer: "swin_tiny_patch4_window7_224",
}
# what an architecture's default pretrained_cfg says about timm's own weights, which are not the exported ones
NOT_OURS = ("tag", "license", "paper_ids", "paper_name", "origin_url", "notes")


@dataclass
class Exported:
    """What :func:`export_checkpoint` wrote: the file (a folder for timm), which weights, and the largest
    difference between its logits and PyTorch's (None for safetensors, which holds weights only)."""

    path: Path
    format: str
    weights: str  # "ema" or "raw"
    max_diff: float | None


def export_checkpoint(checkpoint: str | Path, format: str = "onnx", output: str | Path | None = None,
                      weights: str = "auto", opset: int = 18, atol: float = 1e-4) -> Exported:
    """Export a vitrain training checkpoint as ``format`` (one of :data:`FORMATS`) to ``output`` (default: beside
    the checkpoint, ``best.onnx``, ``best.pt2``, ``best_timm/``, ``best.safetensors``) and check it."""
    if format not in FORMATS:
        raise ConfigError(f"unknown format '{format}' (format); choose one of {', '.join(FORMATS)}")
    if format == "onnx":  # before the model is loaded and traced: a missing package is said at once
        import_extra("onnx", "format=onnx", "export")
        import_extra("onnxruntime", "format=onnx", "export")
    trained = load_trained(checkpoint, "cpu")
    use_ema = pick_weights(trained, weights, checkpoint)
    model = trained.merged(use_ema).eval()
    path = Path(output) if output else default_output(Path(checkpoint), format)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = export_metadata(trained, "ema" if use_ema else "raw")
    run = EXPORTERS[format](model, trained, path, metadata, opset)
    max_diff = None if run is None else check_logits(format, run, model, trained, path, atol)
    return Exported(path, format, metadata["weights"], max_diff)


def pick_weights(trained: TrainedModel, weights: str, checkpoint: str | Path) -> bool:
    """Whether to export the EMA weights: ``auto`` when the checkpoint has them, ``ema`` (which must be there)."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights}: choose one of {', '.join(WEIGHTS)}")
    if weights == "ema" and trained.ema is None:
        raise ConfigError(f"weights=ema: {checkpoint} has no EMA weights (trained without trainer.ema=true); "
                          f"use weights=raw")
    return trained.ema is not None and weights != "raw"


def default_output(checkpoint: Path, format: str) -> Path:
    """Where an export goes by default: beside the checkpoint, named after it."""
    if format == "timm":
        return checkpoint.with_name(checkpoint.stem + "_timm")
    return checkpoint.with_suffix({"onnx": ".onnx", "torch.export": ".pt2", "safetensors": ".safetensors"}[format])


def export_metadata(trained: TrainedModel, weights: str) -> dict[str, str]:
    """What every exported file carries, as strings: the model spec, the preprocessing (size, mean, std,
    interpolation, crop_pct, crop_mode: :func:`export_preprocess`), the class names, which weights, and vitrain's
    version."""
    return {"model_spec": json.dumps(trained.spec), "preprocess": json.dumps(export_preprocess(trained)),
            "class_names": json.dumps(trained.class_names), "weights": weights, "vitrain_version": __version__}


def example_input(trained: TrainedModel, batch: int) -> torch.Tensor:
    """A fixed batch of normalized-looking random images at the checkpoint's input size."""
    size = trained.preprocess["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def export_preprocess(trained: TrainedModel) -> dict[str, Any]:
    """The checkpoint's preprocessing with the crop written out, so an exported file says it on its own: a
    checkpoint without ``crop_pct`` (0.1.0's) ran no crop, one without ``crop_mode`` a center crop."""
    return {"crop_pct": 1.0, "crop_mode": "center", **trained.preprocess}


def input_description(pre: dict[str, Any]) -> str:
    """The eval transform of ``pre`` (:func:`export_preprocess`) in words, for a model card."""
    size, side = pre["img_size"], math.floor(pre["img_size"] / pre["crop_pct"])
    resize = {"center": f"the shorter side resized to {side}",
              "squash": f"resized to {side}x{side} (the aspect ratio not kept)",
              "border": f"the longer side resized to {side}, padded with the mean colour"}[pre["crop_mode"]]
    return (f"{size}x{size} RGB: {resize} with {pre['interpolation']} interpolation and center-cropped to {size} "
            f"(crop_mode {pre['crop_mode']}, crop_pct {pre['crop_pct']}), normalized with mean {pre['mean']} and "
            f"std {pre['std']}")


Run = Callable[[torch.Tensor], torch.Tensor]  # the exported model, called on a batch: (B, C, H, W) -> logits


@torch.no_grad()
def check_logits(format: str, run: Run, model: nn.Module, trained: TrainedModel, path: Path, atol: float) -> float:
    """The largest |exported - PyTorch| logit on :data:`CHECK_BATCH` images; above ``atol`` a one-line error."""
    x = example_input(trained, CHECK_BATCH)
    diff = (run(x).float() - model(x).float()).abs().max().item()
    if not diff <= atol:  # NaN fails too
        raise VitrainError(f"format={format}: the exported model's logits differ from PyTorch's by up to {diff:.2e} "
                           f"(atol={atol}); do not use {path}")
    return diff


def export_onnx(model: nn.Module, trained: TrainedModel, path: Path, metadata: dict[str, str], opset: int) -> Run:
    """An ONNX file with a dynamic batch axis (``image`` -> ``logits``) and ``metadata`` in its metadata_props,
    which ``python -m vitrain.predict checkpoint=FILE.onnx`` reads. TorchScript's exporter (``dynamo=False``)
    handles ViT, DeiT and Swin; torch 2.14's dynamo exporter fails on Swin's window attention."""
    onnx = import_extra("onnx", "format=onnx", "export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice; the tracer on the fixed image size
        try:
            torch.onnx.export(model, (example_input(trained, TRACE_BATCH),), str(path), input_names=["image"],
                              output_names=["logits"], opset_version=opset, dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        except (RuntimeError, ValueError) as e:
            if "opset" not in str(e).lower():
                raise
            raise ConfigError(f"opset={opset}: {first_line(e)}; choose one this torch exports (18, the default, "
                              f"works)") from e
    proto = onnx.load(str(path), load_external_data=False)  # a model over 2 GB keeps its weights beside
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    return OnnxClassifier(path)


def export_program(model: nn.Module, trained: TrainedModel, path: Path, metadata: dict[str, str], opset: int) -> Run:
    """A ``torch.export`` program (``.pt2``) with a dynamic batch axis; ``metadata`` as its ``vitrain.json``.
    ``torch.export.load(path).module()`` runs it."""
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(model, (example_input(trained, TRACE_BATCH),), dynamic_shapes=({0: batch},))
    except Exception as e:  # a model torch.export cannot trace with a free batch size
        raise VitrainError(f"torch.export could not trace {trained.spec['name']} with a dynamic batch axis "
                           f"({type(e).__name__}: {first_line(e)}); try format=onnx") from e
    torch.export.save(program, str(path), extra_files={"vitrain.json": json.dumps(metadata)})
    return torch.export.load(str(path)).module()


def export_safetensors(model: nn.Module, trained: TrainedModel, path: Path, metadata: dict[str, str],
                       opset: int) -> None:
    """The weights alone (LoRA merged) as safetensors, which load into ``create_model(**spec)`` by their names;
    ``metadata`` in the header."""
    safetensors = import_extra("safetensors.torch", "format=safetensors", "export")
    safetensors.save_model(model, str(path), metadata={"format": "pt", **metadata})


def export_timm(model: nn.Module, trained: TrainedModel, path: Path, metadata: dict[str, str], opset: int) -> Run:
    """A folder in timm's hub layout: ``config.json`` (architecture, ``model_args``, ``pretrained_cfg`` with the
    preprocessing, ``label_names``), ``model.safetensors`` and a model card, written by timm's ``save_for_hf``;
    ``timm.create_model("local-dir:FOLDER", pretrained=True)`` opens it."""
    import timm
    from timm.models import save_for_hf

    twin = timm_twin(model, trained.spec)
    pre = export_preprocess(trained)
    data_config = {"input_size": (3, pre["img_size"], pre["img_size"]), "mean": tuple(pre["mean"]),
                   "std": tuple(pre["std"]), "interpolation": pre["interpolation"], "crop_pct": pre["crop_pct"],
                   "crop_mode": pre["crop_mode"]}
    save_for_hf(twin, str(path), model_config={"label_names": trained.class_names}, safe_serialization=True,
                data_config=data_config)
    config = json.loads((path / "config.json").read_text())
    config["pretrained_cfg"] = {k: v for k, v in config["pretrained_cfg"].items() if k not in NOT_OURS}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "README.md").write_text(model_card(config, trained, metadata["weights"], path))
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


def timm_twin(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """timm's model with ``model``'s architecture and weights (``model`` itself when it is one of timm's)."""
    import timm

    if spec["source"] == "timm":
        return model
    if spec["source"] != "vitrain":
        raise ConfigError(f"format=timm takes vitrain's and timm's models; {spec['name']} is {spec['source']}'s: "
                          f"export format=onnx, torch.export or safetensors")
    name, args = timm_arguments(model, spec["name"])
    twin = timm.create_model(name, **args)
    twin.load_state_dict(model.state_dict())  # strict: every tensor has its place under timm's names
    return twin.eval()


def timm_arguments(model: nn.Module, name: str) -> tuple[str, dict[str, Any]]:
    """(timm's architecture name, its constructor arguments) that rebuild ``model``: ``name`` when timm has it,
    else the base of the model's class (:data:`TIMM_BASES`), with the sizes read off the model itself."""
    import timm

    if isinstance(model, SwinTransformer):
        stages = list(model.layers)
        block = stages[0].blocks[0]
        args = {"window_size": _side(block.attn.window_size), "depths": [len(s.blocks) for s in stages],
                "num_heads": [s.blocks[0].attn.num_heads for s in stages]}
    elif isinstance(model, VisionTransformer):
        block = model.blocks[0]
        args = {"depth": len(model.blocks), "num_heads": block.attn.num_heads, "global_pool": model.global_pool}
    else:
        raise ConfigError(f"format=timm has no timm architecture for {type(model).__name__}; try format=onnx")
    fc1 = block.mlp.fc1
    args |= {"num_classes": model.num_classes, "img_size": _side(model.patch_embed.img_size),
             "patch_size": _side(model.patch_embed.patch_size), "embed_dim": model.embed_dim,
             "mlp_ratio": fc1.out_features / fc1.in_features, "qkv_bias": block.attn.qkv.bias is not None}
    base = next(base for cls, base in TIMM_BASES.items() if isinstance(model, cls))
    return (name if timm.is_model(name) else base), args


def _side(size: tuple[int, int]) -> int | list[int]:
    return size[0] if size[0] == size[1] else list(size)


def model_card(config: dict[str, Any], trained: TrainedModel, weights: str, path: Path) -> str:
    """The folder's README.md: timm's front matter, what the model is, and how to load and run it."""
    pre, names = export_preprocess(trained), trained.class_names
    data = trained.data.name if trained.data is not None else "unknown"
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"""---
tags:
- image-classification
- timm
- vitrain
library_name: timm
pipeline_tag: image-classification
---
# {path.name}

An image classifier trained with vitrain {__version__}: vitrain's
`{trained.spec['name']}` as timm's `{config['architecture']}` (the sizes in `config.json`'s `model_args`),
trained on `{data}`; {"the EMA weights" if weights == "ema" else "the raw weights (no EMA)"}.

- **Classes ({len(names)}):** {shown}
- **Input:** {input_description(pre)}

## Usage

```python
import timm
import torch
from PIL import Image, ImageOps

model = timm.create_model("local-dir:{path.name}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
with torch.no_grad():
    image = ImageOps.exif_transpose(Image.open("image.jpg")).convert("RGB")  # upright, as vitrain trained on it
    probs = model(transform(image)[None]).softmax(dim=1)
print(model.pretrained_cfg["label_names"][probs.argmax().item()])
```
"""


EXPORTERS: dict[str, Callable[..., Run | None]] = {"onnx": export_onnx, "torch.export": export_program,
                                                   "timm": export_timm, "safetensors": export_safetensors}
