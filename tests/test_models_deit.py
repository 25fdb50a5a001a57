"""DeiT: the variants have timm's names and shapes, timm's weights give timm's logits, the two heads; and
the resampling of position embeddings (and Swin's bias tables) against vitrain's former copies."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from vitrain.errors import ConfigError
from vitrain.models import create_model, deit, list_models
from vitrain.models.convert import resample_pos_embed, resample_relative_position_bias_table
from vitrain.models.vit import VisionTransformer

PLAIN = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384"]
DISTILLED = ["deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
             "deit_base_distilled_patch16_224", "deit_base_distilled_patch16_384"]


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so that no head or bias is zero and the logits are O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def images(size: int = 224, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_registry_lists_the_deit_variants() -> None:
    assert set(PLAIN + DISTILLED) <= set(list_models("deit_*"))


@pytest.mark.parametrize("name", PLAIN + DISTILLED)
def test_variant_has_timms_parameter_names_and_shapes(name: str) -> None:
    """Built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        ref = timm.create_model(name, pretrained=False, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(ours, deit.DistilledVisionTransformer) == (name in DISTILLED)
    assert isinstance(ours, VisionTransformer)


@pytest.mark.parametrize("name,wrap", [("deit_tiny_distilled_patch16_224", False),
                                       ("deit_small_distilled_patch16_224", True)])
def test_timm_weights_via_file_give_timms_logits(tmp_path: Path, name: str, wrap: bool) -> None:
    """timm's model with random weights -> file (the small one wrapped as {"model": ...}, the DeiT
    release layout) -> create_model(name, checkpoint=file) -> the same eval logits; training mode gives timm's pair."""
    torch.manual_seed(0)
    ref = randomized(timm.create_model(name))
    path = tmp_path / "deit.pth"
    torch.save({"model": ref.state_dict()} if wrap else ref.state_dict(), path)
    ours = create_model(name, checkpoint=path)
    x = images()
    with torch.no_grad():
        logits, expected = ours.eval()(x), ref.eval()(x)
        ref.set_distilled_training(True)
        cls_logits, dist_logits = ours.train()(x)
        ref_cls, ref_dist = ref.train()(x)
    assert logits.shape == (2, 1000)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert (cls_logits - ref_cls).abs().max().item() <= 1e-4
    assert (dist_logits - ref_dist).abs().max().item() <= 1e-4
    torch.testing.assert_close(logits, (cls_logits + dist_logits) / 2)



def assert_timm_384_parity(name: str, tmp_path: Path, **kwargs: int) -> None:
    """timm's 384x384 model with random weights -> file -> create_model(name, checkpoint=file): the same eval logits
    (max |diff| <= 1e-4) on 384x384 images; a distilled one also gives timm's pair in training mode."""
    torch.manual_seed(0)
    ref = randomized(timm.create_model(name, **kwargs))
    torch.save(ref.state_dict(), tmp_path / "deit.pth")
    ours = create_model(name, checkpoint=tmp_path / "deit.pth", **kwargs)
    assert ours.patch_embed.img_size == (384, 384)
    x = images(384, n=1)
    with torch.no_grad():
        pairs = [(ours.eval()(x), ref.eval()(x))]
        if name in DISTILLED:
            ref.set_distilled_training(True)
            pairs += list(zip(ours.train()(x), ref.train()(x), strict=True))
    for logits, expected in pairs:
        assert logits.shape == (1, 1000) and logits.abs().max().item() > 0.1
        assert (logits - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["deit_base_patch16_384", "deit_base_distilled_patch16_384"])
def test_384_variant_gives_timms_logits_at_reduced_depth(name: str, tmp_path: Path) -> None:
    """Full width, heads and 384x384 grid; two blocks keep it fast (both constructors take depth)."""
    assert_timm_384_parity(name, tmp_path, depth=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_base_patch16_384", "deit_base_distilled_patch16_384"])
def test_384_variant_gives_timms_logits_at_full_depth(name: str, tmp_path: Path) -> None:
    assert_timm_384_parity(name, tmp_path)


def test_training_mode_returns_both_heads_and_eval_their_average() -> None:
    model = randomized(create_model("deit_tiny_distilled_patch16_224", num_classes=5, depth=1, img_size=32))
    x = images(32)
    outputs = model.train()(x)
    assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [(2, 5), (2, 5)]
    assert not torch.allclose(outputs[0], outputs[1])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), (outputs[0] + outputs[1]).detach() / 2)


def test_features_only_gives_the_mean_of_both_tokens() -> None:
    """num_classes=0 (pooled features), as timm: the average of the CLS and distillation tokens' features,
    in training mode too."""
    torch.manual_seed(0)
    ref = randomized(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0, depth=2)).eval()
    ours = create_model("deit_tiny_distilled_patch16_224", num_classes=0, depth=2)
    ours.load_state_dict(ref.state_dict())
    x = images()
    with torch.no_grad():
        features, expected = ours.eval()(x), ref(x)
        tokens = ours.forward_features(x)
        assert ours.train()(x).shape == (2, 192)
    assert features.shape == (2, 192)
    assert (features - expected).abs().max().item() <= 1e-5
    torch.testing.assert_close(features, (tokens[:, 0] + tokens[:, 1]) / 2)


