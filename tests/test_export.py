"""vitrain.export: ONNX, torch.export, timm's hub folder and safetensors from a training checkpoint, each checked
against the PyTorch model; predict on an exported ONNX file; the one-line errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrain.build import build_model, checkpoint_metadata
from vitrain.checkpoint import save_checkpoint
from vitrain.cli import error_message
from vitrain.config import ExportConfig, compose, to_config
from vitrain.errors import ConfigError, VitrainError
from vitrain.exporting import export_checkpoint
from vitrain.inference import load_onnx, load_trained
from vitrain.models import create_model
from vitrain.predict import predict

CLASSES = [f"class_{i}" for i in range(5)]
FAMILIES = {  # model group -> timm architecture of config.json (timm has no nano sizes: its tiny, resized)
    "vit_nano": "vit_tiny_patch16_224",
    "deit_nano": "deit_tiny_distilled_patch16_224",
    "swin_nano": "swin_tiny_patch4_window7_224",
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every parameter (LoRA's zero B included), so that the logits are O(1) and the weights distinct."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def make_checkpoint(folder: Path, overrides: list[str], ema: bool = True) -> Path:
    """A best.pt as a training run writes it (model spec, preprocessing, class names, config), random weights;
    the EMA weights differ from the raw ones."""
    cfg = to_config(compose(overrides))
    torch.manual_seed(0)
    model = randomize(build_model(cfg.model, len(CLASSES)), seed=1)
    state = {**checkpoint_metadata(cfg, CLASSES, 32, 1), "model": model.state_dict(), "vitrain_version": "0.2.0"}
    if ema:
        state["model_ema"] = randomize(copy.deepcopy(model), seed=2).state_dict()
    return save_checkpoint(state, folder / "checkpoints" / "best.pt")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {group: make_checkpoint(root / group, [f"model={group}"]) for group in FAMILIES}


def images(size: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("group", list(FAMILIES))
def test_onnx_gives_pytorchs_logits_at_any_batch_size(checkpoints: dict[str, Path], group: str) -> None:
    import onnxruntime as ort

    result = export_checkpoint(checkpoints[group], "onnx")
    assert result.path == checkpoints[group].with_suffix(".onnx") and result.weights == "ema"
    assert result.max_diff <= 1e-4
    trained = load_trained(checkpoints[group], "cpu")
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    size = trained.preprocess["img_size"]
    for n in (1, 5):  # the batch axis is dynamic (traced at 2)
        x = images(size, n)
        logits = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(logits - trained.ema(x).numpy()).max() <= 1e-4  # DeiT: both heads averaged
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == CLASSES and json.loads(meta["preprocess"]) == trained.preprocess
    assert meta["weights"] == "ema" and json.loads(meta["model_spec"])["name"] == trained.spec["name"]


@pytest.mark.parametrize("group", list(FAMILIES))
def test_timm_folder_opens_in_timm_with_vitrains_logits(checkpoints: dict[str, Path], group: str) -> None:
    import timm

    result = export_checkpoint(checkpoints[group], "timm", weights="raw")
    folder = result.path
    assert folder.name == "best_timm" and result.weights == "raw"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    trained = load_trained(checkpoints[group], "cpu")
    pre = trained.preprocess
    assert config["architecture"] == FAMILIES[group] and config["label_names"] == CLASSES
    assert config["model_args"]["num_classes"] == 5 and config["model_args"]["embed_dim"] == trained.model.embed_dim
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, pre["img_size"], pre["img_size"]] and cfg["mean"] == pre["mean"]
    assert (cfg["std"], cfg["crop_pct"], cfg["interpolation"]) == (pre["std"], pre["crop_pct"], pre["interpolation"])
    assert "tag" not in cfg and "license" not in cfg  # the base architecture's ImageNet weights are not these
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = images(pre["img_size"], 3)
    with torch.no_grad():
        assert (model(x) - trained.model(x)).abs().max() <= 1e-5
    assert model.pretrained_cfg["label_names"] == CLASSES
    assert f'timm.create_model("local-dir:{folder.name}", pretrained=True)' in (folder / "README.md").read_text()


def test_timm_named_vit_keeps_its_name_with_other_sizes(tmp_path: Path) -> None:
    import timm

    checkpoint = make_checkpoint(tmp_path, ["model=vit_tiny", "model.img_size=32", "+model.depth=2"], ema=False)
    folder = export_checkpoint(checkpoint, "timm", output=tmp_path / "hub").path
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"]["depth"] == 2
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = images(32, 2)
    with torch.no_grad():
        assert (model(x) - load_trained(checkpoint, "cpu").model(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("group", ["deit_nano", "swin_nano"])
def test_torch_export_program_has_a_dynamic_batch(checkpoints: dict[str, Path], group: str) -> None:
    result = export_checkpoint(checkpoints[group], "torch.export")
    assert result.path.suffix == ".pt2" and result.max_diff <= 1e-4
    extra = {"vitrain.json": ""}
    program = torch.export.load(str(result.path), extra_files=extra).module()
    trained = load_trained(checkpoints[group], "cpu")
    for n in (1, 4):
        x = images(trained.preprocess["img_size"], n)
        with torch.no_grad():
            assert (program(x) - trained.ema(x)).abs().max() <= 1e-5
    assert json.loads(json.loads(extra["vitrain.json"])["class_names"]) == CLASSES


@pytest.mark.parametrize("weights", ["auto", "raw"])
def test_safetensors_load_back_into_the_model(checkpoints: dict[str, Path], tmp_path: Path, weights: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = export_checkpoint(checkpoints["swin_nano"], "safetensors", tmp_path / "w.safetensors", weights).path
    trained = load_trained(checkpoints["swin_nano"], "cpu")
    model = create_model(**trained.spec).eval()
    model.load_state_dict(load_file(path))  # strict: the plain model's names, nothing else
    reference = trained.ema if weights == "auto" else trained.model
    x = images(32, 2)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == CLASSES
        assert f.metadata()["weights"] == ("ema" if weights == "auto" else "raw")


def test_safetensors_of_a_lora_run_hold_the_merged_weights(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    checkpoint = make_checkpoint(tmp_path, ["model.lora.rank=4"], ema=False)
    trained = load_trained(checkpoint, "cpu")
    path = export_checkpoint(checkpoint, "safetensors").path
    weights = load_file(path)
    assert not any("lora" in k or "base_layer" in k for k in weights)
    model = create_model(**trained.spec).eval()
    model.load_state_dict(weights)
    x = images(16, 2)
    with torch.no_grad():
        assert (model(x) - trained.model(x)).abs().max() <= 1e-5  # the adapters (random B) are in the weights
        assert (model(x) - create_model(**trained.spec).eval()(x)).abs().max() > 1e-2


def test_predict_on_onnx_gives_the_checkpoints_classes(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    onnx_file = export_checkpoint(checkpoints["deit_nano"], "onnx", tmp_path / "model.onnx").path
    from_onnx = predict(onnx_file, tmp_path, topk=3)
    from_checkpoint = predict(checkpoints["deit_nano"], tmp_path, topk=3, use_ema=True)  # the exported weights
    for a, b in zip(from_onnx, from_checkpoint, strict=True):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_without_vitrains_metadata_is_refused(tmp_path: Path) -> None:
    model = create_model("vit_nano_patch4_16", num_classes=3).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(tmp_path / "plain.onnx"), dynamo=False)
    with pytest.raises(VitrainError, match="lacks vitrain's metadata"):
        load_onnx(tmp_path / "plain.onnx")


def test_bad_settings_are_one_line_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown format 'tflite' \\(format\\); choose one of onnx, torch.export"):
        to_config(compose(["checkpoint=x.pt", "format=tflite"], config_name="export"), ExportConfig)
    with pytest.raises(ConfigError, match="weights=best: choose one of auto, ema, raw"):
        to_config(compose(["checkpoint=x.pt", "weights=best"], config_name="export"), ExportConfig)
    no_ema = make_checkpoint(tmp_path, ["model=vit_nano"], ema=False)
    with pytest.raises(ConfigError, match="has no EMA weights .*; use weights=raw"):
        export_checkpoint(no_ema, "safetensors", weights="ema")


def test_onnxruntime_missing_names_the_extra(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(VitrainError) as error:
        export_checkpoint(checkpoints["vit_nano"], "onnx")
    assert error_message(error.value) == ('format=onnx needs onnxruntime: pip install "vitrain[export]" '
                                          '(or pip install onnxruntime)')
    with pytest.raises(VitrainError, match=r'running an ONNX model needs onnxruntime: pip install "vitrain\[export\]"'):
        load_onnx(checkpoints["vit_nano"].with_suffix(".onnx"))


def test_cli_exports_and_refuses_a_foreign_checkpoint(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "vit.onnx"
    ok = subprocess.run([sys.executable, "-m", "vitrain.export", f"checkpoint={checkpoints['vit_nano']}",
                         f"output={out}", f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"wrote {out} (onnx, ema weights; logits within ") and out.is_file()
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    bad = subprocess.run([sys.executable, "-m", "vitrain.export", f"checkpoint={tmp_path / 'foreign.pt'}",
                          f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip() == (f"error: {tmp_path / 'foreign.pt'} is not a vitrain training checkpoint "
                                  f"(no model spec); give a run's checkpoints/best.pt or last.pt")
