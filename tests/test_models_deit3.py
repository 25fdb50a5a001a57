"""DeiT III: the variants have timm's names and shapes, timm's weights give timm's logits at 224 and 384 (and at
another resolution, position embedding resampled without prefix positions), LayerScale, uniform drop path, the
official release layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from test_convert import randomized  # noise on every weight, for parity tests
from timm.layers import LayerScale, resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from vitrain.errors import ConfigError
from vitrain.models import VisionTransformer, create_model, list_models
from vitrain.models.convert import LoadReport, convert_state_dict, load_pretrained

VARIANTS = ["deit3_small_patch16_224", "deit3_base_patch16_224", "deit3_large_patch16_224", "deit3_huge_patch14_224",
            "deit3_small_patch16_384", "deit3_base_patch16_384", "deit3_large_patch16_384", "deit3_medium_patch16_224"]


def images(size: int = 224, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def timm_deit3(name: str, **kwargs) -> torch.nn.Module:
    """timm's model with random weights; LayerScale's gamma drawn in [0.5, 1.5] so that every block counts
    (at timm's 1e-6 init, plus noise, the blocks would barely change the logits)."""
    torch.manual_seed(0)
    model = randomized(timm.create_model(name, **kwargs))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(".gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def max_logit_diff(ours: torch.nn.Module, ref: torch.nn.Module, size: int) -> float:
    x = images(size, n=1)
    with torch.no_grad():
        logits, expected = ours.eval()(x), ref.eval()(x)
    assert logits.shape == expected.shape and expected.abs().max().item() > 0.1
    return (logits - expected).abs().max().item()


def test_registry_lists_timms_deit3_names() -> None:
    assert set(VARIANTS) == set(list_models("deit3_*")) <= set(timm.list_models("deit3_*"))


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_has_timms_parameter_names_and_shapes(name: str) -> None:
    """Built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        ours = create_model(name, num_classes=1000)
        ref = timm.create_model(name, pretrained=False, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert isinstance(ours, VisionTransformer) and ours.no_embed_class
    assert ours.pos_embed.shape[1] == ours.patch_embed.num_patches  # no position for the CLS token


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "deit3_small_patch16_384"])
def test_timm_weights_via_file_give_timms_logits(tmp_path: Path, name: str) -> None:
    """timm's model -> file -> load_pretrained (model.checkpoint): nothing missing, extra or resampled, the same
    tensors as a strict load_state_dict, the same eval logits within 1e-5 (0 measured). Full width and grid,
    two blocks."""
    ref = timm_deit3(name, depth=2)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    ours = create_model(name, depth=2)
    assert load_pretrained(ours, tmp_path / "w.pth") == LoadReport([], [], [])
    loaded = ours.state_dict()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert all(torch.equal(loaded[k], v) for k, v in ours.state_dict().items())
    assert max_logit_diff(ours, ref, ref.patch_embed.img_size[0]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "deit3_small_patch16_384"])
def test_timm_weights_give_timms_logits_at_full_depth(name: str) -> None:
    ref = timm_deit3(name)
    ours = create_model(name)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert max_logit_diff(ours, ref, ref.patch_embed.img_size[0]) <= 1e-5


@pytest.mark.parametrize("size", [384, 128])
def test_pretrained_weights_at_another_resolution_resample_as_timm(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """model.pretrained=true with model.img_size != 224: timm's 224 weights (fetched through timm, here a random
    model) are resampled without prefix positions (resample_abs_pos_embed, num_prefix_tokens=0), as timm's
    own filter does for a deit3 model at that size; the logits match timm's within 1e-5."""
    source = timm_deit3("deit3_small_patch16_224", depth=2)
    monkeypatch.setattr("vitrain.hub.hub_online", lambda *args: True)  # the download is this lambda
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False: source if pretrained else None)
    ours = create_model("deit3_small_patch16_224", img_size=size, depth=2, pretrained=True)
    monkeypatch.undo()
    grid = size // 16
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [grid, grid], num_prefix_tokens=0)
    assert ours.pos_embed.shape == (1, grid * grid, 384)
    torch.testing.assert_close(ours.pos_embed.detach(), expected, atol=0, rtol=0)
    ref = timm.create_model("deit3_small_patch16_224", img_size=size, depth=2)
    ref.load_state_dict(checkpoint_filter_fn(source.state_dict(), ref, adapt_layer_scale=True))
    assert max_logit_diff(ours, ref, size) <= 1e-5


