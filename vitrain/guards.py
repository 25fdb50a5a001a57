"""Small pieces beside the training loop: the NaN/inf guard and the stop signals."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vitrain import distributed
from vitrain.errors import NonFiniteLoss
from vitrain.runtime import STOP_SIGNALS


class NonFiniteGuard:
    """Stops training at the first NaN/inf loss, naming its step and the last good checkpoint.

    The losses of recent steps are kept on the device and checked together in one host sync
    (:meth:`check`, called before every log and every checkpoint), not after every step; weights that a
    bad step may have touched are never saved. :meth:`is_bad` checks one loss at once (one sync per
    step), for ``trainer.skip_nonfinite``."""

    def __init__(self, last_checkpoint: Path, max_skipped_fraction: float = 0.05) -> None:
        self.last_checkpoint, self.max_skipped_fraction = last_checkpoint, max_skipped_fraction
        self._unchecked: list[tuple[torch.Tensor, int, int, int]] = []  # (loss, step, epoch, batch)

    def record(self, loss: torch.Tensor, step: int, epoch: int, batch: int) -> None:
        self._unchecked.append((loss.detach(), step, epoch, batch))

    @staticmethod
    def is_bad(loss: torch.Tensor) -> bool:
        """The loss is NaN/inf on any rank (so that all ranks skip the batch, or none)."""
        return bool(distributed.any_rank(int(not torch.isfinite(loss).item())))

    def check(self) -> None:
        """Raise :class:`NonFiniteLoss` for the first NaN/inf loss recorded since the last check."""
        if not self._unchecked:
            return
        losses = torch.stack([loss.float() for loss, *_ in self._unchecked])
        losses = distributed.all_reduce_sum(losses).cpu()  # NaN when NaN on any rank: all ranks stop together
        unchecked, self._unchecked = self._unchecked, []
        bad = torch.nonzero(~torch.isfinite(losses)).flatten()
        if len(bad) == 0:
            return
        _, step, epoch, batch = unchecked[bad[0]]
        raise NonFiniteLoss(
            f"the loss is {losses[bad[0]].item()} at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
            f"last good checkpoint: {self._last()}; lower optimizer.lr, set "
            f"trainer.grad_clip, or trainer.skip_nonfinite=true to skip such batches"
        )

    def check_skipped(self, skipped: int, batches: int, epoch: int) -> None:
        """With ``trainer.skip_nonfinite``: stop once more than ``max_skipped_fraction`` of the epoch's batches (and
        more than one) had a non-finite loss: a run that skips most of its data is not training."""
        allowed = max(1, int(self.max_skipped_fraction * batches))
        if skipped > allowed:
            raise NonFiniteLoss(
                f"{skipped} of epoch {epoch + 1}'s {batches} batches had a NaN/inf loss, more than "
                f"trainer.max_skipped_fraction={self.max_skipped_fraction} allows ({allowed}); last good checkpoint: "
                f"{self._last()}; lower optimizer.lr, set trainer.grad_clip, or check the data")

    def check_validation(self, loss: float, epoch: int, skipped: int) -> None:
        """A non-finite validation loss: the weights (or the validation data) are no longer finite; never saved."""
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"the validation loss is {loss} after epoch {epoch + 1} ({skipped} training batches skipped so far); "
                f"nothing was saved from it; last good checkpoint: {self._last()}; lower optimizer.lr, set "
                f"trainer.grad_clip, or check the validation images")

    def _last(self) -> str:
        return str(self.last_checkpoint) if self.last_checkpoint.exists() else "none yet"


class StopSignals:
    """While active, SIGTERM, SIGINT and SIGUSR1 (SLURM's warning before a time limit or preemption) only record
    the signal; the loop asks :meth:`received` after each step and after each epoch (the same answer on every
    rank), saves, and stops. Loader workers ignore them (:func:`vitrain.runtime.ignore_stop_signals`), so a signal
    to the whole process group acts as one to the main process."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def received(self) -> int:
        """The signal that arrived on any rank (0: none)."""
        return distributed.any_rank(self.signum or 0)

    @contextlib.contextmanager
    def catch(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def request_stop(signum: int, frame: Any) -> None:
            self.signum = signum

        for s in previous:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
