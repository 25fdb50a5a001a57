"""The math behind ``python -m vitrain.visualize``: attention weights, attention rollout, position-embedding
similarity and Grad-CAM, as plain tensor functions (no drawing, no Hydra).

Token layout: ``num_prefix_tokens`` extra tokens (CLS, then DeiT's distillation token) come before the
patch tokens, which are numbered row-major over the patch grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitrain.schema import HEAD_FUSIONS


def attention_weights(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ · scale) of an attention module for its input ``x`` (B, N, C): (B, heads, N, N).

    Recomputed from the module's own ``qkv`` projection (and timm's ``q_norm``/``k_norm`` when present),
    so the model keeps its fused kernel, which never materialises the weights. ``scale`` defaults to
    1/sqrt(head_dim), the scale of PyTorch's scaled_dot_product_attention.
    """
    B, N, _ = x.shape
    heads = attn.num_heads
    head_dim = attn.qkv.out_features // (3 * heads)
    q, k, _ = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    scale = getattr(attn, "scale", head_dim**-0.5)
    return (q.float() * scale @ k.float().transpose(-2, -1)).softmax(dim=-1)


def fuse_heads(attention: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N): the mean, max or min over the heads."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")


def attention_rollout(attentions: list[torch.Tensor], head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) of a stack of layers' attentions, each (B, heads, N, N).

    Per layer: fuse the heads, zero the ``discard_ratio`` share of smallest weights in each row (a noise
    filter; 0 keeps them all), add the identity for the residual connection and
    renormalise the rows; then multiply through the layers, the last on the left. Returns (B, N, N), a
    row-stochastic matrix: row i is how much each input token contributes to output token i.
    """
    if not attentions:
        raise ValueError("attention_rollout needs the attention of at least one layer")
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    B, _, N, _ = attentions[0].shape
    eye = torch.eye(N, device=attentions[0].device)
    rollout = eye.expand(B, N, N)
    for attention in attentions:
        fused = fuse_heads(attention.float(), head_fusion)  # (B, N, N)
        drop = int(N * discard_ratio)
        if drop:
            smallest = fused.topk(drop, dim=-1, largest=False).indices
            fused = fused.scatter(-1, smallest, 0.0)
        layer = fused + eye
        rollout = (layer / layer.sum(dim=-1, keepdim=True)) @ rollout
    return rollout


def token_map(matrix: torch.Tensor, token: int, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """Row ``token`` of an attention or rollout matrix (..., N, N) over the patch tokens, as (..., gh, gw).

    The values are the weights themselves: they sum to 1 minus the weight on the prefix tokens.
    """
    return matrix[..., token, num_prefix_tokens:].reshape(*matrix.shape[:-2], *grid)


def position_similarity(pos_embed: torch.Tensor, num_prefix_tokens: int, grid: int | tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each patch's position embedding with every patch's: (gh * gw, gh, gw).

    Map i (row-major patch index) shows how similar patch i's embedding is to each other patch's, as in
    Figure 7 of the ViT paper. ``pos_embed`` is (1, prefix + gh * gw, D) or (prefix + gh * gw, D); the
    prefix tokens' embeddings are left out.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    patches = pos_embed.detach().float().reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:]  # (gh * gw, D)
    if patches.shape[0] != gh * gw:
        raise ValueError(f"pos_embed has {patches.shape[0]} patch positions after {num_prefix_tokens} prefix "
                         f"tokens, not {gh}x{gw}")
    unit = F.normalize(patches, dim=-1)
    return (unit @ unit.T).reshape(gh * gw, gh, gw)


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) from a feature grid and the gradient of a class logit with respect
    to it, both (B, H, W, C) (``channels_last``, Swin's layout) or (B, C, H, W) (CNNs).

    Channel weights are the gradient's spatial mean; the map is ReLU(sum over channels of weight x
    activation), divided by its maximum: (B, H, W) in [0, 1] (all zeros when nothing speaks for the class).
    """
    if channels_last:
        activations, gradients = activations.permute(0, 3, 1, 2), gradients.permute(0, 3, 1, 2)
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * activations.float()).sum(dim=1))  # (B, H, W)
    return cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) maps to (..., *size), to lay a patch-grid map over the image."""
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=size, mode="bilinear",
                        align_corners=False)
    return out.reshape(*lead, *size)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map of (..., h, w) stretched to [0, 1] (a constant map gives zeros), so that colour shows where a
    map is high; the range it spanned has to be reported beside it."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    return (maps - low) / (maps.amax(dim=(-2, -1), keepdim=True) - low).clamp_min(1e-12)
