"""DeiT (Touvron et al., 2021, "Training data-efficient image transformers & distillation through attention").

The plain DeiT models are ViTs of DeiT's sizes trained with a stronger recipe. The distilled ones add a
second learnable token next to CLS, the distillation token: it attends to the patches like CLS does,
and its own head (``head_dist``) learns from a teacher's predictions while ``head`` learns from the
labels. At inference the two heads' logits are averaged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vitrain.errors import ConfigError
from vitrain.models.heads import new_classifier
from vitrain.models.registry import register_model
from vitrain.models.vit import VisionTransformer


class DistilledVisionTransformer(VisionTransformer):
    """ViT with a distillation token and head; timm's parameter names (``dist_token``, ``head_dist``).

    In training mode ``forward`` returns ``(cls_logits, dist_logits)`` so that a loss can give each
    head its own target; in eval mode it returns their average. (timm returns the pair only after
    ``set_distilled_training()``; the original DeiT code, like this class, returns it whenever training.)
    """

    head_names = ("head", "head_dist")  # module paths of the classifiers: the optimizer's head group

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("global_pool", "token") != "token":
            raise ConfigError("a distilled DeiT reads its CLS and distillation tokens; set model.global_pool=token")
        if kwargs.get("no_embed_class"):
            raise ConfigError("a distilled DeiT has positions for its CLS and distillation tokens; "
                              "set model.no_embed_class=false")
        super().__init__(**kwargs)
        self.num_prefix_tokens = 2  # CLS, distillation
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, self.embed_dim))
        self.head_dist = new_classifier(self.embed_dim, self.num_classes)
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"dist_token"}

    def reset_classifier(self, num_classes: int) -> None:
        """Fresh ``head`` and ``head_dist`` for a new task."""
        super().reset_classifier(num_classes)
        self.head_dist = new_classifier(self.embed_dim, num_classes)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(tokens + self.pos_embed)  # (B, 2 + N, D)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])  # CLS and distillation tokens, (B, D) each
        if pre_logits or self.num_classes == 0:
            return (x + x_dist) / 2  # pooled features, as timm
        x, x_dist = self.head(x), self.head_dist(x_dist)  # (B, num_classes) each
        return (x, x_dist) if self.training else (x + x_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (B, num_classes), or the pair of both heads' logits in training mode."""
        return self.forward_head(self.forward_features(x))


def _plain(defaults: dict[str, Any], **kwargs: Any) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **kwargs})


def _distilled(defaults: dict[str, Any], **kwargs: Any) -> DistilledVisionTransformer:
    return DistilledVisionTransformer(**{**defaults, **kwargs})


_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_model
def deit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _plain(_TINY, **kwargs)


@register_model
def deit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _plain(_SMALL, **kwargs)


@register_model
def deit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    return _plain(_BASE, **kwargs)


@register_model
def deit_base_patch16_384(**kwargs: Any) -> VisionTransformer:
    return _plain({**_BASE, "img_size": 384}, **kwargs)


@register_model
def deit_tiny_distilled_patch16_224(**kwargs: Any) -> DistilledVisionTransformer:
    return _distilled(_TINY, **kwargs)


@register_model
def deit_small_distilled_patch16_224(**kwargs: Any) -> DistilledVisionTransformer:
    return _distilled(_SMALL, **kwargs)


@register_model
def deit_base_distilled_patch16_224(**kwargs: Any) -> DistilledVisionTransformer:
    return _distilled(_BASE, **kwargs)


@register_model
def deit_base_distilled_patch16_384(**kwargs: Any) -> DistilledVisionTransformer:
    return _distilled({**_BASE, "img_size": 384}, **kwargs)


# Small-image variant: vit_nano_patch4_16 with a distillation token, for distillation on digits on a CPU.
@register_model
def deit_nano_distilled_patch4_16(**kwargs: Any) -> DistilledVisionTransformer:
    return _distilled(dict(img_size=16, patch_size=4, embed_dim=64, depth=6, num_heads=4), **kwargs)
