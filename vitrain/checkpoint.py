"""Writing and reading checkpoints: atomic saves, weights-only loads."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from vitrain.errors import VitrainError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file is written, flushed to disk and
    renamed over the target, so an interrupted save leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng", "rng_ranks")  # what best.pt leaves out


def write_checkpoints(state: dict[str, Any], folder: Path, best_val: dict[str, float] | None = None,
                      keep_last: int = 1) -> Path:
    """A run's checkpoints of ``state``: ``last.pt``; ``best.pt`` (the weights without the training state,
    with ``best_val``) when ``best_val`` is given; with ``keep_last`` > 1 also ``step_*.pt``, of which the
    newest ``keep_last`` stay. Returns the path of last.pt."""
    if best_val is not None:
        weights = {k: v for k, v in state.items() if k not in TRAINING_STATE}
        save_checkpoint({**weights, "val": best_val}, folder / "best.pt")  # for inference, fine-tuning
    last = save_checkpoint(state, folder / "last.pt")
    if keep_last > 1:
        save_checkpoint(state, folder / f"step_{state['step']:08d}.pt")
        for old in sorted(folder.glob("step_*.pt"))[:-keep_last]:
            old.unlink()
    return last


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
            raise VitrainError(f"cannot load checkpoint {path}: {_first_line(e)}; the file is corrupt") from e
        raise VitrainError(
            f"cannot load checkpoint {path}: refused, it holds Python objects beyond tensors, which could run "
            f"code when unpickled; nothing was executed. Use a file of tensors (state dict or safetensors)"
        ) from e
    except Exception as e:
        raise VitrainError(f"cannot load checkpoint {path}: {_first_line(e)}; the file is corrupt or truncated") from e


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


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
