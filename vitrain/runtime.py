"""Where and how the numbers run: seeds, autocast precision, memory layout."""

from __future__ import annotations

import copy
import multiprocessing
import multiprocessing.context
import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import vitrain
from vitrain.errors import ConfigError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SIGUSR1: SLURM's --signal=USR1@T warning


def loader_workers(num_workers: int) -> dict[str, Any]:
    """The ``DataLoader`` arguments that keep a scheduler's stop signals away from its workers: they start with
    the stop signals blocked (:func:`worker_context`) and then ignore them (:func:`ignore_stop_signals`)."""
    if num_workers <= 0:
        return {}
    return {"worker_init_fn": ignore_stop_signals, "multiprocessing_context": worker_context()}


def close_workers(*loaders: Any) -> None:
    """Stop the persistent workers of ``loaders`` (DataLoaders, or vitrain's loaders around one: ``.loader``) now.
    Left to the garbage collector, a loader's iterator is shut down from inside a reference cycle whose queues
    are already torn down: its workers never hear the stop and are killed after 5 s each."""
    for loader in loaders:
        inner = getattr(loader, "loader", None)
        if inner is not None and inner is not loader:
            close_workers(inner)
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def worker_context() -> multiprocessing.context.BaseContext:
    """The default multiprocessing context, whose processes start with the stop signals blocked: they inherit the
    mask, so a signal to the process group that arrives while a worker starts (before its ``worker_init_fn``
    runs) waits for :func:`ignore_stop_signals` instead of killing it. The parent's mask is put back at once, and
    a signal it held back then reaches the parent's handler."""
    base = multiprocessing.get_context()

    class MaskedProcess(base.Process):  # type: ignore[name-defined,misc]
        def start(self) -> None:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    context = copy.copy(base)
    context.Process = MaskedProcess
    return context


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A data loader worker's ``worker_init_fn``: SIGTERM, SIGINT and SIGUSR1 are the main process's to act on.

    Schedulers (SLURM, ``timeout``, a terminal's Ctrl-C) signal the whole process group: a worker killed first
    would make the main process fail before it saves. So a worker ignores SIGINT and SIGUSR1, and a SIGTERM from
    anyone but its parent; the parent's own SIGTERM (how PyTorch and ``multiprocessing`` end workers at exit)
    still ends it, with a clean exit. SIGTERM is blocked and read by a thread (``sigwaitinfo`` says who sent it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR1})  # held back at start: now ignored
    threading.Thread(target=_end_on_parents_sigterm, args=(os.getppid(),), name="sigterm", daemon=True).start()


def _end_on_parents_sigterm(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass  # the process group's signal: the main process saves, then ends this worker
    os._exit(0)  # asked to end by the parent: a clean exit (PyTorch reports workers killed by a signal as failed)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision``; ``auto`` is bf16 on CUDA and fp32 on the CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown trainer.precision '{precision}'; choose auto, fp32, bf16 or fp16")
    return PRECISIONS[precision]


def is_cnn(model: nn.Module) -> bool:
    """A convolutional network (more than a patch-embedding convolution): it gains from channels_last."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(setting: bool | str, model: nn.Module, device: torch.device) -> bool:
    """``trainer.channels_last``: auto means CNNs on CUDA, where cuDNN's NHWC kernels are faster."""
    if setting == "auto":
        return device.type == "cuda" and is_cnn(model)
    if not isinstance(setting, bool):
        raise ConfigError(f"trainer.channels_last must be auto, true or false, got {setting}")
    return setting


def command_times(metrics: dict[str, Any], features: float) -> str:
    """``212.4 s in all: start 8.1 s, features 150.2 s, training 52.0 s, test 2.1 s``: the whole command, from the
    import of vitrain (start: imports, data, model; features: the backbone's pass of a feature probe)."""
    total, fit, test = time.perf_counter() - vitrain.STARTED, metrics["wall_time_sec"], metrics["test_time_sec"]
    parts = {"start": total - fit - features, "features": features, "training": fit - test, "test": test}
    shown = ", ".join(f"{k} {v:.1f} s" for k, v in parts.items() if v >= 0.05 or k in ("start", "training"))
    return f"{total:.1f} s in all: {shown}"
