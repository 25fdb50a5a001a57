"""One run per folder: an OS lock on the run folder while a run writes into it.

Two runs writing into one folder (a relaunched job, a second terminal, ``trainer.resume=auto`` while the first
still runs) would overwrite each other's checkpoints. A run holds ``flock`` on ``<run>/.lock``, which the kernel
releases when the process ends, however it ends (SIGKILL, a crash, a power cut), so a stale lock cannot stop a
relaunch. A second run into a folder in use is refused in one line naming the process that holds it. Within one
process the lock is re-entrant (the Hydra callback takes it before Hydra writes ``.hydra/``, ``train()`` again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from vitrain.errors import VitrainError

LOCK_NAME = ".lock"
_held: dict[Path, list[int]] = {}  # folder -> [file descriptor, times taken] of the locks this process holds


class RunFolderInUse(VitrainError):
    """Another process is writing into the run folder."""


def acquire(folder: str | Path) -> Path:
    """Take the lock of ``folder`` (made if missing) for this process, or raise :class:`RunFolderInUse`."""
    folder = Path(folder).resolve()
    if folder in _held:
        _held[folder][1] += 1
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_pid(fd)
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise VitrainError(f"cannot lock run folder {folder} ({e.strerror}); choose another hydra.run.dir") from e
        raise RunFolderInUse(f"run folder {folder} is in use by another run (PID {holder or 'unknown'}); wait for it "
                             f"to end, stop it, or choose another hydra.run.dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[folder] = [fd, 1]
    return folder


def release(folder: str | Path) -> None:
    """Give back one :func:`acquire` of ``folder``; the last one unlocks it."""
    folder = Path(folder).resolve()
    entry = _held.get(folder)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[folder]
        os.close(entry[0])  # closing the descriptor releases the flock


@contextlib.contextmanager
def locked(folder: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``folder`` for the ``with`` block (``enabled=False``: no lock, e.g. ranks > 0)."""
    if not enabled:
        yield
        return
    acquire(folder)
    try:
        yield
    finally:
        release(folder)


def holds(folder: str | Path) -> bool:
    """This process holds the lock of ``folder``."""
    return Path(folder).resolve() in _held


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None
