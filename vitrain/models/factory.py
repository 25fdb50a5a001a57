"""``create_model``: one entry point for vitrain's models, timm's and torchvision's, with weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from vitrain.errors import ConfigError
from vitrain.models.convert import fetch_timm_weights, load_pretrained
from vitrain.models.external import create_timm_model, create_torchvision_model
from vitrain.models.heads import reset_classifier
from vitrain.models.registry import build_registered

SOURCES = ("vitrain", "timm", "torchvision")


def create_model(
    name: str,
    num_classes: int = 1000,
    img_size: int | None = None,
    source: str = "vitrain",
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    reset_head: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build ``name`` from ``source`` with a ``num_classes`` head (0: pooled features).

    ``pretrained``: ImageNet weights from the hub, or from its local cache offline (for vitrain's models, timm's
    weights of the same name, converted; a timm tag picks which: ``vit_small_patch16_224.augreg_in21k``).
    ``checkpoint``: a local file in any layout :mod:`vitrain.models.convert` reads, or a timm hub folder, loaded
    after; position embeddings and Swin bias tables are resampled to ``img_size``, a head of
    another size is re-initialised, and ``reset_head`` re-initialises it anyway (new classes, same count).
    ``overrides`` go to the constructor (``drop_path_rate``, ``depth``, ...).
    """
    if source == "vitrain":
        model = build_registered(name.partition(".")[0], num_classes, img_size, **overrides)  # a tag names weights
        if pretrained:
            model.model_name = name
            load_pretrained(model, fetch_timm_weights(name))
    elif source == "timm":
        model = create_timm_model(name, num_classes, pretrained, img_size, **overrides)
    elif source == "torchvision":
        model = create_torchvision_model(name, num_classes, pretrained, img_size, **overrides)
    else:
        raise ConfigError(f"unknown model source '{source}' (model.source); choose one of {', '.join(SOURCES)}")
    model.model_name = name  # named in loading reports and errors
    if checkpoint:
        load_pretrained(model, checkpoint)
    if reset_head:
        reset_classifier(model)
    return model

