"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words").

The image is cut into patches, each patch becomes a token, a learnable CLS token is prepended,
a learnable position embedding is added, and a stack of pre-norm encoder blocks mixes the tokens.
The classifier reads the CLS token after a final LayerNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitrain.models.heads import init_linear, new_classifier
from vitrain.models.layers import Block, PatchEmbed, run_blocks
from vitrain.models.registry import register_model


class VisionTransformer(nn.Module):
    """ViT with timm's parameter names, so timm's ViT checkpoints load unchanged."""

    head_names = ("head",)  # module paths of the classifier (given the head learning rate)

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        init_values: float | None = None,
        no_embed_class: bool = False,
        drop_path_uniform: bool = False,
    ) -> None:
        """``init_values``: LayerScale's initial gamma (None: no LayerScale). ``no_embed_class``: the position
        embedding covers the patches only and the CLS token gets none (DeiT III). ``drop_path_uniform``: every
        block drops with ``drop_path_rate`` (DeiT III) instead of a rate rising linearly from 0."""
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.num_classes, self.embed_dim, self.global_pool = num_classes, embed_dim, global_pool
        self.num_prefix_tokens = 1  # the CLS token
        self.no_embed_class = no_embed_class  # timm's name: convert.py and timm's weight filter read it
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        positions = self.patch_embed.num_patches + (0 if no_embed_class else 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate if drop_path_uniform else drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], init_values)
            for i in range(depth)
        ])
        # As in timm (and MAE/BEiT): with average pooling the final norm moves after the pooling.
        avg = global_pool == "avg"
        self.norm = nn.Identity() if avg else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if avg else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default ViT init: truncated normal (std 0.02) for linears and the position
        embedding, a near-zero CLS token, zero biases, PyTorch's default for the patch conv."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear(m)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay would only harm (besides biases and norms, which the
        optimizer recognises by shape)."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (timm's switch): less memory, bigger batches."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for a new task (fine-tuning)."""
        self.num_classes = num_classes
        self.head = new_classifier(self.embed_dim, num_classes)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.no_embed_class:  # DeiT III: add the patches' positions, then prepend the CLS token
            return self.pos_drop(torch.cat([cls, x + self.pos_embed], dim=1))
        return self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        x = self._pos_embed(x)  # (B, 1 + N, D)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # (B, 1 + N, D) -> (B, D): the CLS token, or the mean of the patch tokens
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(x))


def _create(defaults: dict[str, Any], **kwargs: Any) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **kwargs})


# ImageNet sizes, as in the paper and timm.
@register_model
def vit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _create(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _create(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def vit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _create(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def vit_base_patch32_224(**kwargs: Any) -> VisionTransformer:
    return _create(dict(patch_size=32, embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def vit_large_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _create(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs)


@register_model
def vit_huge_patch14_224(**kwargs: Any) -> VisionTransformer:
    return _create(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), **kwargs)


# The same sizes at 384x384, timm's names (the resolution of the papers' fine-tuned weights).
@register_model
def vit_tiny_patch16_384(**kwargs: Any) -> VisionTransformer:
    return _create(dict(img_size=384, patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_small_patch16_384(**kwargs: Any) -> VisionTransformer:
    return _create(dict(img_size=384, patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def vit_base_patch16_384(**kwargs: Any) -> VisionTransformer:
    return _create(dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def vit_base_patch32_384(**kwargs: Any) -> VisionTransformer:
    return _create(dict(img_size=384, patch_size=32, embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def vit_large_patch16_384(**kwargs: Any) -> VisionTransformer:
    return _create(dict(img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs)


@register_model
def vit_large_patch32_384(**kwargs: Any) -> VisionTransformer:
    return _create(dict(img_size=384, patch_size=32, embed_dim=1024, depth=24, num_heads=16), **kwargs)


# Small-image variants for training from scratch on 32x32 data (CIFAR) and tiny data (digits).
@register_model
def vit_tiny_patch4_32(**kwargs: Any) -> VisionTransformer:
    return _create(dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_small_patch4_32(**kwargs: Any) -> VisionTransformer:
    return _create(dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def vit_nano_patch4_16(**kwargs: Any) -> VisionTransformer:
    """A 0.3M-parameter ViT for 16x16 inputs: trains on CPU in about a minute (the digits default)."""
    return _create(dict(img_size=16, patch_size=4, embed_dim=64, depth=6, num_heads=4), **kwargs)
