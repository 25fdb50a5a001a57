"""``data.crop_mode``: timm's three evaluation crops (center, squash, border) on the per-image path, equal to timm's
``create_transform``; the batched path (GpuAugment) equal to the per-image one; the mode resolved from timm's
pretrained_cfg, checked in the config, refused with the image cache, and carried by exported files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import make_checkpoint

from vitrain.build import resolve_preprocess
from vitrain.config import compose, to_config
from vitrain.data.config import DataConfig
from vitrain.data.gpu import GpuAugment
from vitrain.data.transforms import CROP_MODES, build_transforms
from vitrain.errors import ConfigError
from vitrain.exporting import export_checkpoint
from vitrain.inference import data_as_trained, eval_transform, load_onnx, load_trained
from vitrain.predict import predict

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPES = [(200, 300), (320, 200)]  # (height, width): wider and taller than square


def _image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("crop_mode", CROP_MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_transform_is_timms_for_every_crop_mode(shape: tuple[int, int], crop_mode: str, crop_pct: float) -> None:
    """PIL images: within 1e-6 of timm's create_transform (equal uint8 pixels before ToTensor's /255 and
    ToDtype's *1/255, which round apart by up to 7.2e-7)."""
    from timm.data import create_transform

    image = Image.fromarray(_image(*shape))
    theirs = create_transform(input_size=(3, 224, 224), crop_pct=crop_pct, crop_mode=crop_mode,
                              interpolation="bicubic", mean=MEAN, std=STD, is_training=False)(image)
    ours = build_transforms(224, MEAN, STD, False, interpolation="bicubic", crop_pct=crop_pct,
                            crop_mode=crop_mode)(image)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("crop_mode", CROP_MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_batched_eval_crop_is_the_per_image_one(shape: tuple[int, int], crop_mode: str, crop_pct: float) -> None:
    """uint8 tensors: GpuAugment's eval on a batch equals the per-image transform exactly (the same kernels)."""
    image = torch.from_numpy(_image(*shape)).permute(2, 0, 1).contiguous()
    per_image = build_transforms(224, MEAN, STD, False, interpolation="bicubic", crop_pct=crop_pct,
                                 crop_mode=crop_mode)(image)
    batch = GpuAugment(224, MEAN, STD, False, interpolation="bicubic", crop_pct=crop_pct,
                       crop_mode=crop_mode)(torch.stack([image, image.flip(-1)]))
    assert batch.shape == (2, 3, 224, 224)
    assert torch.equal(batch[0], per_image)


@pytest.mark.gpu
@pytest.mark.parametrize("crop_mode", CROP_MODES)
def test_cuda_eval_crop_is_the_cpus_within_a_level(crop_mode: str) -> None:
    """On CUDA the resize rounds float interpolation to uint8, as on the CPU but in another order of sums: one
    uint8 level apart at most, 1/255/std after normalization; the padding is the same."""
    images = torch.from_numpy(np.stack([_image(200, 300)] * 3)).permute(0, 3, 1, 2).contiguous()
    augment = GpuAugment(224, MEAN, STD, False, interpolation="bicubic", crop_pct=0.875, crop_mode=crop_mode)
    out = augment(images.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), augment(images), atol=1 / 255 / min(STD) + 1e-6, rtol=0)


def test_border_pads_tensors_with_the_mean_colour() -> None:
    """A 200x300 image at crop_pct 1: the longer side to 224, the shorter to 149, padded to 224 with
    round(255 * mean) in each channel (torchvision alone pads a tensor with one value)."""
    image = torch.from_numpy(_image(200, 300)).permute(2, 0, 1).contiguous()
    augment = GpuAugment(224, MEAN, STD, False, interpolation="bicubic", crop_mode="border")
    crop = augment.crop(image[None])[0]
    fill = torch.tensor([round(255 * m) for m in MEAN], dtype=torch.uint8)
    top = (224 - 149) // 2
    assert torch.equal(crop[:, :top], fill.view(3, 1, 1).expand(3, top, 224))
    assert torch.equal(crop[:, top + 149:], fill.view(3, 1, 1).expand(3, 224 - top - 149, 224))


def test_squash_of_a_batch_resizes_both_sides() -> None:
    images = torch.from_numpy(np.stack([_image(200, 300)] * 2)).permute(0, 3, 1, 2)
    augment = GpuAugment(16, MEAN, STD, False, interpolation="bilinear", crop_mode="squash")
    assert augment.crop(images).shape == (2, 3, 16, 16)


