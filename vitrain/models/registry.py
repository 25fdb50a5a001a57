"""A name -> constructor registry, timm-style: ``create_model("vit_small_patch16_224", num_classes=10)``."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

from torch import nn

from vitrain.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models that match a shell-style pattern, sorted."""
    return sorted(name for name in _MODELS if fnmatch.fnmatch(name, pattern))


def create_model(
    name: str, num_classes: int = 1000, img_size: int | None = None, **overrides: Any
) -> nn.Module:
    """Build a registered model; ``overrides`` replace the variant's defaults (depth, drop_path_rate, ...)."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see vitrain.models.list_models()"
        raise ConfigError(f"unknown model '{name}' (model.name); {hint}")
    if img_size is not None:
        overrides["img_size"] = img_size
    return _MODELS[name](num_classes=num_classes, **overrides)