def test_init_follows_timm() -> None:
    torch.manual_seed(0)
    model = create_model("deit_small_distilled_patch16_224", num_classes=10, depth=1)
    for tensor in (model.dist_token, model.pos_embed):
        assert abs(tensor.std().item() - 0.02) < 0.003 and tensor.abs().max().item() <= 2.0
    assert model.pos_embed.shape == (1, 14 * 14 + 2, 384)
    assert abs(model.head_dist.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(model.head_dist.bias) == 0


def test_no_weight_decay_and_head_names() -> None:
    model = create_model("deit_tiny_distilled_patch16_224", depth=1)
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    assert model.head_names == ("head", "head_dist")
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in model.head_names)


def test_reset_classifier_resets_both_heads() -> None:
    model = create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=1, img_size=32)
    model.reset_classifier(3)
    assert model.head.out_features == model.head_dist.out_features == 3
    assert model.eval()(images(32)).shape == (2, 3)
    model.reset_classifier(0)
    assert model.eval()(images(32)).shape == (2, 192)


def test_average_pooling_is_refused() -> None:
    with pytest.raises(ConfigError, match="set model.global_pool=token"):
        create_model("deit_tiny_distilled_patch16_224", global_pool="avg")


# --- position embeddings at another resolution (vitrain.models.convert, prefix tokens kept) ------------

def former_pos_embed_resample(pos: torch.Tensor, new: tuple, prefix: int, old: tuple) -> torch.Tensor:
    """vitrain's own resampling before it called timm: the patch positions as an image, bicubic, antialiased."""
    grid = pos[:, prefix:].reshape(1, *old, pos.shape[-1]).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)], 1)


@pytest.mark.parametrize("old,new,prefix,dtype", [
    ((14, 14), (24, 24), 1, torch.float32), ((14, 14), (8, 6), 2, torch.float32),
    ((8, 6), (14, 14), 0, torch.float32), ((14, 14), (10, 10), 1, torch.bfloat16),
])
def test_pos_embed_resampling_gives_the_former_numbers(old: tuple, new: tuple, prefix: int, dtype) -> None:
    """timm's resample_abs_pos_embed, as called, equals vitrain's former copy: max |diff| <= 1e-6 (0 in
    practice), prefix tokens kept bit for bit, for 0, 1 and 2 prefix tokens, rectangles and bfloat16."""
    pos = torch.randn(1, prefix + old[0] * old[1], 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = resample_pos_embed(pos, new, prefix, old_grid=None if old[0] == old[1] else old)
    expected = former_pos_embed_resample(pos, new, prefix, old)
    assert got.shape == (1, prefix + new[0] * new[1], 8) and got.dtype == dtype
    assert (got.float() - expected.float()).abs().max().item() <= 1e-6
    assert torch.equal(got[:, :prefix], pos[:, :prefix])


def test_pos_embed_of_a_non_square_grid_needs_its_size() -> None:
    with pytest.raises(ConfigError, match="pos_embed has 48 patch positions, not a square grid; pass old_grid"):
        resample_pos_embed(torch.zeros(1, 1 + 48, 4), 7)


def test_resample_pos_embed_equals_timm_when_shrinking_with_antialias() -> None:
    pos = torch.randn(1, 1 + 14 * 14, 8)
    ours = resample_pos_embed(pos, (8, 6), num_prefix_tokens=1)
    torch.testing.assert_close(ours, resample_abs_pos_embed(pos, [8, 6], num_prefix_tokens=1), atol=1e-6, rtol=0)
    assert resample_pos_embed(pos, 14, 1) is pos
    rect = resample_pos_embed(ours, 14, 1, old_grid=(8, 6))
    torch.testing.assert_close(rect, resample_abs_pos_embed(ours, [14, 14], [8, 6], 1), atol=1e-6, rtol=0)


# --- Swin's bias tables at another window (vitrain.models.convert), beside the position embeddings ------


def former_bias_table_resample(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """vitrain's own resampling before it called timm: each head's table as a (2w-1)^2 image, bicubic."""
    side, heads = math.isqrt(table.shape[0]), table.shape[1]
    image = F.interpolate(table.T.reshape(1, heads, side, side).float(), size=(2 * window[0] - 1, 2 * window[1] - 1),
                          mode="bicubic", align_corners=False)
    return image.reshape(heads, -1).T.contiguous().to(table.dtype)


@pytest.mark.parametrize("side,window,dtype", [(13, (12, 12), torch.float32), (13, (4, 4), torch.float32),
                                               (7, (4, 7), torch.float32), (13, (12, 12), torch.float16),
                                               (7, (12, 12), torch.bfloat16)])
def test_bias_table_resampling_gives_the_former_numbers(side: int, window: tuple, dtype: torch.dtype) -> None:
    """timm's resize_rel_pos_bias_table_simple, as called, equals vitrain's former copy: max |diff| <= 1e-6
    (0 in practice), also for a non-square window and in half precision (interpolated in float32)."""
    table = torch.randn(side * side, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    got, expected = resample_relative_position_bias_table(table, window), former_bias_table_resample(table, window)
    assert got.shape == expected.shape and got.dtype == dtype and got.is_contiguous()
    assert (got.float() - expected.float()).abs().max().item() <= 1e-6
    with pytest.raises(ConfigError, match="relative_position_bias_table has 12 rows, not the .* square window"):
        resample_relative_position_bias_table(torch.zeros(12, 2), 4)
