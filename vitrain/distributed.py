"""Data-parallel training across processes started by ``torchrun`` or SLURM's ``srun``, through ``torch.distributed``.

torchrun starts one process per device and tells each its place in the environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); ``srun`` does the same in its own words
(``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_NODELIST``), which :func:`slurm_to_torchrun`
translates, as Lightning's SLURM environment does. :func:`init_distributed` joins the
process group from it (env://) and picks the rank's device, ``cuda:LOCAL_RANK`` on a GPU machine.
The helpers below are collectives that return their input unchanged in a single process, so the
trainer calls them without branching on the world size.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vitrain.errors import ConfigError
from vitrain.world import BACKENDS, World, first_host, slurm_task, slurm_to_torchrun, torchrun_world  # noqa: F401

T = TypeVar("T")


def resolve_device(device: str = "auto", key: str = "trainer.device") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; a device PyTorch does not know is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{key}={device} is not a device PyTorch knows; use auto, cpu, cuda or cuda:N (or mps)") \
            from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={device} but no CUDA device is visible; use {key}=auto or cpu")
    return resolved


def launcher() -> str:
    """How this process was started, for a command line to repeat: ``python``, ``srun python``, or torchrun with
    its process count (on several nodes, with the options every node needs)."""
    world = torchrun_world()
    if world.size == 1:
        return "python"
    if "SLURM_PROCID" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return "srun python"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    if per_node == world.size:
        return f"torchrun --nproc_per_node={per_node}"
    return (f"torchrun --nnodes={world.size // per_node} --nproc_per_node={per_node} --rdzv_backend=c10d "
            f"--rdzv_endpoint=HOST:PORT")


def rank_device(setting: str, world: World) -> torch.device:
    """``trainer.device`` for this rank: auto and cuda become ``cuda:LOCAL_RANK`` (one GPU per process)."""
    device = resolve_device(setting)
    if world.size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"trainer.device={setting} puts every process on one GPU; under torchrun use "
                          f"trainer.device=auto or cuda (each process takes cuda:LOCAL_RANK)")
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"process {world.rank} has LOCAL_RANK {world.local_rank} but this node has "
                          f"{torch.cuda.device_count()} GPUs; set torchrun's --nproc_per_node to at most that")
    return torch.device("cuda", world.local_rank)


def init_distributed(device: str = "auto", backend: str = "auto") -> tuple[World, torch.device]:
    """Join torchrun's process group (once; later calls return the same answer) and pick this rank's
    device. ``backend``: auto is NCCL for CUDA devices and gloo on the CPU; with NCCL, CPU tensors (the
    stop flag, Python objects) go through gloo in the same group."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown trainer.dist_backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    world = torchrun_world()
    rank_dev = rank_device(device, world)
    if world.size == 1:
        return world, rank_dev
    if backend == "auto":
        backend = "nccl" if rank_dev.type == "cuda" else "gloo"
    if backend == "nccl" and rank_dev.type != "cuda":
        raise ConfigError(f"trainer.dist_backend=nccl needs CUDA devices, but this process trains on {rank_dev}; "
                          f"use trainer.dist_backend=gloo (or auto)")
    if not dist.is_initialized():
        if rank_dev.type == "cuda":
            torch.cuda.set_device(rank_dev)
        dist.init_process_group("cpu:gloo,cuda:nccl" if backend == "nccl" else backend, init_method="env://",
                                device_id=rank_dev if backend == "nccl" else None)
    return world, rank_dev


def close_distributed() -> None:
    """Leave the process group (if this process joined one). The trainer's DistributedDataParallel wrapper
    sits in reference cycles; collected later, at interpreter exit, it would tear down gloo's threads after
    the group is gone and abort the process ("terminate called without an active exception"). So collect
    it first, while the group is still there."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    """This process's rank in the process group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, or the only process."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks, in place; the tensor itself in a single process."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over the ranks (the tensor itself in a single process)."""
    return all_reduce_sum(tensor) / world_size()


def any_rank(value: int) -> int:
    """The largest ``value`` over the ranks (e.g. a signal number, 0 for none), so that every rank
    takes the same decision. A CPU tensor: with NCCL it goes through gloo, without a device sync."""
    if world_size() == 1:
        return value
    flag = torch.tensor([value])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (of ``group``: default, the whole job's)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def own_entry(per_rank: list[Any] | None, default: Any) -> Any:
    """This rank's item of a list that every rank contributed to (:func:`gather_objects`), or ``default``
    when the list is missing or came from another number of ranks."""
    return per_rank[get_rank()] if per_rank and len(per_rank) == world_size() else default


def barrier(group: Any = None) -> None:
    """Wait until every rank (of ``group``) gets here (e.g. until rank 0 has written a checkpoint)."""
    if world_size() > 1:
        dist.barrier(group=group)


def side_group() -> Any:
    """A gloo group of all ranks beside the training's own, for collectives from another thread (a checkpoint
    written in the background) that must not interleave with the training's; None in one process."""
    return dist.new_group(backend="gloo") if world_size() > 1 else None


def rank0_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the first process of every other node, then on the rest: a download
    (CIFAR) is made once, whether or not the nodes share the folder, instead of by all at once."""
    if world_size() == 1:
        return fn()
    world = torchrun_world()
    turn = 0 if world.rank == 0 else 1 if world.local_rank == 0 else 2
    result = None
    for t in range(3):
        if t == turn:
            result = fn()
        barrier()
    return result


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks (gradients averaged over them
    in the backward pass); the model itself otherwise. DDP registers the parameters that require
    gradients now: wrap again after unfreezing."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def last_batch_weight(batch: int, device: torch.device) -> torch.Tensor | float:
    """Weight of this rank's mean loss in the last step of an epoch, where ranks may hold one image
    more than others: DDP averages the ranks' gradients, and ``batch x ranks / images in the step``
    makes that average the mean over all the step's images (1 when every rank has the same count)."""
    if world_size() == 1:
        return 1.0
    total = all_reduce_sum(torch.tensor(float(batch), device=device))
    return batch * world_size() / total
