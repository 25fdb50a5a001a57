"""Weight conversion: every layout loads and gives the source model's logits; resampling equals timm's."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.layers import pos_embed_rel, resample_abs_pos_embed, resample_patch_embed, resize_rel_pos_bias_table_simple
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn

import vitrain.models.deit  # noqa: F401  (registers the DeiT variants)
from vitrain.errors import ConfigError, VitrainError
from vitrain.models import convert, create_model
from vitrain.models.convert import (
    convert_state_dict,
    detect_layout,
    fetch_timm_weights,
    load_pretrained,
    resample_relative_position_bias_table,
)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so that no head or bias is zero and the logits are O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def images(size: int = 224, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours: torch.nn.Module, ref: torch.nn.Module, size: int = 224) -> None:
    x = images(size)
    with torch.no_grad():
        a, b = ours.eval()(x), ref.eval()(x)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-4


def save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


# 1. timm files --------------------------------------------------------------------------------------------------

# (timm name, timm and our overrides, file name, wrapper key): the base models at depth 2 to stay fast.
TIMM_FILES = [
    ("vit_tiny_patch16_224", {}, "w.pth", None),
    ("vit_small_patch16_224", {}, "w.safetensors", None),
    ("vit_base_patch16_224", {"depth": 2}, "w.pth", "model"),
    ("vit_base_patch32_224", {"depth": 2}, "w.pth", "state_dict"),
]


@pytest.mark.parametrize("name,kwargs,filename,wrapper", TIMM_FILES, ids=[t[0] for t in TIMM_FILES])
def test_timm_file_gives_timms_logits(tmp_path: Path, name, kwargs, filename, wrapper) -> None:
    """timm model with random weights -> file (plain, safetensors, {"model": ...} as the DeiT release,
    {"state_dict": ...} as timm's train script) -> create_model(name, checkpoint=file) -> the same eval
    logits (max |diff| <= 1e-4); load_pretrained reports nothing missing, extra or re-initialised."""
    torch.manual_seed(0)
    ref = randomized(timm.create_model(name, **kwargs))
    state = ref.state_dict() if wrapper is None else {wrapper: ref.state_dict()}
    path = save(state, tmp_path / filename)
    assert_same_logits(create_model(name, checkpoint=path, **kwargs), ref)
    assert load_pretrained(create_model(name, **kwargs), path) == convert.LoadReport([], [], [])


# 2. torchvision ------------------------------------------------------------------------------------------------

def test_torchvision_vit_b_16_maps_onto_every_key_of_vit_base() -> None:
    """Full depth on the meta device: the mapping covers every tensor, with equal shapes."""
    with torch.device("meta"):
        tv = torchvision.models.vit_b_16(weights=None)
        ours = create_model("vit_base_patch16_224")
    converted = convert_state_dict(tv.state_dict(), ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_torchvision_vit_gives_the_same_logits() -> None:
    """vit_b_16's architecture at 2 blocks (vit_b_16() itself takes no depth argument); the full-depth
    key mapping is checked above. Checks that the fused in_proj is q, k, v stacked as timm's qkv."""
    torch.manual_seed(0)
    tv = randomized(torchvision.models.vision_transformer.VisionTransformer(
        image_size=224, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072))
    ours = create_model("vit_base_patch16_224", depth=2)
    assert detect_layout(tv.state_dict()) == "torchvision_vit"
    assert load_pretrained(ours, tv.state_dict()) == convert.LoadReport([], [], [])
    assert_same_logits(ours, tv)


def test_torchvision_vit_old_mlp_names_are_mapped() -> None:
    state = {"encoder.layers.encoder_layer_3.mlp.linear_1.weight": torch.zeros(1),
             "encoder.layers.encoder_layer_3.mlp.linear_2.bias": torch.zeros(1)}
    renamed = convert.rename_keys(state, convert.TORCHVISION_VIT)
    assert set(renamed) == {"blocks.3.mlp.fc1.weight", "blocks.3.mlp.fc2.bias"}


def test_torchvision_file_into_a_torchvision_model_keeps_its_names() -> None:
    """A torchvision model (``model.source=torchvision``) takes its own layout unchanged."""
    def tiny_vit() -> torch.nn.Module:
        return torchvision.models.vision_transformer.VisionTransformer(
            image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)

    source, target = tiny_vit(), tiny_vit()
    assert load_pretrained(target, source.state_dict()) == convert.LoadReport([], [], [])
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


def test_torchvision_swin_t_gives_timms_swin_logits() -> None:
    """Full swin_t into timm's swin_tiny_patch4_window7_224: every converted key is a timm key and
    the reverse (timm builds its own index and mask buffers); patch merging concatenates the 2x2
    neighbours in the same order in both, so the logits agree."""
    torch.manual_seed(0)
    tv = randomized(torchvision.models.swin_t(weights=None))
    ref = timm.create_model("swin_tiny_patch4_window7_224")
    assert detect_layout(tv.state_dict()) == "torchvision_swin"
    converted = convert_state_dict(tv.state_dict(), ref)
    assert converted.keys() == ref.state_dict().keys()
    ref.load_state_dict(converted, strict=True)
    assert_same_logits(ref, tv)


# 3. Swin release -----------------------------------------------------------------------------------------------

def to_swin_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's Swin layout -> the original release: patch merging at the end of the previous stage,
    ``head`` instead of ``head.fc``, persisted index and mask buffers, wrapped in ``model``."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            key = ".".join(["layers", str(int(parts[1]) - 1), *parts[2:]])
        out[key.replace("head.fc.", "head.")] = value
        if key.endswith("attn.relative_position_bias_table"):
            out[key.replace("bias_table", "index")] = torch.zeros(49 * 49, dtype=torch.long)
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return {"model": out}


def test_swin_release_converts_back_exactly() -> None:
    with torch.device("meta"):
        ref = timm.create_model("swin_tiny_patch4_window7_224")
    original = {k: torch.randn(v.shape) for k, v in ref.state_dict().items()}
    release = to_swin_release(original)
    assert "layers.0.downsample.reduction.weight" in release["model"]
    assert detect_layout(release) == "swin_release"
    converted = convert_state_dict(release, ref)
    assert list(converted) == list(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)


@pytest.mark.parametrize("name", ["swin_nano_patch2_window4_32", "swin_tiny_patch4_window7_224"])
def test_swin_release_rules_equal_timms_checkpoint_filter(name: str) -> None:
    """Our SWIN_RELEASE table gives, for our models at the release's window, the keys and tensors of
    timm's checkpoint_filter_fn (max |diff| == 0): the same rules; see convert.SWIN_RELEASE for why
    timm's function is not called."""
    torch.manual_seed(0)
    kwargs = {"depths": (1, 1, 1, 1)} if name.startswith("swin_tiny") else {}
    model = create_model(name, **kwargs)
    release = to_swin_release(randomized(create_model(name, **kwargs)).state_dict())
    assert detect_layout(release) == "swin_release"
    ours, theirs = convert_state_dict(release, model), checkpoint_filter_fn(release, model)
    assert list(ours) == list(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolator on newer torch
def test_timms_swin_filter_resamples_bias_tables_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """At another window timm's filter interpolates the tables with BEiT's geometric-progression rule,
    not bicubically as every other layout is here: the reason convert keeps its own SWIN_RELEASE rules."""
    monkeypatch.setattr(pos_embed_rel, "_USE_SCIPY", False)  # timm's scipy-free path, whatever is installed
    torch.manual_seed(0)
    release = to_swin_release(randomized(small_swin(4)).state_dict())
    key = "layers.1.blocks.0.attn.relative_position_bias_table"
    ours, theirs = convert_state_dict(release, small_swin(8))[key], checkpoint_filter_fn(release, small_swin(8))[key]
    assert ours.shape == theirs.shape == (15 * 15, 4)
    assert (ours - theirs).abs().max().item() > 1e-3


def small_swin(window: int, num_classes: int = 10) -> SwinTransformer:
    return SwinTransformer(img_size=64, patch_size=4, window_size=window, embed_dim=32, depths=(1, 1),
                           num_heads=(2, 4), num_classes=num_classes)


def test_swin_window_change_resamples_the_bias_tables() -> None:
    torch.manual_seed(0)
    source = randomized(small_swin(4)).state_dict()
    target = small_swin(8)
    report = load_pretrained(target, source)
    assert report == convert.LoadReport([], [], [])
    key = "layers.1.blocks.0.attn.relative_position_bias_table"
    expected = resize_rel_pos_bias_table_simple(source[key], (8, 8), (15 * 15, 4))
    torch.testing.assert_close(target.state_dict()[key], expected, atol=1e-6, rtol=0)
    assert torch.equal(target.state_dict()["layers.1.downsample.reduction.weight"],
                       source["layers.1.downsample.reduction.weight"])


def test_relative_position_bias_table_resampling_equals_timm() -> None:
    table = torch.randn(13 * 13, 3)
    ours = resample_relative_position_bias_table(table, 12)
    assert ours.shape == (23 * 23, 3)
    torch.testing.assert_close(ours, resize_rel_pos_bias_table_simple(table, (12, 12), (23 * 23, 3)))
    assert resample_relative_position_bias_table(table, 7) is table


# 4. resolution -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_224_checkpoint_into_384_model_resamples_pos_embed_as_timm(name: str, prefix: int) -> None:
    torch.manual_seed(0)
    source = randomized(timm.create_model(name, depth=1)).state_dict()
    ours = create_model(name, depth=1, img_size=384)
    assert load_pretrained(ours, source) == convert.LoadReport([], [], [])
    got, old = ours.pos_embed.detach(), source["pos_embed"]
    assert got.shape == (1, prefix + 24 * 24, 192)
    expected = resample_abs_pos_embed(old, [24, 24], num_prefix_tokens=prefix)
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(got[:, :prefix], old[:, :prefix])


def test_other_patch_size_resamples_the_patch_embedding_as_timm() -> None:
    """vit_small_patch16_224 weights into vit_small_patch4_32: kernel 16 -> 4, grid 14 -> 8."""
    torch.manual_seed(0)
    source = randomized(timm.create_model("vit_small_patch16_224", depth=1)).state_dict()
    ours = create_model("vit_small_patch4_32", depth=1, num_classes=1000)
    assert load_pretrained(ours, source) == convert.LoadReport([], [], [])
    expected = resample_patch_embed(source["patch_embed.proj.weight"], [4, 4])
    torch.testing.assert_close(ours.patch_embed.proj.weight.detach(), expected)
    assert ours.pos_embed.shape == (1, 65, 384)


# 5. heads ------------------------------------------------------------------------------------------------------

def test_other_number_of_classes_keeps_the_fresh_head() -> None:
    torch.manual_seed(0)
    source = randomized(timm.create_model("vit_tiny_patch16_224", depth=2)).state_dict()
    ours = create_model("vit_tiny_patch16_224", depth=2, num_classes=10)
    fresh = {k: v.clone() for k, v in ours.head.state_dict().items()}
    report = load_pretrained(ours, source)
    assert report.reinitialized == ["head.weight", "head.bias"]
    assert report.missing == [] and report.unexpected == []
    assert all(torch.equal(getattr(ours.head, k), v) for k, v in fresh.items())
    loaded = ours.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.items() if not k.startswith("head."))


def test_features_only_model_loads_the_backbone() -> None:
    """num_classes=0: the head tensors are reported unexpected, the pooled features are timm's."""
    torch.manual_seed(0)
    ref = randomized(timm.create_model("vit_tiny_patch16_224", depth=2))
    ours = create_model("vit_tiny_patch16_224", depth=2, num_classes=0).eval()
    report = load_pretrained(ours, ref.state_dict())
    assert report.unexpected == ["head.weight", "head.bias"] and report.missing == []
    x = images()
    with torch.no_grad():
        features, expected = ours(x), ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert features.shape == (2, 192)
    assert (features - expected).abs().max().item() <= 1e-5


# 6. errors -----------------------------------------------------------------------------------------------------

def test_checkpoint_of_another_architecture_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    with torch.device("meta"):
        base = timm.create_model("vit_base_patch16_224", depth=1)
    path = save({k: torch.zeros(v.shape) for k, v in base.state_dict().items()}, tmp_path / "base.pth")
    ours = create_model("vit_small_patch16_224", depth=1)
    with pytest.raises(ConfigError) as info:
        load_pretrained(ours, path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {path} does not fit ")
    assert ": cls_token is (1, 1, 768) in the file, (1, 1, 384) in the model;" in message
    assert "set model.name" in message


def test_strict_shapes_false_drops_every_mismatch() -> None:
    state = create_model("vit_nano_patch4_16", num_classes=3).state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 64)
    report = load_pretrained(create_model("vit_nano_patch4_16", num_classes=5), state, strict_shapes=False)
    assert report.reinitialized == ["blocks.0.mlp.fc1.weight", "head.weight", "head.bias"]


def test_distilled_checkpoint_into_plain_vit_at_other_resolution_is_a_config_error() -> None:
    state = create_model("deit_tiny_distilled_patch16_224", depth=1).state_dict()
    with pytest.raises(ConfigError, match="pos_embed has 2 prefix tokens .* 1 in vit_tiny_patch16_224; set model.name"):
        load_pretrained(create_model("vit_tiny_patch16_224", depth=1, img_size=384), state)


def test_unrelated_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no tensor of the state dict matches"):
        load_pretrained(create_model("vit_nano_patch4_16"), {"foo.weight": torch.zeros(2)})


@pytest.mark.parametrize("filename", ["bad.pth", "bad.safetensors"])
def test_corrupt_file_is_a_one_line_error(tmp_path: Path, filename: str) -> None:
    path = tmp_path / filename
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(VitrainError) as info:
        load_pretrained(create_model("vit_nano_patch4_16"), path)
    assert str(info.value).startswith(f"cannot load checkpoint {path}") and "\n" not in str(info.value)


def test_file_without_tensors_is_a_one_line_error(tmp_path: Path) -> None:
    path = save({"epoch": 3, "note": "no weights here"}, tmp_path / "empty.pth")
    with pytest.raises(VitrainError, match=r"^checkpoint .*empty.pth holds no state dict of tensors; is it a weights"):
        load_pretrained(create_model("vit_nano_patch4_16"), path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VitrainError, match="does not exist"):
        load_pretrained(create_model("vit_nano_patch4_16"), tmp_path / "nothing.safetensors")


class CreatesAFile:
    """Unpickling this calls ``open(marker, "w")``: code execution, which a weights-only load refuses."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model": {"x": torch.zeros(1)}, "payload": CreatesAFile(marker)}, f, pickle_protocol=2)
    assert not marker.exists()
    with pytest.raises(VitrainError) as info:
        load_pretrained(create_model("vit_nano_patch4_16"), path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    pickle.loads(pickle.dumps(CreatesAFile(marker))).close()  # the payload is live: unpickling creates the file
    assert marker.exists()
    os.remove(marker)


# layouts and timm weights --------------------------------------------------------------------------------------

def test_detect_layout() -> None:
    sd = {"cls_token": torch.zeros(1), "blocks.0.attn.qkv.weight": torch.zeros(1)}
    assert detect_layout(sd) == "timm"
    assert detect_layout({"state_dict": sd, "epoch": 3}) == "timm"
    assert detect_layout({"model": sd}) == "deit_release"
    assert detect_layout({"model": sd, "vitrain_version": "0.1.0", "epoch": 1}) == "vitrain"
    assert detect_layout({"model": {"layers.0.downsample.reduction.weight": torch.zeros(1)}}) == "swin_release"
    assert detect_layout({"class_token": torch.zeros(1)}) == "torchvision_vit"
    assert detect_layout({"features.1.0.attn.relative_position_bias_table": torch.zeros(1)}) == "torchvision_swin"


def test_vitrain_checkpoint_and_ddp_prefix_load() -> None:
    source = create_model("vit_nano_patch4_16", num_classes=3)
    target = create_model("vit_nano_patch4_16", num_classes=3)
    wrapped = {"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "vitrain_version": "0.1.0",
               "epoch": 4, "val": {"top1": 50.0}}
    assert load_pretrained(target, wrapped) == convert.LoadReport([], [], [])
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())


def test_fetch_timm_weights_without_network_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub answered the connection check (offline, tests/test_models_weights.py), then the download failed."""
    def offline(name: str, pretrained: bool = False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nCheck your connection")

    monkeypatch.setattr("vitrain.hub.hub_online", lambda *args: True)
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(VitrainError) as info:
        fetch_timm_weights("vit_tiny_patch16_224")
    assert "\n" not in str(info.value)
    assert "could not download timm's pretrained weights for 'vit_tiny_patch16_224'" in str(info.value)
    assert "model.checkpoint=PATH" in str(info.value)
    with pytest.raises(ConfigError, match="timm has no model 'vit_nano_patch4_16'"):
        fetch_timm_weights("vit_nano_patch4_16")


def test_fetch_timm_weights_returns_the_state_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(2, 3)
    monkeypatch.setattr("vitrain.hub.hub_online", lambda *args: True)  # the download is this lambda
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False: model if pretrained else None)
    assert fetch_timm_weights("vit_tiny_patch16_224").keys() == {"weight", "bias"}