def test_crop_mode_resolves_from_timms_pretrained_cfg() -> None:
    cfg = to_config(compose(["model=timm", "model.name=convnext_small.fb_in22k_ft_in1k_384", "model.pretrained=true"]))
    resolved, said = resolve_preprocess(cfg)
    assert resolved.data.crop_mode == "squash" and "data.crop_mode=squash (the weights')" in said


def test_bad_crop_modes_and_the_cache_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^unknown data.crop_mode 'diagonal'; choose one of center, squash, "
                                          r"border$"):
        to_config(compose(["data.crop_mode=diagonal"]))
    with pytest.raises(ConfigError, match="unknown data.crop_mode 'diagonal'"):
        build_transforms(16, MEAN, STD, False, crop_mode="diagonal")
    assert DataConfig(name="imagefolder", root=str(tmp_path), cache=True, crop_mode="center").cache
    with pytest.raises(ConfigError, match=r"data.cache=true caches centre squares.*; set data.crop_mode=center or "
                                          r"data.cache=false$"):
        DataConfig(name="imagefolder", root=str(tmp_path), cache=True, crop_mode="border")
    cached = to_config(compose(["model=timm", "model.name=convnext_small.fb_in22k_ft_in1k_384",
                                "model.pretrained=true", "data=imagefolder", f"data.root={tmp_path}",
                                "data.cache=true"]))
    with pytest.raises(ConfigError, match="data.crop_mode=squash \\(set, or the weights' own\\)"):
        resolve_preprocess(cached)  # before build_datasets reads anything


@pytest.fixture(scope="module")
def border_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("crop"), ["model=vit_nano", "data.crop_mode=border",
                                                            "data.crop_pct=0.875"], ema=False)


def test_onnx_and_predict_carry_the_crop_mode(border_checkpoint: Path, tmp_path: Path) -> None:
    """The checkpoint, its ONNX file's metadata and predict on that file all crop as border."""
    trained = load_trained(border_checkpoint, "cpu")
    assert trained.preprocess["crop_mode"] == "border"
    onnx_file = export_checkpoint(border_checkpoint, "onnx", tmp_path / "model.onnx").path
    from_onnx = load_onnx(onnx_file)
    assert from_onnx.preprocess["crop_mode"] == "border" and from_onnx.preprocess["crop_pct"] == 0.875
    image = Image.fromarray(_image(20, 30))
    size = trained.preprocess["img_size"]
    bordered = build_transforms(size, trained.preprocess["mean"], trained.preprocess["std"], False,
                                interpolation=trained.preprocess["interpolation"], crop_pct=0.875,
                                crop_mode="border")(image)
    assert torch.equal(from_onnx.transform(image), bordered) and torch.equal(trained.transform(image), bordered)
    image.save(tmp_path / "wide.png")
    for a, b in zip(predict(onnx_file, tmp_path / "wide.png"), predict(border_checkpoint, tmp_path / "wide.png"),
                    strict=True):
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-5)


def test_timm_export_says_the_crop_mode(border_checkpoint: Path, tmp_path: Path) -> None:
    """timm's config.json has it, timm's own transform from it is vitrain's, and the model card says it."""
    import timm

    folder = export_checkpoint(border_checkpoint, "timm", tmp_path / "hub").path
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["crop_mode"] == "border"
    assert "padded with the mean colour" in (folder / "README.md").read_text()
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    image = Image.fromarray(_image(20, 30))
    ours = load_trained(border_checkpoint, "cpu").transform(image)
    assert (theirs(image) - ours).abs().max().item() <= 1e-6


def test_checkpoints_without_a_crop_mode_ran_center(tmp_path: Path) -> None:
    """predict's transform and evaluate's data of a checkpoint that records no crop_mode: center, as it ran; one
    that records squash evaluates squashed, per image (a cache asked for by the data group is moot)."""
    pre = {"img_size": 16, "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear", "crop_pct": 0.875}
    image = Image.fromarray(_image(20, 30))
    center = build_transforms(16, MEAN, STD, False, crop_pct=0.875, crop_mode="center")(image)
    assert torch.equal(eval_transform(pre)(image), center)
    data = DataConfig(name="imagefolder", root=str(tmp_path), cache=True)
    assert data_as_trained(data, pre).crop_mode == "center"
    squashed = data_as_trained(data, {**pre, "crop_mode": "squash"})
    assert (squashed.crop_mode, squashed.crop_pct, squashed.cache) == ("squash", 0.875, False)
