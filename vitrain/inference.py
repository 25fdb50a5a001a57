"""A trained vitrain checkpoint as plain Python objects, for evaluate, predict, visualize and export.

The model is rebuilt from the checkpoint's ``model_spec`` and the evaluation transform from its
``preprocess`` (see :mod:`vitrain.checkpoint`), so loading depends neither on Hydra nor on the YAML
layout; checkpoints written by vitrain 0.1.0 load too. An ONNX file written by ``python -m vitrain.export``
loads as well (:func:`load_onnx`): onnxruntime runs it, and its metadata gives the transform and the classes.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from vitrain.checkpoint import load_training_checkpoint
from vitrain.data.config import DataConfig
from vitrain.data.transforms import build_transforms
from vitrain.distributed import resolve_device
from vitrain.errors import ConfigError, VitrainError, first_line, import_extra
from vitrain.models import create_model


@dataclass
class TrainedModel:
    """A checkpoint's model (in eval mode on ``device``), its EMA twin when saved, the evaluation transform
    (PIL image or uint8 tensor -> normalized float tensor), the class names and what else the file holds."""

    model: nn.Module
    ema: nn.Module | None
    transform: v2.Compose
    class_names: list[str]
    spec: dict[str, Any]
    preprocess: dict[str, Any]
    data: DataConfig | None  # the data the model was trained on (None when unknown)
    device: torch.device
    lora: dict[str, Any] | None = None  # model.lora of a run with LoRA adapters (None: without)
    trained_size: int | None = None  # the size it trained at, where it is evaluated at another (None: the same)

    def pick(self, use_ema: bool) -> nn.Module:
        """The EMA weights when asked for and present, else the raw ones."""
        return self.ema if use_ema and self.ema is not None else self.model

    def merged(self, use_ema: bool = False) -> nn.Module:
        """:meth:`pick`'s model as a plain one: LoRA adapters merged into a copy of its weights, so that its
        state dict loads into ``create_model(**spec)`` (and into timm's model of a timm-named ViT). The
        model itself when trained without LoRA."""
        model = self.pick(use_ema)
        if not self.lora:
            return model
        from vitrain.lora import merge_lora

        return merge_lora(model).eval()


def eval_transform(preprocess: dict[str, Any]) -> v2.Compose:
    """The evaluation transform that a checkpoint's ``preprocess`` (or an exported file's) describes; without
    ``crop_pct`` (0.1.0's checkpoints) no crop, without ``crop_mode`` (before it was recorded) center: as they ran."""
    return build_transforms(preprocess["img_size"], preprocess["mean"], preprocess["std"], train=False,
                            interpolation=preprocess["interpolation"], crop_pct=preprocess.get("crop_pct", 1.0),
                            crop_mode=preprocess.get("crop_mode", "center"))


def data_as_trained(data: DataConfig, preprocess: dict[str, Any]) -> DataConfig:
    """``data`` preprocessed as a checkpoint's ``preprocess`` says (:func:`eval_transform`'s normalization, resize
    and crop, whatever the data group says), read one image at a time: no cache, no device decoding."""
    return replace(data, mean=preprocess["mean"], std=preprocess["std"], interpolation=preprocess["interpolation"],
                   crop_pct=preprocess.get("crop_pct", 1.0), crop_mode=preprocess.get("crop_mode", "center"),
                   cache=False, decode="cpu")


def load_trained(checkpoint: str | Path, device: str | torch.device = "auto",
                 img_size: int | str | None = None) -> TrainedModel:
    """Load a vitrain training checkpoint (``best.pt``, ``last.pt``) for inference. A run with LoRA
    (``model.lora.rank`` > 0 in its config) gets its adapters back, as they trained
    (:meth:`TrainedModel.merged`: the plain model). ``img_size``: the size it trained at (None), ``test`` (the
    test size its weights' source gives, timm's ``test_input_size``), or a number: the model is rebuilt at that
    size and its position tables resampled, and the transform resizes to it."""
    device = resolve_device(device, key="device") if isinstance(device, str) else device
    state = load_training_checkpoint(checkpoint)
    lora = ((state.get("config") or {}).get("model") or {}).get("lora")
    lora = dict(lora) if lora and lora.get("rank", 0) > 0 else None
    spec, preprocess = dict(state["model_spec"]), dict(state["preprocess"])
    size, trained_size = eval_size(preprocess, img_size, checkpoint), preprocess["img_size"]
    resample = size != trained_size
    if resample and lora is not None:
        raise ConfigError(f"{checkpoint} trained LoRA adapters at {preprocess['img_size']}; evaluate it at that size "
                          f"(img_size=null)")
    spec["img_size"], preprocess["img_size"] = size, size
    models = []
    for key in ("model", "model_ema"):
        if key in state:
            try:
                model = create_model(**spec)
            except ConfigError as e:  # a size the patches or windows do not divide: this command's key is img_size
                raise ConfigError(str(e).replace("model.img_size", "img_size")) from None
            if lora is not None:
                from vitrain.lora import apply_lora
                from vitrain.models.config import LoraSpec

                model = apply_lora(model, LoraSpec(**{**lora, "targets": list(lora["targets"])}))
            if resample:  # position embedding (Swin: relative position tables) to the new grid
                from vitrain.models.convert import load_pretrained

                load_pretrained(model, state[key])
            else:
                model.load_state_dict(state[key])
            models.append(model.to(device).eval())
    return TrainedModel(models[0], models[1] if len(models) > 1 else None, eval_transform(preprocess),
                        list(state["class_names"]), spec, preprocess, _data_config(state.get("data_config")), device,
                        lora, trained_size if resample else None)


def eval_size(preprocess: dict[str, Any], img_size: int | str | None, checkpoint: str | Path) -> int:
    """The size to evaluate a checkpoint at: its training size (None), its weights' test size (``test``, timm's
    ``test_input_size``, which the checkpoint records), or a given number."""
    if img_size is None:
        return int(preprocess["img_size"])
    if img_size == "test":
        if "test_img_size" not in preprocess:
            raise ConfigError(f"{checkpoint} records no test size (its starting weights gave none: timm's "
                              f"test_input_size); set img_size=N, or img_size=null for its {preprocess['img_size']}")
        return int(preprocess["test_img_size"])
    if isinstance(img_size, str) or int(img_size) <= 0:
        raise ConfigError(f"img_size must be null (the training size), test, or a positive number, got {img_size}")
    return int(img_size)


def _data_config(saved: dict[str, Any] | None) -> DataConfig | None:
    """The saved data config as a :class:`DataConfig`, keeping only the keys it knows."""
    if saved is None:
        return None
    known = DataConfig.__dataclass_fields__
    return DataConfig(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in saved.items() if k in known})