def test_official_release_layout_loads(tmp_path: Path) -> None:
    """DeiT III's own files ({"model": ...}, LayerScale as blocks.N.gamma_1/gamma_2) load as timm's filter
    renames them, and give the same logits."""
    ref = timm_deit3("deit3_small_patch16_224", depth=2)
    release = {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
               for k, v in ref.state_dict().items()}
    assert "blocks.1.gamma_2" in release
    torch.save({"model": release}, tmp_path / "deit_3_small_224_1k.pth")
    ours = create_model("deit3_small_patch16_224", depth=2)
    assert convert_state_dict({"model": release}, ours).keys() == checkpoint_filter_fn(
        release, ref, adapt_layer_scale=True).keys() == ref.state_dict().keys()
    assert load_pretrained(ours, tmp_path / "deit_3_small_224_1k.pth") == LoadReport([], [], [])
    assert max_logit_diff(ours, ref, 224) <= 1e-5


@pytest.mark.parametrize("source,target", [("vit_small_patch16_224", "deit3_small_patch16_224"),
                                           ("deit3_small_patch16_224", "vit_small_patch16_224")])
def test_pos_embed_with_and_without_cls_position_do_not_mix(source: str, target: str) -> None:
    """A ViT file (197 positions) into a DeiT III model (196), or the reverse: one line naming the difference."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in timm.create_model(source, depth=1).state_dict().items()}
    with pytest.raises(ConfigError, match="pos_embed has positions for [01] prefix tokens .* set model.name"):
        load_pretrained(create_model(target, depth=1, img_size=64), {k: torch.zeros(s) for k, s in shapes.items()})


def test_layer_scale_starts_at_the_official_1e_4_and_scales_each_branch() -> None:
    model = create_model("deit3_small_patch16_224", depth=2, img_size=32).eval()
    block = model.blocks[0]
    assert isinstance(block.ls1, LayerScale) and isinstance(block.ls2, LayerScale)
    assert torch.equal(block.ls1.gamma, torch.full((384,), 1e-4))
    x = torch.randn(2, 5, 384)
    with torch.no_grad():
        for ls in (block.ls1, block.ls2):
            ls.gamma.zero_()
        torch.testing.assert_close(block(x), x)  # gamma = 0: the block is the identity
    vit = create_model("vit_small_patch16_224", depth=1, img_size=32)
    assert isinstance(vit.blocks[0].ls1, torch.nn.Identity) and not any(".ls" in k for k in vit.state_dict())


def test_position_embedding_is_added_to_the_patches_before_the_cls_token() -> None:
    model = randomized(create_model("deit3_small_patch16_224", depth=1, img_size=32))
    patches = torch.randn(2, 4, 384)
    tokens = model._pos_embed(patches)
    assert tokens.shape == (2, 5, 384)
    assert torch.equal(tokens[:, 0], model.cls_token[:, 0].expand(2, -1))
    assert torch.equal(tokens[:, 1:], patches + model.pos_embed)


def test_drop_path_is_the_same_in_every_block() -> None:
    """DeiT III's models_v2.py: every block drops with drop_path_rate; ViT (and timm's deit3) rise linearly."""
    with torch.device("meta"):
        deit3 = create_model("deit3_small_patch16_224", drop_path_rate=0.1)
        linear = create_model("deit3_small_patch16_224", drop_path_rate=0.1, drop_path_uniform=False)
        ref = timm.create_model("deit3_small_patch16_224", drop_path_rate=0.1)
    rates = [[getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks] for m in (deit3, linear, ref)]
    assert rates[0] == [0.1] * 12 and [b.drop_path2.drop_prob for b in deit3.blocks] == [0.1] * 12
    assert rates[1] == pytest.approx(rates[2]) and rates[1][0] == 0 and rates[1][-1] == pytest.approx(0.1)


def test_distilled_deit_refuses_no_embed_class() -> None:
    with pytest.raises(ConfigError, match="set model.no_embed_class=false"):
        create_model("deit_tiny_distilled_patch16_224", depth=1, no_embed_class=True)
