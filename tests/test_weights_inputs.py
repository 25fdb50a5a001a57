"""The input the starting weights were trained on: ``model.img_size`` follows them when unset (timm's input_size of
the tag, torchvision's crop, a vitrain checkpoint's size), a 384 checkpoint keeps its position embedding, an explicit
size resamples and says so, torchvision's weights are chosen by name with their own transforms
(vitrain/models/weights.py, vitrain/models/config.py, vitrain/models/external.py, vitrain/build.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_models_weights import UNREACHABLE, write_hub_cache

from vitrain.build import build_model, resolve_preprocess
from vitrain.config import compose, to_config
from vitrain.data.transforms import build_transforms
from vitrain.errors import ConfigError

# 24 tagged timm weights across ViT, DeiT, DeiT III, Swin, BEiT, EVA-02, CLIP, SigLIP, DINOv2, ConvNeXt(V2), MaxViT,
# MetaFormer, ResNet, EfficientNet and RegNet: sizes from 176 to 518, center and squash crops, test sizes
TAGGED = ["vit_small_patch16_384.augreg_in21k_ft_in1k", "vit_base_patch16_224.augreg2_in21k_ft_in1k",
          "vit_base_patch14_dinov2.lvd142m", "vit_base_patch16_clip_224.openai_ft_in12k_in1k",
          "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k", "vit_so400m_patch14_siglip_384.webli",
          "deit_small_patch16_224.fb_in1k", "deit_base_patch16_384.fb_in1k", "deit3_small_patch16_384.fb_in1k",
          "deit3_base_patch16_224.fb_in22k_ft_in1k", "swin_base_patch4_window12_384.ms_in22k_ft_in1k",
          "swin_tiny_patch4_window7_224.ms_in1k", "beit_base_patch16_384.in22k_ft_in22k_in1k",
          "eva02_small_patch14_336.mim_in22k_ft_in1k", "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k",
          "convnext_small.fb_in22k_ft_in1k_384", "convnextv2_nano.fcmae_ft_in22k_in1k_384",
          "convnext_tiny.in12k_ft_in1k", "maxvit_tiny_tf_384.in1k", "caformer_s18.sail_in22k_ft_in1k_384",
          "resnet50.a1_in1k", "resnet50.tv2_in1k", "efficientnet_b3.ra2_in1k", "regnety_040.ra3_in1k"]
VIT_384 = "vit_tiny_patch16_384.augreg_in21k_ft_in1k"  # 24x24 patches + the class token: 577 positions


def timm_data_config(name: str) -> dict:
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    return resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(name).to_dict())


@pytest.mark.parametrize("name", TAGGED)
def test_size_and_crop_follow_timms_config_of_the_tag(name: str) -> None:
    """No weights needed: timm's pretrained_cfg decides; the values equal timm's resolve_data_config."""
    cfg, _ = resolve_preprocess(to_config(compose(["model=timm", f"model.name={name}", "model.pretrained=true"])))
    timm_cfg = timm_data_config(name)
    assert cfg.model.img_size == timm_cfg["input_size"][-1]
    assert cfg.data.crop_mode == (timm_cfg.get("crop_mode") or "center")
    assert (cfg.data.crop_pct, cfg.data.interpolation) == (timm_cfg["crop_pct"], timm_cfg["interpolation"])
    assert (tuple(cfg.data.mean), tuple(cfg.data.std)) == (tuple(timm_cfg["mean"]), tuple(timm_cfg["std"]))


def test_the_families_are_covered() -> None:
    assert len(TAGGED) >= 20
    assert {timm_data_config(n).get("crop_mode") for n in TAGGED} >= {"center", "squash"}
    assert len({timm_data_config(n)["input_size"][-1] for n in TAGGED}) >= 6


@pytest.mark.parametrize(("overrides", "size"), [
    (["model=deit3_small", "model.name=deit3_small_patch16_384.fb_in1k", "model.pretrained=true"], 384),
    (["model=swin_base", "model.name=swin_base_patch4_window12_384.ms_in22k_ft_in1k", "model.pretrained=true"], 384),
    (["model=vit_small", "model.name=vit_small_patch16_384.augreg_in21k_ft_in1k", "model.pretrained=true"], 384),
    (["model=vit_small", "model.name=vit_small_patch16_384"], 384),  # from scratch: the model's own size
    (["model=vit_small"], 224), ([], 16), (["model=swin_nano"], 32), (["model=timm"], 224),
    (["model=vit_small", "model.img_size=96"], 96),  # set: kept
    (["model=torchvision", "model.name=efficientnet_b3", "model.pretrained=true"], 300),  # DEFAULT: 300, not 224
])
def test_vitrain_models_and_models_from_scratch(overrides: list[str], size: int) -> None:
    assert to_config(compose(overrides)).model.img_size == size


def test_a_checkpoints_size_is_the_weights(tmp_path: Path) -> None:
    """A vitrain checkpoint records its size: a model started from it trains at that size unless told otherwise."""
    from vitrain.train import train

    train(compose(["trainer.epochs=1", "scheduler.warmup_epochs=0", "data.train_fraction=0.05",
                             "trainer.progress=false", "logger=[]", "model.img_size=24"]), tmp_path / "a")
    best = tmp_path / "a" / "checkpoints" / "best.pt"
    cfg, said = resolve_preprocess(to_config(compose([f"model.checkpoint={best}"])))
    assert cfg.model.img_size == 24 and "model.img_size=24 (the starting weights' own)" in said
    resolved = (tmp_path / "a" / "config.yaml").read_text()  # every auto value, resolved, in the run folder
    assert "img_size: 24" in resolved and "crop_mode: center" in resolved and "mean:\n  - 0.5" in resolved


@pytest.fixture
def offline_384(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A Hugging Face cache holding timm's files of VIT_384 (random weights), the hub unreachable."""
    from huggingface_hub import constants

    snapshot = write_hub_cache(tmp_path, VIT_384)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return snapshot


