"""Writing and reading checkpoints: atomic saves, weights-only loads, and the format of a training checkpoint.

A training checkpoint (``last.pt``, ``best.pt``) is a plain dict of tensors and Python values. Beside the
weights and the training state it holds what inference needs, independent of the YAML layout:
``model_spec`` (``create_model(**model_spec)`` rebuilds the architecture), ``preprocess`` (the evaluation
transform: size, normalization, interpolation), ``class_names`` and ``global_batch``. Files written by
vitrain 0.1.0 hold the resolved config instead; :func:`upgrade` derives the same keys from it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from vitrain.errors import ConfigError, VitrainError, first_line
from vitrain.paths import file_kind, zip_problem

log = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file of this writer's own is written, flushed to
    disk and renamed over the target, and the folder is flushed too, so an interrupted save leaves the previous
    file intact and a finished one survives a power cut. A failed write (a full disk, an I/O error, a read-only
    folder) removes its partial file and raises :class:`CheckpointWriteError`, one line naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_write_temp(state, path), path)
    fsync_folder(path.parent)
    return path


class CheckpointWriteError(VitrainError):
    """A checkpoint could not be written; the files written before are intact."""


SHARDED_LAST, SHARDED_STATE = "last.dcp", "state.pt"  # an FSDP2 run's sharded checkpoint (vitrain/sharded.py)
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "rng_ranks")  # what best.pt leaves out


def write_checkpoints(state: dict[str, Any], folder: Path, best_val: dict[str, float] | None = None,
                      keep_last: int = 1) -> Path:
    """A run's checkpoints of ``state``: ``last.pt``; ``best.pt`` (the weights without the training state,
    with ``best_val``) when ``best_val`` is given; with ``keep_last`` > 1 also ``step_*.pt``, of which the
    newest ``keep_last`` stay. Returns the path of last.pt.

    Every file is written to a temporary file first; only when all of them are complete are they renamed, last.pt
    first. So a failed write changes nothing, and best.pt is never newer than last.pt."""
    files = [(state, folder / "last.pt")]
    if best_val is not None:
        weights = {k: v for k, v in state.items() if k not in TRAINING_STATE}
        files.append(({**weights, "val": best_val}, folder / "best.pt"))  # for inference, fine-tuning
    if keep_last > 1:
        files.append((state, folder / f"step_{state['step']:08d}.pt"))
    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Path]] = []
    try:
        for content, path in files:
            written.append((_write_temp(content, path), path))
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in written:
        os.replace(tmp, path)
    fsync_folder(folder)
    for old in sorted(folder.glob("step_*.pt"))[:-keep_last] if keep_last > 1 else []:
        old.unlink()
    return folder / "last.pt"


def write_text(text: str, path: Path) -> None:
    """Write a small text file (``metrics.json``) atomically, as :func:`save_checkpoint` does."""
    tmp = temp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(write_failure(path, e)) from e
    os.replace(tmp, path)
    fsync_folder(path.parent)


def temp_name(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses: ``<name>.<pid>-<random>.tmp``."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _write_temp(state: dict[str, Any], path: Path) -> Path:
    """``state`` written and flushed to a temporary file beside ``path``; on failure, no file is left."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None:
            raise
        raise CheckpointWriteError(write_failure(path, cause)) from e
    return tmp


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (torch.save wraps the file's own error in RuntimeErrors), or None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def write_failure(path: Path, error: OSError) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = error.strerror or type(error).__name__
    return (f"cannot write {path}: {reason} ({free}); nothing was replaced and the partial file was removed; "
            f"free space, or make the folder writable, or set hydra.run.dir to another disk, and resume")


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the renames in it) to disk; where folders cannot be opened, nothing."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMP = re.compile(r"\.(\d+)-[0-9a-f]+\.tmp$")