class OnnxClassifier(nn.Module):
    """An ONNX file run by onnxruntime, called as the PyTorch model it was exported from: (B, C, H, W) -> logits."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        super().__init__()
        ort = import_extra("onnxruntime", "running an ONNX model", "export")
        cuda = device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        if not Path(path).is_file():
            raise VitrainError(f"{path} does not exist; check the path")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime's own errors, for a file that is not ONNX
            raise VitrainError(f"cannot load {path} as an ONNX model: {first_line(e)}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {self.input_name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)


def load_onnx(path: str | Path, device: str = "auto") -> TrainedModel:
    """An ONNX file from ``python -m vitrain.export format=onnx`` as a :class:`TrainedModel` (no EMA twin: the
    file holds the weights chosen at export), its transform and class names from the file's metadata."""
    model = OnnxClassifier(path, device)
    missing = [k for k in ("model_spec", "preprocess", "class_names") if k not in model.metadata]
    if missing:
        raise VitrainError(f"{path} lacks vitrain's metadata ({', '.join(missing)}); export it with "
                           f"python -m vitrain.export format=onnx")
    spec, preprocess, names = (json.loads(model.metadata[k]) for k in ("model_spec", "preprocess", "class_names"))
    return TrainedModel(model, None, eval_transform(preprocess), names, spec, preprocess, None, torch.device("cpu"))


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of a checkpoint in ``<run>/checkpoints/``, else the checkpoint's own folder: where predict
    and visualize write what they make."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_for_inference(path: str | Path, device: str = "auto") -> TrainedModel:
    """A training checkpoint (:func:`load_trained`) or, for a ``.onnx`` file, an exported model (:func:`load_onnx`)."""
    return load_onnx(path, device) if Path(path).suffix == ".onnx" else load_trained(path, device)


def data_label(data: DataConfig) -> tuple[str, str | None]:
    """(label, source) of the data evaluated on: the source is where it is read from (``data.root``, the
    validation file list, ``data.path``, the validation shards; None for digits), the label its name and the last
    part of that place, as a file name may hold it (``imagefolder-photos``)."""
    source = {"filelist": data.val_list or data.train_list, "hf": data.path,
              "webdataset": data.val_shards}.get(data.name, data.root)
    if not source:
        return data.name, None
    place = Path(str(source).rstrip("/"))
    stem = place.name if data.name in ("imagefolder", "cifar10", "cifar100", "hf") else place.stem
    return f"{data.name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem).strip('_.') or 'data'}", str(source)


def refuse_other_data(output: Path, source: str | None) -> None:
    """A one-line error when ``output`` holds the evaluation of another data set with the same label (two
    folders of one name): it would be overwritten."""
    try:
        earlier = json.loads(output.read_text()).get("data_source", source)
    except (OSError, ValueError, AttributeError):  # none yet, or not an evaluation
        return
    if earlier != source:
        raise ConfigError(f"{output} holds the evaluation on {earlier}, another data set; give output=... to keep "
                          f"both, or remove it")


def write_predictions(results: list[dict[str, Any]], output: Path, fmt: str, checkpoint: str | Path,
                      trained: Any) -> None:
    """JSON: the checkpoint, its preprocessing and class names, and the predictions; CSV: a row per image."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        k = max((len(r["top"]) for r in results), default=0)
        with open(output, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *(f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "probability"))])
            for r in results:
                writer.writerow([r["image"], *(v for t in r["top"] for v in (t["class"], f"{t['probability']:.6f}"))])
        return
    output.write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve()), "preprocess": trained.preprocess,
                                  "class_names": list(trained.class_names), "predictions": results}, indent=2))
