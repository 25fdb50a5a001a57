"""Building blocks shared by vitrain's transformers: patch embedding, attention, MLP, encoder block.

Parameter names follow timm (``patch_embed.proj``, ``attn.qkv``, ``mlp.fc1``, ...), so timm
checkpoints map onto these modules without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, to_2tuple
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitrain.errors import ConfigError


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
    """Apply ``blocks`` in order. With ``grad_checkpointing`` (and gradients on), each block's activations
    are recomputed in the backward pass instead of stored: memory of one block instead of all, for about
    a third more compute. The RNG state is replayed, so dropout and drop path draw the same masks."""
    if not (grad_checkpointing and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping ``patch_size`` squares and project each to ``embed_dim``.

    A Conv2d with kernel = stride = patch size is exactly "flatten each patch, apply one shared
    linear map", computed without materialising the patches.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        if any(s % p for s, p in zip(self.img_size, self.patch_size, strict=True)):
            raise ConfigError(
                f"image size {self.img_size[0]}x{self.img_size[1]} is not divisible by the patch "
                f"size {self.patch_size[0]}; set model.img_size to a multiple of it"
            )
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])}, the model was built for {self.img_size}")
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # concatenate the heads
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer encoder block: x + Attn(LN(x)), then x + MLP(LN(x)), each with drop path.

    ``init_values`` turns on LayerScale (Touvron et al., 2021, CaiT; used by DeiT III): each branch's output
    is multiplied by a learned per-channel ``gamma`` (``ls1.gamma``, ``ls2.gamma``) that starts at
    ``init_values``, so a deep network starts close to the identity. Off (None), ``ls1``/``ls2`` are Identity.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