@pytest.mark.parametrize("group", ["model=timm", "model=vit_tiny"])
def test_a_384_checkpoint_keeps_its_position_embedding(offline_384: Path, group: str) -> None:
    """timm's model and vitrain's, from the cached 384 weights: built at 384, the 577-position embedding is the
    file's, untouched (0.0 difference)."""
    from safetensors.torch import load_file

    cfg = to_config(compose([group, f"model.name={VIT_384}", "model.pretrained=true"]))
    assert cfg.model.img_size == 384
    model = build_model(cfg.model, 10)
    saved = load_file(str(offline_384 / "model.safetensors"))["pos_embed"]
    assert model.pos_embed.shape == (1, 577, 192)
    assert torch.equal(model.pos_embed.detach(), saved)


def test_an_explicit_size_resamples_and_says_why(offline_384: Path) -> None:
    cfg, said = resolve_preprocess(to_config(compose(["model=vit_tiny", f"model.name={VIT_384}",
                                                      "model.pretrained=true", "model.img_size=224"])))
    assert ("model.img_size=224 is set, but the starting weights were trained at 384: their position embedding "
            "(Swin: relative position tables) is resampled from a 24x24 grid of patches to 14x14") in said
    assert build_model(cfg.model, 10).pos_embed.shape == (1, 197, 192)


