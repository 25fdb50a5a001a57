"""Swin Transformer (Liu et al., 2021, "Hierarchical Vision Transformer using Shifted Windows").

Self-attention runs inside non-overlapping windows of ``window_size`` x ``window_size`` tokens, so its
cost grows with the image area rather than its square. Every second block shifts the windows by half
a window (a cyclic roll plus a mask), which lets information cross window borders. Between stages,
patch merging halves the token grid and doubles the width: with patch 4, a pyramid of strides 4 to 32.

Parameter names and the state-dict layout follow timm's ``swin_transformer.py`` (patch merging at the
start of stages 1..3 as ``layers.N.downsample``, the classifier as ``head.fc``), so timm's weights load
strictly. Unlike timm, a grid that is not a whole number of windows is a ConfigError, not silent padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.swin_transformer import get_relative_position_index
from torch import nn

from vitrain.errors import ConfigError
from vitrain.models.heads import init_linear, new_classifier
from vitrain.models.layers import Mlp, PatchEmbed, run_blocks
from vitrain.models.registry import register_model

MASKED = -100.0  # the original code's additive mask value: after softmax, exp(-100) is negligible


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Cut a (B, H, W, C) grid into (B * num_windows, wh * ww, C) windows, row-major over windows."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/wh, W/ww, wh, ww, C)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, wh * ww, C) -> (B, H, W, C)."""
    wh, ww = window
    x = windows.view(-1, H // wh, W // ww, wh, ww, windows.shape[-1]).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, windows.shape[-1])


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """(N, N) row of the bias table for every (query, key) pair of a window of N = wh * ww tokens:
    timm's ``get_relative_position_index``. The offset (dy, dx) = query - key lies in
    [-(wh-1), wh-1] x [-(ww-1), ww-1]; it is shifted to start at 0 and numbered row-major, so the
    table has (2wh-1)(2ww-1) rows, as in the original code."""
    return get_relative_position_index(*window)


def _region_labels(size: int, window: int, shift: int) -> torch.Tensor:
    """Along one axis of the rolled grid: 0 and 1 for tokens that did not wrap, 2 for those that did."""
    labels = torch.zeros(size, dtype=torch.long)
    labels[size - window :] = 1  # the last window, where wrapped and unwrapped tokens meet
    labels[size - shift :] = 2  # rolled in from the opposite edge (empty when shift is 0)
    return labels


def shifted_window_mask(resolution: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Additive attention mask (num_windows, N, N) for windows over a grid rolled by ``-shift``.

    After the roll, the last row and column of windows hold tokens from opposite edges of the image;
    they were not neighbours, so they must not attend to each other: 0 within a region, -100 across.
    With no shift every window holds one region and the mask is all zeros.
    """
    rows = _region_labels(resolution[0], window[0], shift[0])
    cols = _region_labels(resolution[1], window[1], shift[1])
    labels = (rows[:, None] * 3 + cols[None, :]).float()  # (H, W): one of 3 x 3 regions
    labels = window_partition(labels[None, :, :, None], window).squeeze(-1)  # (num_windows, N)
    same = labels[:, :, None] == labels[:, None, :]
    return torch.zeros(same.shape).masked_fill(~same, MASKED)


def stage_resolutions(grid: tuple[int, int], num_stages: int) -> list[tuple[int, int]]:
    """Token grid of each stage: patch merging halves it, rounding up (an odd side is zero-padded)."""
    resolutions = [grid]
    for _ in range(num_stages - 1):
        resolutions.append(((resolutions[-1][0] + 1) // 2, (resolutions[-1][1] + 1) // 2))
    return resolutions


def stage_window(resolution: tuple[int, int], window_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(window, shift) of a stage: a side no larger than the window is one window, and is not shifted
    (a single window already sees every token; shifting it would only tear the image apart)."""
    (h, w), k = resolution, window_size
    return (min(h, k), min(w, k)), (0 if h <= k else k // 2, 0 if w <= k else k // 2)


def _side_fits(side: int, window_size: int) -> bool:
    """A stage side is whole windows, or a single (shrunk) window."""
    return side <= window_size or side % window_size == 0


def _fit_hint(img_size: tuple[int, int], patch_size: int, num_stages: int, window_size: int) -> str:
    """'use model.img_size=S or model.window_size=K': the next larger image and the nearest window that fit."""

    def fits(grid_side: int, window: int) -> bool:
        return all(_side_fits(r, window) for r, _ in stage_resolutions((grid_side, grid_side), num_stages))

    unit = patch_size * 2 ** (num_stages - 1) * window_size  # every multiple of it fits
    sides = [next(s for s in range(side, side + unit + 1, patch_size) if fits(s // patch_size, window_size))
             for side in img_size]
    hint = f"use model.img_size={sides[0] if sides[0] == sides[1] else sides}"
    grid = [side // patch_size for side in img_size]
    windows = sorted(range(2, max(grid) + 1), key=lambda k: (abs(k - window_size), k))
    fitting = [k for k in windows if all(fits(g, k) for g in grid)]
    return hint + (f" or model.window_size={fitting[0]}" if fitting else "")


def check_window_fit(img_size: tuple[int, int], patch_size: int, num_stages: int, window_size: int) -> None:
    """Raise a one-line ConfigError, with sizes that would work, when a stage is not whole windows
    (timm pads such grids with zeros instead; vitrain asks for a size that needs no padding)."""
    if window_size < 1:
        raise ConfigError(f"model.window_size must be positive, got {window_size}")
    grid = (img_size[0] // patch_size, img_size[1] // patch_size)
    for stage, (h, w) in enumerate(stage_resolutions(grid, num_stages)):
        if not (_side_fits(h, window_size) and _side_fits(w, window_size)):
            raise ConfigError(
                f"image size {img_size[0]}x{img_size[1]} gives a {h}x{w} grid at stage {stage + 1} (layers.{stage}), "
                f"not divisible by window {window_size}; {_fit_hint(img_size, patch_size, num_stages, window_size)}"
            )


class SwinPatchEmbed(PatchEmbed):
    """Patch embedding followed by LayerNorm, returning the token grid (B, H, W, C) as timm does."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H/p, W/p, D)
        x = super().forward(x)  # (B, N, D)
        return self.norm(x.reshape(x.shape[0], *self.grid_size, -1))


class WindowAttention(nn.Module):
    """Multi-head self-attention within each window, plus a learned bias per head and relative offset."""

    def __init__(
        self, dim: int, num_heads: int, window_size: tuple[int, int], qkv_bias: bool = True,
        attn_drop: float = 0.0, proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"stage width {dim} is not divisible by its num_heads {num_heads} (model.num_heads)")
        self.num_heads, self.head_dim, self.window_size = num_heads, dim // num_heads, window_size
        self.attn_drop = attn_drop
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        # derived from the window size, so not saved: timm's checkpoints do not hold it either
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self) -> torch.Tensor:  # (heads, N, N)
        N = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N * N, heads)
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B * nW, N, C) windows of B images; mask: (nW, N, N) additive, per window position."""
        BW, N, C = x.shape
        nW, h, d = mask.shape[0], self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(BW, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B * nW, h, N, d)
        # bias + mask for every window of every image, (B * nW, h, N, N), as timm builds it: one dense mask
        # lets the CPU kernels run their fast path (folding the windows into the heads to broadcast a
        # (1, nW * h, N, N) mask over the batch saves this memory but trains ~5% slower on the CPU)
        attn_mask = self.relative_position_bias()[None, None] + mask[None, :, None]  # (1, nW, h, N, N)
        attn_mask = attn_mask.expand(BW // nW, -1, -1, -1, -1).reshape(BW, h, N, N)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=self.attn_drop if self.training else 0.0
        )  # (B * nW, h, N, d)
        x = x.transpose(1, 2).reshape(BW, N, C)  # concatenate the heads
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(nn.Module):
    """Pre-norm block on a (B, H, W, C) grid: (shifted-)window attention, then an MLP, each residual."""

    def __init__(
        self, dim: int, num_heads: int, resolution: tuple[int, int], window_size: tuple[int, int],
        shift_size: tuple[int, int] = (0, 0), mlp_ratio: float = 4.0, qkv_bias: bool = True,
        proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.resolution, self.window_size, self.shift_size = resolution, window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.register_buffer("attn_mask", shifted_window_mask(resolution, window_size, shift_size), persistent=False)

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        H, W = x.shape[1:3]
        sh, sw = self.shift_size
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))  # windows move by half a window (a no-op if 0)
        x = self.attn(window_partition(x, self.window_size), self.attn_mask)  # (B * nW, N, C)
        x = window_reverse(x, self.window_size, H, W)
        return torch.roll(x, shifts=(sh, sw), dims=(1, 2))  # undo the shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        x = x + self.drop_path1(self.window_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve the grid, double the width: concatenate each 2x2 neighbourhood (4C), LayerNorm, Linear to 2C."""

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H/2, W/2, 2C)
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # an odd side gets a row/column of zeros
        x = x.reshape(B, (H + 1) // 2, 2, (W + 1) // 2, 2, C)
        # channel order of the original code: (top-left, bottom-left, top-right, bottom-right)
        x = x.permute(0, 1, 3, 4, 2, 5).flatten(3)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    """Patch merging (all stages but the first), then blocks alternating plain and shifted windows."""

    def __init__(
        self, dim: int, out_dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
        downsample: bool, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
        attn_drop: float = 0.0, drop_path: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        window, shift = stage_window(resolution, window_size)
        drop_path = drop_path or [0.0] * depth
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, num_heads, resolution, window, shift if i % 2 else (0, 0),
                                 mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path[i])
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H', W', C')
        return run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing)


class ClassifierHead(nn.Module):
    """Global average pool over the grid, dropout, linear classifier (``fc``; Identity for 0 classes)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # (B, H, W, C) -> (B, classes)
        x = self.drop(x.mean(dim=(1, 2)))
        return x if pre_logits else self.fc(x)


class SwinTransformer(nn.Module):
    """Swin with timm's parameter names, so timm's Swin checkpoints load unchanged.

    ``drop_rate`` is the dropout inside the attention projection and the MLPs and before the head (one
    knob, as in vitrain's ViT); ``drop_path_rate`` is the stochastic depth of the last block, growing
    linearly from 0 over all blocks. The image size must give every stage a whole number of windows.
    """

    head_names = ("head",)  # module paths of the classifier, which gets its own learning rate

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ConfigError(f"model.depths has {len(depths)} stages but model.num_heads has {len(num_heads)}")
        self.num_classes, self.embed_dim, self.num_layers = num_classes, embed_dim, len(depths)
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        self.patch_embed = SwinPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        check_window_fit(self.patch_embed.img_size, patch_size, self.num_layers, window_size)
        resolutions = stage_resolutions(self.patch_embed.grid_size, self.num_layers)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(1, total - 1) for i in range(total)]  # grows linearly with depth
        self.layers = nn.Sequential(*[
            SwinTransformerStage(
                embed_dim * 2 ** max(i - 1, 0), embed_dim * 2**i, resolutions[i], depths[i], num_heads[i],
                window_size, downsample=i > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
            )
            for i in range(self.num_layers)
        ])
        self.norm = nn.LayerNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's Swin init: truncated normal (std 0.02) for linears and the relative position bias
        tables, zero biases, PyTorch's defaults for the patch conv and the LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear(m)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the relative position bias tables, which weight decay would pull towards
        "no positional preference" (biases and norms the optimizer recognises by shape)."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (timm's switch): less memory, bigger batches."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head's linear layer with a fresh one for a new task (fine-tuning)."""
        self.num_classes = num_classes
        self.head.fc = new_classifier(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H', W', num_features)
        x = self.patch_embed(x)  # (B, H/p, W/p, embed_dim)
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)  # (B, H', W', D) -> (B, num_classes) or (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(x))


def _create(overrides: dict[str, Any], **defaults: Any) -> SwinTransformer:
    return SwinTransformer(**{**defaults, **overrides})


# ImageNet sizes, as in the paper and timm.
@register_model
def swin_tiny_patch4_window7_224(**kwargs: Any) -> SwinTransformer:
    return _create(kwargs, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))


@register_model
def swin_small_patch4_window7_224(**kwargs: Any) -> SwinTransformer:
    return _create(kwargs, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))


@register_model
def swin_base_patch4_window7_224(**kwargs: Any) -> SwinTransformer:
    return _create(kwargs, patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


@register_model
def swin_base_patch4_window12_384(**kwargs: Any) -> SwinTransformer:
    return _create(kwargs, img_size=384, patch_size=4, window_size=12, embed_dim=128, depths=(2, 2, 18, 2),
                   num_heads=(4, 8, 16, 32))


@register_model
def swin_large_patch4_window7_224(**kwargs: Any) -> SwinTransformer:
    return _create(kwargs, patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


@register_model
def swin_large_patch4_window12_384(**kwargs: Any) -> SwinTransformer:
    return _create(kwargs, img_size=384, patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
                   num_heads=(6, 12, 24, 48))


# Small-image variant for training from scratch on tiny data (digits) on a CPU; timm has no such size.
@register_model
def swin_nano_patch2_window4_32(**kwargs: Any) -> SwinTransformer:
    """A 1.3M-parameter, three-stage Swin for 32x32 inputs: patch 2 gives a 16x16 grid of 4x4 windows,
    then 8x8 and 4x4 (one window, no shift). About 5 s per epoch of digits (batch 32) on two CPU cores."""
    return _create(kwargs, img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 2),
                   num_heads=(3, 6, 12), drop_path_rate=0.0)
