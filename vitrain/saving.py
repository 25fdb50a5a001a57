"""Checkpoint writes off the training path: :class:`BackgroundSaves` (a CPU copy taken on the training thread, the
write in a writer thread, one save in flight). What is written, and how (atomically, fsync'd), is
:mod:`vitrain.checkpoint`'s and :mod:`vitrain.sharded`'s."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from vitrain.errors import first_line

log = logging.getLogger(__name__)


class BackgroundSaves:
    """Checkpoint writes off the training path. :meth:`submit` takes a CPU copy of the state (the only part the
    training thread waits for), then a writer thread writes it (:func:`write_checkpoints`: atomic, fsync'd) while
    training goes on. At most one save is in flight: the next one, and :meth:`wait` (at the end of training, on a
    stop signal), wait for it, and raise what it failed with (a full disk: :class:`CheckpointWriteError`). The thread
    is not a daemon: a run that ends by an error still finishes the save in flight before the process exits.
    ``background=False`` writes in the calling thread, as before.

    ``copy_seconds`` (the training thread's share), ``wait_seconds`` (time it waited for an earlier save) and
    ``write_seconds`` (each write in the writer thread) are what scripts/benchmark.py reports per save."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.copy_seconds: list[float] = []
        self.wait_seconds: list[float] = []
        self.write_seconds: list[float] = []

    def submit(self, state: dict[str, Any], write: Callable[[dict[str, Any]], Path], path: Path) -> Path:
        """Start ``write(copy of state)`` (e.g. :func:`write_checkpoints` into a folder); returns ``path``, where
        the checkpoint will be."""
        self.wait()
        start = time.perf_counter()
        snapshot = cpu_copy(state)  # the live tensors change at the next step; the copy does not
        self.copy_seconds.append(time.perf_counter() - start)
        if not self.background:
            self._write(write, snapshot)
            return path
        self._thread = threading.Thread(target=self._run, args=(write, snapshot), name="vitrain-checkpoint-writer")
        self._thread.start()
        return path

    def _write(self, write: Callable[[dict[str, Any]], Path], snapshot: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            write(snapshot)
        finally:
            self.write_seconds.append(time.perf_counter() - start)

    def _run(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # raised in the training thread at the next wait
            self._error = e

    @contextlib.contextmanager
    def flushed(self) -> Iterator[None]:
        """On leaving, the save in flight is on disk (before metrics.json says the run is complete, and before an
        error leaves the training loop); a failed save is raised, unless another error is already on its way out
        (then it is logged)."""
        try:
            yield
        except BaseException:
            try:
                self.wait()
            except Exception as e:
                log.error("%s", first_line(e))
            raise
        self.wait()

    def wait(self) -> None:
        """Return once the save in flight (if any) is on disk; raise the error it failed with."""
        if self._thread is not None:
            start = time.perf_counter()
            self._thread.join()
            self._thread = None
            self.wait_seconds.append(time.perf_counter() - start)
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def cpu_copy(value: Any) -> Any:
    """``value`` with every tensor copied to CPU memory and every dict, list and tuple rebuilt: a snapshot that
    the training's next in-place updates (weights, optimizer moments, the history list) leave as it was."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(cpu_copy(v) for v in value)
    return value
