"""A name -> constructor registry of vitrain's own models, timm-style.

Most code calls :func:`vitrain.models.create_model`, which also reaches timm and torchvision and
loads weights; :func:`build_registered` builds one of vitrain's variants with fresh weights.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from vitrain.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
VARIANT_MODULES = ("vitrain.models.vit", "vitrain.models.deit", "vitrain.models.deit3", "vitrain.models.swin")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def unknown_name(what: str, name: str, known: Iterable[str], listing: str, cutoff: float = 0.6) -> ConfigError:
    """The one-line error for a model name that is not in ``known``, with up to three close matches."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=cutoff)
    hint = f"did you mean {', '.join(close)}?" if close else f"see {listing}"
    return ConfigError(f"unknown {what} '{name}' (model.name); {hint}")


def _registered() -> dict[str, Callable[..., nn.Module]]:
    """Every variant, its module imported (each registers its own when imported)."""
    for module in VARIANT_MODULES:
        importlib.import_module(module)
    return _MODELS


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models that match a shell-style pattern, sorted."""
    return sorted(name for name in _registered() if fnmatch.fnmatch(name, pattern))


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The registered function that builds ``name`` (its return annotation names the model's class)."""
    if name not in _registered():
        raise unknown_name("model", name, _MODELS, "vitrain.models.list_models()", cutoff=0.5)
    return _MODELS[name]


def build_registered(name: str, num_classes: int = 1000, img_size: int | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model; ``overrides`` replace the variant's defaults (depth, drop_path_rate, ...)."""
    if name not in _registered():
        raise unknown_name("model", name, _MODELS, "vitrain.models.list_models()", cutoff=0.5)
    if img_size is not None:
        overrides["img_size"] = img_size
    return _MODELS[name](num_classes=num_classes, **overrides)
