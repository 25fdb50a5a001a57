"""Sharded checkpoints of FSDP2 runs: ``checkpoints/last.dcp``, a folder in PyTorch's distributed checkpoint format
(DCP), in which every rank writes its own shards of the weights, the optimizer states and the EMA, and nobody
gathers the whole model. Beside the shards, ``state.pt`` (written by rank 0, a plain weights-only file) holds the
rest: the optimizer's hyperparameters, the schedule, the :class:`~vitrain.run_state.TrainState`, every rank's
random generators, the logger's run and the metadata. DCP reshards on loading, so the folder continues on any
number of ranks, under FSDP2, DDP or in one process.

Layout: ``checkpoints/dcp-step_<step>/`` holds one save (``.metadata``, ``__<rank>_0.distcp``, ``state.pt``);
``checkpoints/last.dcp`` is a symbolic link to the newest, replaced atomically once a save is complete. A save
is written into ``checkpoints/.dcp-step_<step>.<pid>-<token>.tmp`` first; an interrupted one leaves the link as it
was (the next run removes the leftover).

Only tensors go into the DCP files, and the ``.metadata`` file (a pickle) is read through an unpickler that knows
DCP's own classes and nothing else, so a hostile folder is refused as a hostile ``.pt`` is.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from vitrain import distributed
from vitrain.checkpoint import (
    SHARDED_LAST,
    SHARDED_STATE,
    CheckpointWriteError,
    fsync_folder,
    load_checkpoint,
    save_checkpoint,
    temp_name,
    write_failure,
)
from vitrain.errors import VitrainError, first_line
from vitrain.parallel import reshard

LAST, STATE = SHARDED_LAST, SHARDED_STATE
# (module, name) pairs a DCP .metadata pickle may name: its dataclasses, torch.Size, dtypes, layouts, paths
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
_ALLOWED = {("torch", "Size"), ("torch._utils", "_get_layout"), ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"), ("pathlib", "Path"),
            ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


def tensors_of(model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None) -> tuple[dict, list]:
    """What DCP writes and reads: the model's, the optimizer's and the EMA's tensors as this process holds them
    (DTensor shards under FSDP2, whole tensors otherwise), keyed by parameter name; and the optimizer's parameter
    groups (hyperparameters, no tensors), which go into ``state.pt``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    for module in (model, ema):  # an FSDP2 root keeps its parameters gathered after a forward without backward (the
        reshard(module)  # validation), and would show those, not the shards the optimizer steps
    optim = get_optimizer_state_dict(model, optimizer)  # states created (zero) when the optimizer has not stepped
    tensors = {"model": get_model_state_dict(model), "optimizer": _only_tensors(optim["state"])}
    if ema is not None:
        tensors["model_ema"] = get_model_state_dict(ema)
    return tensors, optim["param_groups"]


def _only_tensors(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {k: v for k, v in values.items() if isinstance(v, torch.Tensor)} for name, values in state.items()}


def save_sharded(tensors: dict, rest: dict[str, Any], folder: Path, step: int, keep_last: int = 1,
                 group: Any = None) -> Path:
    """Every rank writes its shards of ``tensors`` (a CPU copy, or the live ones) into a new save folder under
    ``folder``; rank 0 adds ``rest`` as ``state.pt``, then points ``last.dcp`` at it and removes the saves beyond
    ``keep_last``. Collective over ``group`` (its own gloo group when it runs beside training). Returns last.dcp."""
    import torch.distributed.checkpoint as dcp

    name = f"dcp-step_{step:08d}"
    tmp = distributed.broadcast_object(temp_name(folder / f".{name}"), group=group)  # rank 0's name for all
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), process_group=group)
    except (Exception, CheckpointException) as e:  # a full disk on some rank: one line, the last save kept
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _cause(e)
        if isinstance(cause, OSError):
            raise CheckpointWriteError(write_failure(folder / LAST, cause)) from None
        raise VitrainError(f"cannot write {folder / LAST}: {first_line(cause)}") from None
    if distributed.get_rank() == 0:  # DCP's coordinator returns once every rank's shards are written
        save_checkpoint(rest, tmp / STATE)
        final = folder / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        link = temp_name(folder / f".{LAST}")
        os.symlink(name, link)
        os.replace(link, folder / LAST)  # the link moves only when the save is whole
        fsync_folder(folder)
        for old in sorted(folder.glob("dcp-step_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(group=group)
    return folder / LAST


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 ema: nn.Module | None) -> dict[str, Any]:
    """Load a :func:`save_sharded` folder into ``model``, ``optimizer`` and ``ema`` (any strategy, any number of
    ranks: DCP reshards); returns ``state.pt``'s dict, with ``optimizer`` and ``model_ema`` marked as loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = path.resolve()
    check_metadata(path)
    rest = load_checkpoint(path / STATE)
    tensors, _ = tensors_of(model, optimizer, ema if "model_ema" in rest.get("sharded", ()) else None)
    try:
        dcp.load(tensors, checkpoint_id=path)
    except (Exception, CheckpointException) as e:
        cause = _cause(e)
        raise VitrainError(f"cannot load sharded checkpoint {path}: {first_line(cause)}; it does not match this "
                           f"model (a checkpoint of another model or number of classes?)") from e
    set_model_state_dict(model, tensors["model"])
    groups = rest.pop("param_groups")
    set_optimizer_state_dict(model, optimizer, {"state": tensors["optimizer"], "param_groups": groups})
    if "model_ema" in tensors:
        set_model_state_dict(ema, tensors["model_ema"])
    return rest


def _cause(error: BaseException) -> BaseException:
    """The first rank's own error inside DCP's CheckpointException (which says only which ranks failed)."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


class _Refused(Exception):
    """A global outside DCP's own classes, named by a .metadata pickle."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES or (module, name) in _ALLOWED or (module == "torch" and _is_dtype(name)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _is_dtype(name: str) -> bool:
    return isinstance(getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format)


def check_metadata(path: Path) -> None:
    """A DCP folder's ``.metadata``, read without running any code it names: one of DCP's own, describing
    tensors only (DCP would unpickle anything else it describes). Anything else is a one-line refusal."""
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
    except _Refused as e:
        raise VitrainError(f"cannot load sharded checkpoint {path}: refused, its .metadata names {e}, which could "
                           f"run code when unpickled; nothing was executed. Use a folder written by vitrain") from e
    except Exception as e:
        raise VitrainError(f"cannot load sharded checkpoint {path}: .metadata is unreadable ({type(e).__name__}); "
                           f"the folder is corrupt or incomplete") from e
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    if not isinstance(metadata, Metadata):
        raise VitrainError(f"cannot load sharded checkpoint {path}: .metadata is not DCP's; the folder is corrupt")
    other = [k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if other:
        raise VitrainError(f"cannot load sharded checkpoint {path}: refused, it holds Python objects beyond tensors "
                           f"({other[0]}), which could run code when unpickled; nothing was executed")
