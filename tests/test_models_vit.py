"""The ViT: shapes of every variant, sizes equal to timm's, numerics of its parts, timm weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from test_convert import randomized  # noise on every weight, for parity tests

from vitrain.errors import ConfigError
from vitrain.models import VisionTransformer, create_model, init_linear, list_models, new_classifier
from vitrain.models.convert import LoadReport, load_pretrained
from vitrain.models.layers import Attention, PatchEmbed, to_2tuple

VARIANTS = list_models("vit_*")
IMAGENET_VARIANTS = [n for n in VARIANTS if n.endswith(("_224", "_384"))]
# timm's 384x384 names (all of timm's ViT sizes that vitrain has at 224, but the huge one, which timm has not at 384)
AT_384 = ["vit_tiny_patch16_384", "vit_small_patch16_384", "vit_base_patch16_384", "vit_base_patch32_384",
          "vit_large_patch16_384", "vit_large_patch32_384"]
# (embed_dim, depth, heads, patch) of the small-image variants, which timm does not have
SMALL_IMAGE = {"vit_tiny_patch4_32": (192, 12, 3, 4, 32), "vit_small_patch4_32": (384, 12, 6, 4, 32),
               "vit_nano_patch4_16": (64, 6, 4, 4, 16)}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_paper_sizes() -> None:
    assert {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
            "vit_large_patch16_224", "vit_huge_patch14_224"} <= set(VARIANTS)
    assert set(SMALL_IMAGE) <= set(VARIANTS)
    assert set(AT_384) <= set(VARIANTS) and set(AT_384) <= set(timm.list_models("vit_*_384"))
    assert all(create_model(n, depth=1).patch_embed.img_size == (384, 384) for n in ("vit_tiny_patch16_384",
                                                                                     "vit_base_patch32_384"))


@pytest.mark.parametrize("name", IMAGENET_VARIANTS)
def test_imagenet_variant_has_timms_parameter_shapes(name: str) -> None:
    """Built on the meta device (no memory, no compute): same names and shapes as timm's model."""
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        ref = timm.create_model(name, pretrained=False, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name", list(SMALL_IMAGE))
def test_small_image_variant_matches_timm_vit_of_same_size(name: str) -> None:
    dim, depth, heads, patch, size = SMALL_IMAGE[name]
    with torch.device("meta"):
        ours = create_model(name, num_classes=10)
        ref = timm.models.vision_transformer.VisionTransformer(
            img_size=size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, num_classes=10)
    assert count(ours) == count(ref)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_gives_logits_of_the_right_shape(name: str) -> None:
    """Full width, heads and patch size at the variant's own resolution; two blocks keep it fast."""
    model = create_model(name, num_classes=7, depth=2).eval()
    size = model.patch_embed.img_size[0]
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
        features = model.forward_features(torch.randn(1, 3, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    assert features.shape == (1, model.patch_embed.num_patches + 1, model.embed_dim)


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_full_depth_forward(name: str) -> None:
    model = create_model(name, num_classes=5).eval()
    size = model.patch_embed.img_size[0]
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 5)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_weights_give_identical_outputs(global_pool: str) -> None:
    """timm's state dict loads strictly (same parameter names) and gives the same logits."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, global_pool=global_pool).eval()
    ours = create_model("vit_tiny_patch16_224", img_size=64, num_classes=10, global_pool=global_pool).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)



def assert_timm_384_parity(name: str, tmp_path: Path, **kwargs: int) -> None:
    """timm's model with random weights -> file -> create_model(name, checkpoint=file): nothing missing, extra or
    resampled, and the same eval logits on 384x384 images (max |diff| <= 1e-4)."""
    torch.manual_seed(0)
    ref = randomized(timm.create_model(name, **kwargs))
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    assert load_pretrained(create_model(name, **kwargs), tmp_path / "w.pth") == LoadReport([], [], [])
    ours = create_model(name, checkpoint=tmp_path / "w.pth", **kwargs).eval()
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, expected = ours(x), ref(x)
    assert logits.shape == (1, 1000) and logits.abs().max().item() > 0.1
    assert (logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", AT_384)
def test_384_variant_gives_timms_logits_at_reduced_depth(name: str, tmp_path: Path) -> None:
    """Full width, heads, patch size and 384x384 grid; one block keeps it fast (both constructors take depth)."""
    assert_timm_384_parity(name, tmp_path, depth=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", AT_384)
def test_384_variant_gives_timms_logits_at_full_depth(name: str, tmp_path: Path) -> None:
    assert_timm_384_parity(name, tmp_path)


def test_conv_patch_embedding_equals_reshape_and_linear() -> None:
    """The strided conv is "flatten every p x p patch (channel-major) and apply one linear map"."""
    torch.manual_seed(0)
    p, C, D = 4, 3, 16
    embed = PatchEmbed(img_size=(8, 12), patch_size=p, in_chans=C, embed_dim=D)
    x = torch.randn(2, C, 8, 12)
    B, H, W = 2, 8 // p, 12 // p
    patches = x.reshape(B, C, H, p, W, p).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W, C * p * p)
    expected = patches @ embed.proj.weight.reshape(D, -1).T + embed.proj.bias
    torch.testing.assert_close(embed(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_equals_the_textbook_formula() -> None:
    """softmax(q k^T / sqrt(d)) v per head, heads concatenated, then the output projection."""
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4).eval()
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, h, N, d)
        return t.reshape(2, 5, 4, 8).transpose(1, 2)

    weights = torch.softmax(heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_blocks_are_pre_norm_residual() -> None:
    """With the attention and MLP outputs zeroed, each block is the identity (pure residual path)."""
    model = create_model("vit_nano_patch4_16", num_classes=3).eval()
    block = model.blocks[0]
    for layer in (block.attn.proj, block.mlp.fc2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    x = torch.randn(2, 17, 64)
    torch.testing.assert_close(block(x), x)


def test_init_follows_timm() -> None:
    torch.manual_seed(0)
    model = create_model("vit_small_patch16_224", num_classes=10)
    qkv = model.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.002  # truncated normal, std 0.02 (truncation at +-2)
    assert qkv.abs().max().item() <= 2.0
    assert model.cls_token.abs().max().item() < 1e-4
    assert torch.count_nonzero(model.head.bias) == 0


def test_fresh_classifier_is_trunc_normal_with_zero_bias() -> None:
    """One init for every fresh classifier: new_classifier draws nn.Linear's default, then init_linear's
    truncated normal (the order of draws the models always had), so seeded heads are reproducible."""
    torch.manual_seed(0)
    head = new_classifier(384, 1000)
    torch.manual_seed(0)
    expected = torch.nn.Linear(384, 1000)
    torch.nn.init.trunc_normal_(expected.weight, std=0.02)
    assert torch.equal(head.weight, expected.weight) and torch.count_nonzero(head.bias) == 0
    assert abs(head.weight.std().item() - 0.02) < 0.001 and head.weight.abs().max().item() <= 2.0
    assert isinstance(new_classifier(384, 0), torch.nn.Identity)
    no_bias = torch.nn.Linear(4, 4, bias=False)
    init_linear(no_bias)
    assert no_bias.bias is None


@pytest.mark.parametrize("name", ["vit_nano_patch4_16", "deit_nano_distilled_patch4_16", "swin_nano_patch2_window4_32"])
def test_reset_classifier_and_reset_head_draw_fresh_seeded_heads(name: str) -> None:
    """model.reset_classifier and create_model(reset_head=True) give trunc-normal heads with zero bias,
    the same ones under the same seed."""
    def heads(model: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for n, p in model.named_parameters() if n.startswith("head")]

    for reset in (lambda m: m.reset_classifier(5), lambda m: None):
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = create_model(name, num_classes=10, reset_head=True)
            reset(model)
            runs.append(heads(model))
        assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
        assert all(torch.count_nonzero(p) == 0 for p in runs[0] if p.ndim == 1)
        assert all(p.abs().max().item() <= 2.0 for p in runs[0])


def test_to_2tuple_is_timms() -> None:
    assert to_2tuple is timm.layers.to_2tuple
    assert to_2tuple(16) == (16, 16) and to_2tuple([8, 12]) == (8, 12) and to_2tuple((8, 12)) == (8, 12)
    assert PatchEmbed(img_size=[8, 12], patch_size=4, embed_dim=2).grid_size == (2, 3)


def test_drop_path_is_random_in_training_and_off_in_eval() -> None:
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_16", num_classes=3, drop_path_rate=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_no_weight_decay_names_exist() -> None:
    model = create_model("vit_nano_patch4_16")
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


def test_reset_classifier_replaces_the_head() -> None:
    model = create_model("vit_nano_patch4_16", num_classes=10)
    model.reset_classifier(4)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 4)


def test_image_size_not_divisible_by_patch_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="not divisible by the patch size 16; set model.img_size"):
        create_model("vit_base_patch16_224", img_size=100)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vit_smal_patch16_224'.*vit_small_patch16_224"):
        create_model("vit_smal_patch16_224")


def test_direct_construction_without_registry() -> None:
    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=2)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 2)
    assert F.softmax(model(torch.randn(1, 3, 8, 8)), -1).sum().item() == pytest.approx(1.0)
