"""Swin: timm parity (weights and logits), the shifted-window mask, window shrinking, sizes, errors, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from timm.models import swin_transformer as timm_swin

from vitrain.errors import ConfigError
from vitrain.models import create_model, list_models, swin
from vitrain.models.swin import (
    MASKED,
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    stage_window,
    window_partition,
    window_reverse,
)
from vitrain.optim import param_groups

VARIANTS = list_models("swin_*")
NANO = "swin_nano_patch2_window4_32"


def shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def test_registry_lists_timms_names_and_the_small_image_variant() -> None:
    assert {"swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
            "swin_base_patch4_window12_384", "swin_large_patch4_window7_224", "swin_large_patch4_window12_384",
            NANO} <= set(VARIANTS)


# --- parity with timm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                                  "swin_base_patch4_window12_384",
                                  pytest.param("swin_large_patch4_window12_384", marks=pytest.mark.slow)])
def test_timm_checkpoint_loads_strictly_and_gives_the_same_logits(name: str, tmp_path: Path) -> None:
    """Full depth at the variant's own resolution: timm's state dict, saved and reloaded as a file with
    ``weights_only=True``, loads strictly (no buffers missing or extra) and the eval logits agree."""
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    torch.save(ref.state_dict(), tmp_path / "swin.pth")
    ours = create_model(name).eval()
    ours.load_state_dict(torch.load(tmp_path / "swin.pth", weights_only=True), strict=True)
    via_factory = create_model(name, checkpoint=tmp_path / "swin.pth").eval()
    size = ref.patch_embed.img_size
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = ref(x)
        diff = (ours(x) - expected).abs().max().item()
        diff_factory = (via_factory(x) - expected).abs().max().item()
    assert diff <= 1e-4 and diff_factory <= 1e-4


@pytest.mark.parametrize("name", ["swin_base_patch4_window12_384", "swin_large_patch4_window12_384"])
def test_384_variant_gives_timms_logits_at_reduced_depth(name: str, tmp_path: Path) -> None:
    """Full width, heads, window 12 and 384x384 grids (96, 48, 24, 12), two blocks per stage (both constructors
    take depths), noise on every parameter: timm's file loads strictly and the logits agree (max |diff| <= 1e-4)."""
    torch.manual_seed(0)
    ref = timm.create_model(name, depths=(2, 2, 2, 2)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        torch.save(ref.state_dict(), tmp_path / "swin.pth")
        ours = create_model(name, depths=(2, 2, 2, 2), checkpoint=tmp_path / "swin.pth").eval()
        x = torch.randn(1, 3, 384, 384)
        logits, expected = ours(x), ref(x)
    assert logits.shape == (1, 1000) and logits.abs().max().item() > 0.1
    assert (logits - expected).abs().max().item() <= 1e-4


def test_torchvision_swin_t_file_gives_torchvision_logits(tmp_path: Path) -> None:
    """torchvision's swin_t with random weights, saved, loaded into ours with create_model(checkpoint=...)."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.swin_t(weights=None).eval()
    with torch.no_grad():
        for p in tv.parameters():  # noise everywhere, so that zero-initialised biases and tables matter
            p.add_(torch.randn_like(p) * 0.02)
    torch.save(tv.state_dict(), tmp_path / "swin_t.pth")
    ours = create_model("swin_tiny_patch4_window7_224", checkpoint=tmp_path / "swin_t.pth").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - tv(x)).abs().max().item() <= 1e-4


def test_timm_parity_with_odd_grids_and_shrunk_windows() -> None:
    """40x40 with window 5 and 4 stages: grids 10, 5, 3, 2, so patch merging pads an odd side and the last
    three stages shrink their window to the grid (no shift). Reduced width and depth keep it fast."""
    torch.manual_seed(0)
    args = dict(img_size=40, window_size=5, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), num_classes=7)
    ref = timm_swin.SwinTransformer(**args).eval()
    ours = SwinTransformer(**args).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for ours_stage, ref_stage in zip(ours.layers, ref.layers, strict=True):
        for a, b in zip(ours_stage.blocks, ref_stage.blocks, strict=True):
            assert (a.window_size, a.shift_size) == (tuple(b.window_size), tuple(b.shift_size))
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_has_timms_parameter_shapes(name: str) -> None:
    """Built on the meta device (no memory, no compute). timm has no nano size: compared with timm's
    SwinTransformer built with the same arguments."""
    with torch.device("meta"):
        ours = create_model(name, num_classes=10)
        if name in timm.list_models("swin_*"):
            ref = timm.create_model(name, pretrained=False, num_classes=10)
        else:
            ref = timm_swin.SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2),
                                            num_heads=(3, 6, 12), num_classes=10)
    assert shapes(ours) == shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert ours.no_weight_decay() == ref.no_weight_decay()


# --- windows and the shifted-window mask ----------------------------------------------------------------


def test_window_partition_numbers_and_round_trip() -> None:
    x = torch.arange(2 * 6 * 8 * 3, dtype=torch.float32).view(2, 6, 8, 3)
    windows = window_partition(x, (3, 4))  # (2 * 2 * 2, 12, 3)
    assert windows.shape == (8, 12, 3)
    torch.testing.assert_close(windows[1], x[0, 0:3, 4:8].reshape(12, 3))  # first image, window (row 0, col 1)
    torch.testing.assert_close(windows[6], x[1, 3:6, 0:4].reshape(12, 3))  # second image, window (row 1, col 0)
    torch.testing.assert_close(window_reverse(windows, (3, 4), 6, 8), x)


def test_relative_position_index_numbers_offsets() -> None:
    """Pairs with the same (dy, dx) share a table row, different offsets get different rows, rows fill the table."""
    wh, ww = 3, 4
    index = relative_position_index((wh, ww))
    coords = [(y, x) for y in range(wh) for x in range(ww)]
    rows: dict[tuple[int, int], int] = {}
    for i, (qy, qx) in enumerate(coords):
        for j, (ky, kx) in enumerate(coords):
            assert rows.setdefault((qy - ky, qx - kx), int(index[i, j])) == int(index[i, j])
    assert sorted(rows.values()) == list(range((2 * wh - 1) * (2 * ww - 1)))
    assert rows[(-(wh - 1), -(ww - 1))] == 0 and rows[(0, 0)] == (wh - 1) * (2 * ww - 1) + ww - 1
    torch.testing.assert_close(index, timm_swin.get_relative_position_index(wh, ww))


def brute_force_mask(resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Roll the grid of original coordinates exactly as the block rolls the tokens, cut it into windows, and
    let two tokens of a window attend iff they were within one window of each other in the image itself."""
    H, W = resolution
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([ys, xs], dim=-1).float()[None]  # (1, H, W, 2): where each token came from
    coords = torch.roll(coords, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    coords = window_partition(coords, window)  # (nW, N, 2)
    N = coords.shape[1]
    mask = torch.zeros(coords.shape[0], N, N)
    for w in range(coords.shape[0]):
        for i in range(N):
            for j in range(N):
                dy, dx = (coords[w, i] - coords[w, j]).abs().tolist()
                if dy >= window[0] or dx >= window[1]:
                    mask[w, i, j] = MASKED
    return mask


@pytest.mark.parametrize(("resolution", "window", "shift"), [
    ((8, 8), (4, 4), (2, 2)), ((14, 14), (7, 7), (3, 3)), ((12, 8), (4, 4), (2, 2)), ((8, 3), (4, 3), (2, 0)),
])
def test_shifted_window_mask_equals_brute_force_and_timm(resolution, window, shift) -> None:
    mask = shifted_window_mask(resolution, window, shift)
    torch.testing.assert_close(mask, brute_force_mask(resolution, window, shift), atol=0, rtol=0)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    ref = timm_swin.SwinTransformerBlock(dim=8, input_resolution=resolution, num_heads=2, window_size=window,
                                         shift_size=shift).attn_mask
    torch.testing.assert_close(mask, ref, atol=0, rtol=0)


def test_unshifted_mask_is_all_zeros_and_only_border_windows_are_masked() -> None:
    assert torch.count_nonzero(shifted_window_mask((8, 8), (4, 4), (0, 0))) == 0
    mask = shifted_window_mask((8, 8), (4, 4), (2, 2))  # windows in row-major order: 0 1 / 2 3
    assert torch.count_nonzero(mask[0]) == 0  # the top-left window holds one region of the image
    # the bottom-right window holds four regions of 2x2 tokens: each token sees its own 4 of the 16
    assert ((mask[3] == 0).sum(dim=-1) == 4).all()


def shifted_block() -> SwinTransformerBlock:
    torch.manual_seed(0)
    return SwinTransformerBlock(dim=16, num_heads=2, resolution=(8, 8), window_size=(4, 4), shift_size=(2, 2)).eval()


def influence_of_top_left_on_bottom_right(block: SwinTransformerBlock) -> float:
    """How much the output token (7, 7) changes when the input token (0, 0) changes. The roll puts both in
    the same window; they are at opposite corners of the image, so a correct block keeps them apart."""
    x = torch.randn(1, 8, 8, 16)
    moved = x.clone()
    moved[0, 0, 0] += 3.0 * torch.randn(16)  # random: a constant shift would vanish in the LayerNorm
    with torch.no_grad():
        return (block(moved)[0, 7, 7] - block(x)[0, 7, 7]).abs().max().item()


def test_the_mask_stops_wrapped_tokens_from_attending_each_other() -> None:
    block = shifted_block()
    assert influence_of_top_left_on_bottom_right(block) < 1e-6
    block.attn_mask = torch.zeros_like(block.attn_mask)  # rolling without the mask: the corners leak
    assert influence_of_top_left_on_bottom_right(block) > 1e-2


def test_shifted_block_with_mask_differs_from_rolling_alone() -> None:
    block = shifted_block()
    x = torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        masked = block(x)
        block.attn_mask = torch.zeros_like(block.attn_mask)
        unmasked = block(x)
    assert (masked - unmasked).abs().max() > 1e-3
    # after the roll by -2 only the first window holds no wrapped tokens: image rows and columns 2..5
    torch.testing.assert_close(masked[:, 2:6, 2:6], unmasked[:, 2:6, 2:6])


def test_window_attention_equals_per_window_textbook_formula() -> None:
    """softmax(q k^T / sqrt(d) + bias + mask) v, per window and head, for a batch of several images."""
    torch.manual_seed(0)
    attn = WindowAttention(dim=16, num_heads=2, window_size=(2, 2)).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table)
    mask = shifted_window_mask((4, 4), (2, 2), (1, 1))  # (4, 4, 4)
    x = torch.randn(3 * 4, 4, 16)  # 3 images x 4 windows, 4 tokens each
    q, k, v = (t.reshape(12, 4, 2, 8).transpose(1, 2) for t in attn.qkv(x).chunk(3, dim=-1))  # (12, h, N, d)
    bias = attn.relative_position_bias()  # (h, N, N)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8) + bias + mask.repeat(3, 1, 1)[:, None]
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(12, 4, 16))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask), expected, atol=1e-5, rtol=1e-5)


