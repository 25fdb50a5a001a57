"""One run per folder: an OS lock on the run folder while a run writes into it.

Two runs writing into one folder (a relaunched job, a second terminal, ``trainer.resume=auto`` while the first
still runs) would overwrite each other's checkpoints. A run holds ``flock`` on ``<run>/.lock``, which the kernel
releases when the process ends, however it ends (SIGKILL, a crash, a power cut), so a stale lock cannot stop a
relaunch. A second run into a folder in use is refused in one line naming the process that holds it. Within one
process the lock is re-entrant (the Hydra callback takes it before Hydra writes ``.hydra/``, ``train()`` again).

A run refused at start (a config error) takes away the run folder it made, when the folder holds nothing but what
Hydra and the lock wrote (:func:`discard_unused`): no empty run folder is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitrain.errors import VitrainError

LOCK_NAME = ".lock"
RESOLVED_CONFIG = "config.yaml"  # the run's config with every auto value resolved (vitrain.train writes it)
START_FILES = {LOCK_NAME, ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
               RESOLVED_CONFIG}  # and <job>.log
_held: dict[Path, list[int]] = {}  # folder -> [file descriptor, times taken] of the locks this process holds
_made: dict[Path, Path] = {}  # run folder -> the highest folder on its path that this process made (note_new)


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
        _made.pop(folder, None)  # the run is over: its folder stays
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


def note_new(folder: str | Path) -> None:
    """Before ``folder`` is made: remember the highest folder on its path that does not exist yet, so that a run
    refused at start can take away what it made (:func:`discard_unused`). A folder that exists is never noted."""
    folder = Path(folder).resolve()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    if missing:
        _made[folder] = missing[-1]


def discard_unused() -> list[Path]:
    """Remove each run folder that this process made (:func:`note_new`) and holds the lock of, when it holds nothing
    but :data:`START_FILES`, the job's log and empty folders, and the folders made above it that are left empty;
    then give its lock back. A folder whose lock this process does not hold (another run's, one whose lock was
    refused) is never touched. Returns the run folders removed."""
    removed = []
    for folder, top in list(_made.items()):
        if folder not in _held:  # never ours (its lock refused), or given back: not to be touched
            del _made[folder]
            continue
        if not _only_start_files(folder):
            continue
        for root, folders, files in os.walk(folder, topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            for name in folders:
                os.rmdir(os.path.join(root, name))
        folder.rmdir()
        os.close(_held.pop(folder)[0])  # the lock file is gone; closing gives the lock back
        del _made[folder]
        for parent in folder.parents:  # up to the highest folder made, while they are empty
            if not parent.is_relative_to(top) or not _remove_empty(parent):
                break
        removed.append(folder)
    return removed


def _only_start_files(folder: Path) -> bool:
    """``folder`` holds :data:`START_FILES`, ``<job>.log`` files and empty folders, nothing else (no links)."""
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix()
            job_log = relative.endswith(".log") and "/" not in relative
            if path.is_symlink() or (name in files and relative not in START_FILES and not job_log):
                return False
    return True


def _remove_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
        return True
    except OSError:  # not empty: another run's folder is in it
        return False


def write_resolved_config(run_dir: Path, config: dict[str, Any]) -> None:
    """The config a run trains with, every ``auto``/null value resolved (input size, preprocessing, the teacher's
    inputs), as ``<run>/config.yaml``: ``.hydra/config.yaml`` keeps the config as composed."""
    from omegaconf import OmegaConf

    header = ("# The config this run trains with: every auto (null) value resolved, from the starting weights or the\n"
              "# data set. .hydra/config.yaml holds it as composed, and .hydra/overrides.yaml the command line.\n")
    (Path(run_dir) / RESOLVED_CONFIG).write_text(header + OmegaConf.to_yaml(OmegaConf.create(config)))