TORCHVISION = ["vit_b_16.IMAGENET1K_SWAG_E2E_V1", "regnet_y_400mf.IMAGENET1K_V2", "efficientnet_b3"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_weights_by_name_bring_their_transforms(name: str) -> None:
    """The weights' own resize, crop, filter, mean and std: vitrain's eval transform of a non-square photo equals the
    weights' transforms() (<= 1e-6)."""
    from vitrain.models.weights import torchvision_weights

    cfg, _ = resolve_preprocess(to_config(compose(["model=torchvision", f"model.name={name}",
                                                   "model.pretrained=true"])))
    theirs = torchvision_weights(name).transforms()
    assert cfg.model.img_size == theirs.crop_size[0]
    d = cfg.data
    ours = build_transforms(cfg.model.img_size, d.mean, d.std, train=False, interpolation=d.interpolation,
                            crop_pct=d.crop_pct)
    rng = np.random.default_rng(0)
    for shape in ((300, 451, 3), (517, 333, 3)):
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        assert (ours(image) - theirs(image)).abs().max().item() <= 1e-6


def test_swag_weights_are_their_own() -> None:
    cfg, _ = resolve_preprocess(to_config(compose(["model=torchvision", "model.name=vit_b_16.IMAGENET1K_SWAG_E2E_V1",
                                                   "model.pretrained=true"])))
    assert (cfg.model.img_size, cfg.data.crop_pct, cfg.data.interpolation) == (384, 1.0, "bicubic")
    default, _ = resolve_preprocess(to_config(compose(["model=torchvision", "model.name=vit_b_16",
                                                       "model.pretrained=true"])))
    assert (default.model.img_size, default.data.crop_pct, default.data.interpolation) == (224, 0.875, "bilinear")


def test_a_misspelt_torchvision_weights_name_lists_the_models_weights() -> None:
    with pytest.raises(ConfigError) as e:
        to_config(compose(["model=torchvision", "model.name=vit_b_16.IMAGENET1K_SWAG"]))
    assert str(e.value) == ("torchvision's vit_b_16 has no weights 'IMAGENET1K_SWAG'; set model.name=vit_b_16.W with W "
                            "one of IMAGENET1K_V1, IMAGENET1K_SWAG_E2E_V1, IMAGENET1K_SWAG_LINEAR_V1")
    with pytest.raises(ConfigError, match="unknown torchvision model 'vit_b_61'"):
        to_config(compose(["model=torchvision", "model.name=vit_b_61.IMAGENET1K_V1"]))


@pytest.mark.slow
def test_torchvision_vit_weights_load_resampled_at_another_size(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """vit_b_16.IMAGENET1K_SWAG_E2E_V1 (384) from torch's download cache (random weights) at model.img_size=224:
    torchvision's builder refuses the pair, so the weights load resampled by its interpolate_embeddings."""
    import torchvision
    from torchvision.models.vision_transformer import interpolate_embeddings

    from vitrain.models.weights import torchvision_weights

    weights = torchvision_weights("vit_b_16.IMAGENET1K_SWAG_E2E_V1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    state = torchvision.models.vit_b_16(image_size=384).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / Path(weights.url).name)
    cfg = to_config(compose(["model=torchvision", "model.name=vit_b_16.IMAGENET1K_SWAG_E2E_V1",
                             "model.pretrained=true", "model.img_size=224"]))
    model = build_model(cfg.model, 1000)
    want = interpolate_embeddings(224, 16, dict(state))["encoder.pos_embedding"]
    assert torch.equal(model.encoder.pos_embedding.detach(), want)
    assert torch.equal(model.conv_proj.weight.detach(), state["conv_proj.weight"])


@pytest.mark.slow
def test_a_384_run_from_the_local_cache_trains_at_384(tmp_path: Path) -> None:
    """The whole command, offline (HF_HUB_OFFLINE=1, a local cache of random weights): the run trains at 384, its
    checkpoint keeps the released 577-position embedding's shape, and the log and config.yaml say why."""
    import subprocess
    import sys

    from vitrain.checkpoint import load_checkpoint

    cache = tmp_path / "hub"
    write_hub_cache(cache, VIT_384)
    run = tmp_path / "run"
    env = {**{k: v for k, v in __import__("os").environ.items() if k != "HF_ENDPOINT"}, "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "vitrain.train", "model=timm", f"model.name={VIT_384}",
                           "model.pretrained=true", "trainer.epochs=1", "scheduler.warmup_epochs=0",
                           "data.train_fraction=0.02", "data.test_fraction=0.05", "data.batch_size=16",
                           "trainer.progress=false", "logger=[]", f"hydra.run.dir={run}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_checkpoint(run / "checkpoints" / "best.pt")
    assert saved["model"]["pos_embed"].shape == (1, 577, 192) and saved["preprocess"]["img_size"] == 384
    assert "model.img_size=384 (the starting weights' own)" in (run / "train.log").read_text()
    assert "img_size: 384" in (run / "config.yaml").read_text()