def remove_partial_saves(folder: Path) -> list[Path]:
    """Delete the temporary files that a killed save (SIGKILL, power loss) left in ``folder``: those whose
    writer is no longer running (and the single-name ``last.pt.tmp`` of earlier versions). A save still in progress in
    another process, and the complete checkpoints, are never touched. Returns the files removed."""
    leftovers = []
    for path in sorted(folder.glob("*.tmp")) if folder.is_dir() else []:  # hidden ones too
        match = _TEMP.search(path.name)
        if match and _running(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():  # a sharded save's folder (vitrain/sharded.py)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        leftovers.append(path)
        log.warning("removed %s, left by a save that was killed mid-write", path)
    return leftovers


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not saving now: what it left is from an earlier, failed save
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only, no code runs."""
    path = Path(path)
    if not path.is_file():
        raise VitrainError(f"checkpoint {path} does not exist; check the path")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns before refusing; the error below says it all
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise VitrainError(f"cannot load checkpoint {path}: {first_line(e)}; the file is corrupt") from e
        raise VitrainError(
            f"cannot load checkpoint {path}: refused, it holds Python objects beyond tensors, which could run "
            f"code when unpickled; nothing was executed. Use a file of tensors (state dict or safetensors)"
        ) from e
    except Exception as e:
        raise VitrainError(f"cannot load checkpoint {path}: {first_line(e)}; the file is corrupt or truncated") from e


# model keys of 0.1.0's config that are not constructor arguments
_V010_MODEL_KEYS = ("source", "name", "img_size", "pretrained", "checkpoint", "reset_head", "drop_path", "drop_rate",
                    "grad_checkpointing")


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint in today's format: one written by vitrain 0.1.0 (resolved ``config``, no
    ``model_spec``) gets ``model_spec``, ``preprocess`` and ``global_batch`` derived from its config."""
    if "model_spec" in state or "config" not in state:
        return state
    model, data = state["config"]["model"], state["config"]["data"]
    extra = {k: v for k, v in model.items() if k not in _V010_MODEL_KEYS}
    spec = {"name": model["name"], "source": model["source"], "num_classes": len(state.get("class_names", [])),
            "img_size": model["img_size"], "drop_rate": model["drop_rate"], "drop_path_rate": model["drop_path"],
            **extra}
    preprocess = {"img_size": model["img_size"], "mean": list(data["mean"]), "std": list(data["std"]),
                  "interpolation": data["interpolation"]}
    return {**state, "model_spec": spec, "preprocess": preprocess, "data_config": dict(data),
            "global_batch": saved_global_batch(state)}


def saved_global_batch(state: dict[str, Any]) -> int:
    """The images per step of all processes when the checkpoint was written (0 when unknown)."""
    if "global_batch" in state:
        return state["global_batch"]
    return state.get("config", {}).get("data", {}).get("batch_size", 0) * state.get("world_size", 1)


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """``trainer.resume``: null (start fresh), ``auto`` (this run folder's last.pt, if any) or a path."""
    if not resume:
        return None
    if resume == "auto":  # last.pt, or last.dcp of an FSDP2 run: the newer
        return newest(run_dir / "checkpoints")
    path = Path(resume)
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise ConfigError(f"trainer.resume={resume} is a folder, not a checkpoint; give a run's checkpoints/last.pt "
                          f"(or an FSDP2 run's last.dcp), or trainer.resume=auto")
    if not path.is_file() and not is_sharded_checkpoint(path):
        raise ConfigError(f"trainer.resume={resume}: no such file; give a last.pt (or an FSDP2 run's last.dcp), or "
                          f"trainer.resume=auto")
    try:
        kind = file_kind(path) if path.is_file() else "sharded"
    except OSError:
        return path  # unreadable: load_checkpoint says why
    if kind in ("empty", "other"):
        raise ConfigError(f"trainer.resume={resume} is not a PyTorch checkpoint (neither a zip archive nor a pickle: "
                          f"a text or other file); give a run's checkpoints/last.pt")
    problem = zip_problem(path) if kind == "zip" else None
    if problem:
        raise ConfigError(f"trainer.resume={resume} is corrupt or cut short ({problem}); give another checkpoint, e.g. "
                          f"a numbered checkpoints/step_*.pt (trainer.keep_last), or start afresh")
    return path


def is_sharded_checkpoint(path: Path) -> bool:
    """A DCP folder (``last.dcp`` of an FSDP2 run, :mod:`vitrain.sharded`)."""
    return path.is_dir() and (path / ".metadata").is_file()


def newest(folder: Path) -> Path | None:
    """The newer of ``last.pt`` and ``last.dcp`` in ``folder`` (a run may have written both: on one rank, then
    sharded), by the time each was completed (a DCP save's ``state.pt`` is its last file); None for neither."""
    found = [p for p in (folder / "last.pt", folder / SHARDED_LAST / SHARDED_STATE) if p.is_file()]
    if not found:
        return None
    best = max(found, key=lambda p: p.stat().st_mtime_ns)
    return best if best.name == "last.pt" else folder / SHARDED_LAST


def check_resume_position(state: dict[str, Any], global_batch: int) -> None:
    """A checkpoint written inside an epoch continues from its position in the epoch's order, which is
    counted in global batches (``data.batch_size`` x processes): they must be the same as when it was saved."""
    saved = saved_global_batch(state)
    if state.get("batch_in_epoch", 0) and saved and saved != global_batch:
        raise ConfigError(f"the checkpoint stopped inside an epoch with {saved} images per step (data.batch_size x "
                          f"processes), this run has {global_batch}; resume with the same, or from an epoch's end")


def load_training_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A vitrain training checkpoint (``best.pt``, ``last.pt``, of this version or 0.1.0), upgraded to
    today's format; another file is a one-line error."""
    state = upgrade(load_checkpoint(path, map_location))
    if "model_spec" not in state or "class_names" not in state:
        raise VitrainError(f"{path} is not a vitrain training checkpoint (no model spec); give a run's "
                           f"checkpoints/best.pt or last.pt")
    return state


def rng_state() -> dict[str, Any]:
    """The random number generators' states (Python, NumPy, torch CPU and CUDA) as tensors and plain
    values, so that a weights-only load can restore them."""
    import random

    import numpy as np

    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": {"key": torch.from_numpy(key.astype("int64")), "pos": int(pos),
                                                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
