"""DeiT III (Touvron, Cord and Jégou, 2022, "DeiT III: Revenge of the ViT").

Plain ViTs trained with a new recipe (3-Augment, binary cross-entropy, LAMB), with three changes to the
model, all options of :class:`~vitrain.models.vit.VisionTransformer` (as in timm's ``deit3_*``):

- LayerScale: each residual branch is scaled by a learned per-channel ``gamma`` (``blocks.N.ls1.gamma``,
  ``blocks.N.ls2.gamma``) that starts small;
- the position embedding covers the patches only (timm's ``no_embed_class``: 196 positions at 224/16); the
  CLS token is prepended after it is added;
- stochastic depth drops every block with the same rate (``drop_path_uniform``), not one rising with depth.
"""

from __future__ import annotations

from typing import Any

from vitrain.models.registry import register_model
from vitrain.models.vit import VisionTransformer

# LayerScale starts at 1e-4: ``init_scale=1e-4`` in ``vit_models`` (facebookresearch/deit, models_v2.py), which
# no ``deit_*_LS`` variant there and no training command in README_revenge.md changes. timm's deit3_* start at
# 1e-6 (timm/models/deit.py, ``init_values=1e-6``); pretrained weights overwrite gamma either way. The same
# models_v2.py gives every block the same drop-path rate (``dpr = [drop_path_rate for i in range(depth)]``),
# which timm's deit3_* do not (they take the linear ViT schedule).
_DEIT3 = dict(init_values=1e-4, no_embed_class=True, drop_path_uniform=True)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_MEDIUM = dict(patch_size=16, embed_dim=512, depth=12, num_heads=8)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
_HUGE = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)


def _create(defaults: dict[str, Any], **kwargs: Any) -> VisionTransformer:
    return VisionTransformer(**{**_DEIT3, **defaults, **kwargs})


@register_model
def deit3_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _create(_SMALL, **kwargs)


@register_model
def deit3_medium_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _create(_MEDIUM, **kwargs)


@register_model
def deit3_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _create(_BASE, **kwargs)


@register_model
def deit3_large_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _create(_LARGE, **kwargs)


@register_model
def deit3_huge_patch14_224(**kwargs: Any) -> VisionTransformer:
    return _create(_HUGE, **kwargs)


# Fine-tuned at 384x384, timm's names (576 positions).
@register_model
def deit3_small_patch16_384(**kwargs: Any) -> VisionTransformer:
    return _create({**_SMALL, "img_size": 384}, **kwargs)


@register_model
def deit3_base_patch16_384(**kwargs: Any) -> VisionTransformer:
    return _create({**_BASE, "img_size": 384}, **kwargs)


@register_model
def deit3_large_patch16_384(**kwargs: Any) -> VisionTransformer:
    return _create({**_LARGE, "img_size": 384}, **kwargs)
