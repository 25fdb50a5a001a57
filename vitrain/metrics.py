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
    lockstep: bool = False,
) -> dict[str, Any]:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent), per-class accuracy, the confusion matrix
    (rows: true class, columns: predicted) and images per second of the whole loop, for ``model`` in eval
    mode. Everything is summed on the device (one host sync at the end); under torchrun each rank scores
    its own images (none twice) and the sums are added over the ranks, so the result is exact for the
    whole set. ``lockstep`` (a sharded model, whose every forward is a collective): a rank with fewer batches runs
    its last one again, unscored, until every rank has run as many forwards."""
    model.eval()
    batches = distributed.any_rank(len(loader)) if lockstep else 0
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
        batches -= 1
    for _ in range(max(0, batches)):  # lockstep: the other ranks' last forwards
        with autocast():
            model(images)
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
    """The training losses since the last log, summed on the device (no host sync per step), and the top-1 hits
    of the batches with hard labels (under mixup/cutmix the targets are soft: there is no top-1 to count)."""

    def __init__(self, device: torch.device) -> None:
        self.total, self.batches = torch.zeros((), device=device), 0
        self.correct, self.counted = torch.zeros((), device=device), 0

    def add(self, loss: torch.Tensor, outputs: Any = None, labels: torch.Tensor | None = None) -> None:
        """One batch's loss; with its outputs (logits, or DeiT's pair, averaged) and hard labels, its top-1 hits."""
        self.total += loss.detach().float()
        self.batches += 1
        if outputs is not None and labels is not None and labels.ndim == 1:
            logits = sum(outputs) / len(outputs) if isinstance(outputs, tuple | list) else outputs
            self.correct += (logits.detach().argmax(-1) == labels).sum()
            self.counted += labels.numel()

    def pop(self) -> tuple[float, float | None]:
        """The mean over the ranks of their windows' mean losses, and the top-1 (%) of all the ranks' counted
        images (None when none were counted), in one host sync; then a fresh window."""
        sums = torch.stack([self.total / max(1, self.batches), self.correct.float(),
                            torch.tensor(float(self.counted), device=self.total.device)])
        loss, correct, counted = distributed.all_reduce_sum(sums).tolist()
        self.total, self.batches = torch.zeros_like(self.total), 0
        self.correct, self.counted = torch.zeros_like(self.correct), 0
        return loss / distributed.world_size(), (100.0 * correct / counted if counted else None)


def gradient_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, as ``clip_grad_norm_`` measures it (the norm of the
    per-tensor norms), without touching them; over all shards of sharded (DTensor) gradients."""
    norms = [full_tensor(torch.linalg.vector_norm(p.grad.detach())) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor (FSDP2's sharded parameters, gradients and norms of them) gathered whole."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