def test_patch_merging_uses_the_original_channel_order() -> None:
    """cat(x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) -> LayerNorm -> Linear (the paper's code)."""
    torch.manual_seed(0)
    merge = PatchMerging(dim=4)
    x = torch.randn(2, 6, 4, 4)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)))
    assert merge(x).shape == (2, 3, 2, 8)


# --- window shrinking, the small-image variant ----------------------------------------------------------


def test_window_shrinks_and_shift_turns_off_when_the_grid_fits_in_one_window() -> None:
    assert stage_window((14, 14), 7) == ((7, 7), (3, 3))
    assert stage_window((7, 7), 7) == ((7, 7), (0, 0))  # equal: one window, nothing to shift
    assert stage_window((4, 4), 7) == ((4, 4), (0, 0))
    assert stage_window((8, 3), 4) == ((4, 3), (2, 0))  # per side
    model = create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2))  # grids 56, 28, 14, 7
    last = model.layers[3].blocks[1]
    assert (last.window_size, last.shift_size) == ((7, 7), (0, 0))
    assert torch.count_nonzero(last.attn_mask) == 0
    assert model.layers[2].blocks[1].shift_size == (3, 3)


def test_nano_variant_shapes_and_windows() -> None:
    model = create_model(NANO, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (4, 10)
        assert model.forward_features(x).shape == (4, 4, 4, 192)  # NHWC after the final norm
    windows = [(b.window_size, b.shift_size) for stage in model.layers for b in stage.blocks]
    assert windows == [((4, 4), (0, 0)), ((4, 4), (2, 2))] * 2 + [((4, 4), (0, 0))] * 2
    assert 1.2e6 < sum(p.numel() for p in model.parameters()) < 1.35e6


def test_nano_variant_learns_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = create_model(NANO, num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 4
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --- the model surface ----------------------------------------------------------------------------------


def test_num_classes_zero_gives_pooled_features_and_pre_logits_match() -> None:
    torch.manual_seed(0)
    model = create_model(NANO, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled, model.forward_features(x).mean(dim=(1, 2)))
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
    assert create_model(NANO, num_classes=0)(x).shape == (2, 192)


def test_reset_classifier_and_get_classifier() -> None:
    model = create_model(NANO, num_classes=10)
    model.reset_classifier(3)
    assert model.get_classifier() is model.head.fc
    assert model.head.fc.out_features == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert model.head_names == ("head",)


def test_no_weight_decay_names_every_bias_table_and_the_optimizer_honours_it() -> None:
    model = create_model(NANO)
    names = model.no_weight_decay()
    assert len(names) == 6 and names <= dict(model.named_parameters()).keys()
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, head=model.head_names)}
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    assert all(id(p) in no_decay for n, p in model.named_parameters() if n in names)
    assert {id(p) for p in groups["head"]["params"]} == {id(model.head.fc.weight)}


