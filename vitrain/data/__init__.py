"""Data sets and loaders, configured by :class:`~vitrain.data.config.DataConfig` (the ``data`` group).

:func:`build_datasets` turns the config into transformed train/val sets; :func:`build_loaders` into the
loaders of ``data.pipeline``; :func:`build_mixup` into timm's batch mixup/cutmix (all in
:mod:`vitrain.data.loaders`, imported on first use, so that the schema is read without importing torch)."""

from __future__ import annotations

import importlib
from typing import Any

from vitrain.data.config import DATASETS, DataConfig

_LOADERS = ("DataSplits", "EpochSampler", "ShardSampler", "ShardedEpochSampler", "build_datasets", "build_loaders",
            "build_mixup", "cpu_eval_loader", "cpu_loaders")

__all__ = ["DATASETS", "DataConfig", *_LOADERS]


def __getattr__(name: str) -> Any:
    if name not in _LOADERS:
        raise AttributeError(f"module 'vitrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module("vitrain.data.loaders"), name)
