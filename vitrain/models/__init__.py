"""vitrain's models (:func:`create_model`, :func:`list_models`, the model classes), imported on first use: the
``model`` group's schema (``vitrain/models/config.py``) is read without importing torch. The registry loads every
variant before it answers (:mod:`vitrain.models.registry`)."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"DistilledVisionTransformer": "deit", "SwinTransformer": "swin", "VisionTransformer": "vit",
          "create_model": "factory", "classifier_names": "heads", "init_linear": "heads", "new_classifier": "heads",
          "reset_classifier": "heads", "list_models": "registry", "register_model": "registry"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vitrain.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vitrain.models.{_HOMES[name]}"), name)