def test_init_follows_timm() -> None:
    torch.manual_seed(0)
    model = create_model("swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2))
    qkv = model.layers[2].blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.002 and qkv.abs().max().item() <= 2.0
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert abs(table.std().item() - 0.02) < 0.004
    assert torch.count_nonzero(model.head.fc.bias) == 0
    assert model.layers[1].downsample.reduction.bias is None
    assert isinstance(model.layers[0].downsample, torch.nn.Identity)  # timm merges at the start of stages 1..3


def test_drop_path_grows_with_depth_and_is_random_only_in_training() -> None:
    torch.manual_seed(0)
    model = create_model(NANO, num_classes=3, drop_path_rate=0.5)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
             for stage in model.layers for b in stage.blocks]
    assert rates == pytest.approx([0.5 * i / 5 for i in range(6)])
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_variant_defaults_take_overrides() -> None:
    model = swin.swin_tiny_patch4_window7_224(img_size=112, window_size=7, depths=(1, 1, 1, 1), num_classes=2)
    assert model.patch_embed.img_size == (112, 112) and len(model.layers[2].blocks) == 1
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 2)


# --- errors ---------------------------------------------------------------------------------------------


def test_grid_not_divisible_by_window_names_the_settings_and_sizes_that_work() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("swin_tiny_patch4_window7_224", img_size=40)
    assert str(info.value) == ("image size 40x40 gives a 10x10 grid at stage 1 (layers.0), not divisible by "
                               "window 7; use model.img_size=56 or model.window_size=5")
    create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 1, 1))  # both suggestions work
    create_model("swin_tiny_patch4_window7_224", img_size=40, window_size=5, depths=(1, 1, 1, 1))


def test_a_later_stage_that_does_not_fit_is_reported_with_its_stage() -> None:
    with pytest.raises(ConfigError, match=r"image size 96x96 gives a 12x12 grid at stage 2 \(layers.1\), not "
                                          r"divisible by window 8; use model.img_size=128"):
        SwinTransformer(img_size=96, patch_size=4, window_size=8, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 4))


def test_image_not_divisible_by_patch_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="not divisible by the patch size 4; set model.img_size"):
        create_model("swin_tiny_patch4_window7_224", img_size=222)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(window_size=0), "model.window_size must be positive"),
    (dict(num_heads=(3, 6, 12)), "model.depths has 4 stages but model.num_heads has 3"),
    (dict(num_heads=(5, 6, 12, 24)), "not divisible by its num_heads 5"),
])
def test_other_bad_settings_are_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model("swin_tiny_patch4_window7_224", **overrides)


def test_wrong_input_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="built for"):
        create_model(NANO)(torch.randn(1, 3, 64, 64))
