"""Scoring a classifier on a data loader: the one evaluation loop of training and of ``vitrain.evaluate``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitrain import distributed


@torch.no_grad()
def score(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, Any]:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent), per-class accuracy, the confusion matrix
    (rows: true class, columns: predicted) and images per second of the whole loop, for ``model`` in eval
    mode. Everything is summed on the device (one host sync at the end); under torchrun each rank scores
    its own images (none twice) and the sums are added over the ranks, so the result is exact for the
    whole set."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion: torch.Tensor | None = None
    start = time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        classes = logits.shape[1]
        if confusion is None:
            confusion = torch.zeros(classes * classes, device=device, dtype=torch.long)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        top5 += (logits.topk(min(5, classes), dim=1).indices == labels[:, None]).any(dim=1).sum()
        confusion += torch.bincount(labels * classes + logits.argmax(1), minlength=classes * classes)
    if confusion is None:
        raise ValueError("score() needs a loader with at least one batch")
    counts = distributed.all_reduce_sum(torch.cat([confusion, top5[None]])).cpu()
    loss = distributed.all_reduce_sum(loss_sum).item()
    seconds = time.perf_counter() - start
    classes = int(round(len(confusion) ** 0.5))
    matrix = counts[:-1].view(classes, classes)
    total = int(matrix.sum())
    return {"loss": loss / total, "top1": 100.0 * matrix.diag().sum().item() / total,
            "top5": 100.0 * counts[-1].item() / total,
            "per_class_top1": (matrix.diag() / matrix.sum(1).clamp(min=1) * 100).tolist(),
            "confusion": matrix.tolist(), "images": total, "images_per_sec": total / max(seconds, 1e-9)}


class LossWindow:
    """The training losses since the last log, summed on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self.total, self.batches = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.batches += 1

    def pop_mean(self) -> float:
        """The mean over the ranks of their windows' mean losses (one host sync), and a fresh window."""
        mean = distributed.all_reduce_mean(self.total / max(1, self.batches)).item()
        self.total, self.batches = torch.zeros_like(self.total), 0
        return mean
