"""Classifier heads: where a model's classifier is, and how a fresh one is initialised.

The model layer owns these; the optimizer (head learning rate, linear probing) and the weight loader
(a classifier for another number of classes is dropped) both ask :func:`classifier_names`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Module paths of the classifier head(s): the model's ``head_names`` (vitrain's models and wrapped
    backbones), else timm's ``pretrained_cfg['classifier']``, else ``head``."""
    if getattr(model, "head_names", None):
        return tuple(model.head_names)
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def in_module(name: str, prefixes: Iterable[str]) -> bool:
    """Whether the parameter or module path ``name`` is one of ``prefixes`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def init_linear(layer: nn.Linear) -> None:
    """timm's init of a linear layer (every fresh classifier, and every linear of vitrain's models):
    truncated normal weight (std 0.02), zero bias."""
    nn.init.trunc_normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def new_classifier(in_features: int, num_classes: int) -> nn.Module:
    """A fresh ``in_features -> num_classes`` classifier initialised by :func:`init_linear`; ``Identity``
    (pooled features) for 0 classes."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(in_features, num_classes)
    init_linear(head)
    return head


def reset_classifier(model: nn.Module) -> None:
    """Fresh weights for the classifier head(s) of any model, keeping their shape."""
    for name in classifier_names(model):
        head = model.get_submodule(name)
        # a Linear head is listed twice (itself, then by modules()) and so initialised twice; kept as it
        # was, since a single pass would change the random draws and with them seeded models' weights
        for layer in [head, *head.modules()]:
            if isinstance(layer, nn.Linear):
                init_linear(layer)
