"""``trainer.cache_features=true``: a frozen backbone runs once over the data, and the head trains on its features.

Linear probing (or any head-only training) spends nearly all its time in the backbone's forward pass, which gives
the same features every epoch. Here the backbone runs once over the validation (and test) images and over
``trainer.feature_views`` passes of the training images, each with its own draw of the training augmentation; the
features (the head's input, ``forward_head(..., pre_logits=True)``) go to a file keyed by everything they depend
on (the model's spec and backbone weights, the data settings, the image files' sizes and times, the views and the
seed), and later runs reuse it. The head then trains on them in seconds, epoch e on view e mod K.

:class:`FeatureProbe` is the model the Trainer sees: it applies the head to features, and its state dict is the
whole model's, so ``best.pt`` and ``last.pt`` are ordinary checkpoints of the full model (backbone + trained head)
that evaluate, predict and export read as any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from vitrain.checkpoint import save_checkpoint
from vitrain.data.cache import file_samples
from vitrain.data.samplers import EpochSampler
from vitrain.errors import ConfigError, DataError
from vitrain.models.heads import classifier_names

log = logging.getLogger(__name__)
VERSION = 1
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class FeatureProbe(nn.Module):
    """The head of ``model`` applied to its cached features; saved and loaded as the whole ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "forward_head") or len(classifier_names(model)) != 1:
            raise ConfigError(f"trainer.cache_features needs a model with one classifier head and forward_head "
                              f"(vitrain's ViT and Swin, timm's models); {type(model).__name__} is not one: set "
                              f"trainer.cache_features=false")
        self.model = model
        self.head_names = tuple(f"model.{name}" for name in classifier_names(model))
        for name, p in model.named_parameters():  # the backbone is frozen: its features are computed once
            p.requires_grad_(f"model.{name}".startswith(self.head_names[0] + "."))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, num_classes)
        return self.model.get_classifier()(features)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


class FeatureLoader:
    """Batches of cached features in the order of an :class:`~vitrain.data.samplers.EpochSampler` (training:
    view e mod K in epoch e, resumable inside an epoch as the image loaders are) or in order (evaluation)."""

    def __init__(self, views: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, seed: int | None = None,
                 drop_last: bool = False) -> None:
        self.views, self.batch_size, self.drop_last = views, batch_size, drop_last
        self.sampler = EpochSampler(len(views[0][1]), seed) if seed is not None else None

    def __len__(self) -> int:
        remaining = len(self.sampler) if self.sampler is not None else len(self.views[0][1])
        return remaining // self.batch_size if self.drop_last else math.ceil(remaining / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.sampler is None:
            features, labels = self.views[0]
            order = torch.arange(len(labels))
        else:
            features, labels = self.views[self.sampler.epoch % len(self.views)]
            order = self.sampler.order()[self.sampler.start:]
        for k in range(len(self)):
            rows = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield features[rows], labels[rows]


def extract(model: nn.Module, batches: Batches, device: torch.device, autocast: Callable[[], Any],
            desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input for every image of ``batches`` (float32, on the CPU) and the labels, in their order."""
    model.eval()
    features, labels = [], []
    with torch.inference_mode():
        for images, targets in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True):
            with autocast():
                x = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
            features.append(x.float().cpu())
            labels.append(targets.cpu())
    return torch.cat(features), torch.cat(labels)


def cached_features(model: nn.Module, loaders: dict[str, Any], views: int, key: dict[str, Any], folder: Path,
                    device: torch.device, autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, Any]:
    """``{"train": [(features, labels)] * views, "val": ..., "test": ...}``: read from ``folder`` when a file of the
    same ``key`` is there, else computed (``views`` passes of the training loader, one of each other) and saved."""
    digest = hashlib.sha256(json.dumps({**key, "version": VERSION}, sort_keys=True, default=str).encode())
    path = folder / f"features-{digest.hexdigest()[:16]}.pt"
    if path.is_file():
        log.info("features from %s (the backbone does not run)", path)
        return torch.load(path, map_location="cpu", weights_only=True)
    start, train = time.perf_counter(), loaders["train"]
    result: dict[str, Any] = {"train": []}
    for view in range(views):
        if hasattr(getattr(train, "sampler", None), "set_epoch"):
            train.sampler.set_epoch(view)  # each view its own shuffle and augmentation draws
        result["train"].append(extract(model, train, device, autocast, f"features: train view {view + 1}/{views}"))
    for split in ("val", "test"):
        if loaders.get(split) is not None:
            result[split] = [extract(model, loaders[split], device, autocast, f"features: {split}")]
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(result, path)
    log.info("features of %d training images x %d view(s) and %d validation images in %.1f s, cached in %s",
             len(result["train"][0][1]), views, len(result["val"][0][1]), time.perf_counter() - start, path)
    return result


def backbone_digest(model: nn.Module) -> str:
    """A hash of the backbone's weights (the head excluded): features of other weights are other features."""
    head = classifier_names(model)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not any(name == h or name.startswith(h + ".") for h in head):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def files_key(dataset: Any) -> list[Any] | int:
    """What identifies a data set's contents: its image files' paths, sizes and times (folders, file lists), or
    its length (in-memory sets, which their settings fix)."""
    try:
        base, indices = file_samples(dataset)  # through Subsets, as the image cache reads them
    except DataError:
        return len(dataset)
    samples = base.samples if indices is None else [base.samples[i] for i in indices]
    stats = []
    for path, label in samples:
        st = os.stat(path)
        stats.append((str(path), label, st.st_size, st.st_mtime_ns))
    return [hashlib.sha256(json.dumps(stats).encode()).hexdigest(), len(dataset)]
