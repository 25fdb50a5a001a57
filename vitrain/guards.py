"""Small pieces beside the training loop: the NaN/inf guard and the stop signals."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vitrain import distributed
from vitrain.errors import NonFiniteLoss


class NonFiniteGuard:
    """Stops training at the first NaN/inf loss, naming its step and the last good checkpoint.

    The losses of recent steps are kept on the device and checked together in one host sync
    (:meth:`check`, called before every log and every checkpoint), not after every step; weights that a
    bad step may have touched are never saved. :meth:`is_bad` checks one loss at once (one sync per
    step), for ``trainer.skip_nonfinite``."""

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = last_checkpoint
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
        last = self.last_checkpoint
        raise NonFiniteLoss(
            f"the loss is {losses[bad[0]].item()} at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
            f"last good checkpoint: {last if last.exists() else 'none yet'}; lower optimizer.lr, set "
            f"trainer.grad_clip, or trainer.skip_nonfinite=true to skip such batches"
        )


class StopSignals:
    """While active, SIGTERM and SIGINT only record the signal; the loop asks :meth:`received` after each
    step (the same answer on every rank), saves, and stops."""

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
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def request_stop(signum: int, frame: Any) -> None:
            self.signum = signum

        for s in previous:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
