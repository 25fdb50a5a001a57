"""How the model is spread over the processes of a torchrun/srun job: DistributedDataParallel (a whole copy per
rank, gradients averaged) or FSDP2 (``fully_shard``: parameters, gradients and optimizer states sharded over the
ranks, each block gathered just before it runs), as torchtitan lays it out: activation checkpointing first, then
each transformer block sharded, then the root. The Trainer calls :func:`parallelize` and knows no more of it.

Checkpoints stay one format whatever the strategy (:func:`full_model_state`, :func:`full_optimizer_state` and their
loaders): plain full tensors and PyTorch's own optimizer layout, gathered from the shards, so a run saved on 2
ranks under FSDP2 continues on 1 or 4, under FSDP2 or DDP, and ``best.pt`` is what evaluate, predict and export
read.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vitrain import distributed
from vitrain.errors import ConfigError
from vitrain.schema.trainer import STRATEGIES, FsdpConfig, check_strategy, refuse_with_fsdp, uses_fsdp  # noqa: F401


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: ``blocks.N`` (ViT, DeiT, DeiT III, timm's ViTs) and
    ``layers.N.blocks.M`` (Swin), or ``stages.N.blocks.M`` (timm's hierarchical models)."""
    found = []
    for name, module in model.named_modules():
        parent, _, index = name.rpartition(".")
        if index.isdigit() and parent.rpartition(".")[2] == "blocks":
            found.append(module)
    return found


def parallelize(model: nn.Module, strategy: str, fsdp: FsdpConfig, device: torch.device,
                param_dtype: torch.dtype | None, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """``model`` ready for the training step: sharded in place by FSDP2 (``strategy=fsdp2``: each block, then the
    root; parameters in ``param_dtype`` for compute, gradients reduced in float32), or wrapped in DDP when there
    are several ranks, or itself (one process: nothing to shard or average). FSDP2 puts new (sharded) parameters in
    the model: ``optimizer``, made over the old ones and not stepped yet, is pointed at them."""
    if not uses_fsdp(strategy) or distributed.world_size() == 1:
        return distributed.wrap_ddp(model, device)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"trainer.strategy=fsdp2 shards transformer blocks, and {type(model).__name__} has none "
                          f"(no blocks.N); use trainer.strategy=ddp")
    names = {id(p): n for n, p in model.named_parameters()}
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    options = dict(mp_policy=policy, offload_policy=CPUOffloadPolicy() if fsdp.cpu_offload else OffloadPolicy())
    for block in blocks:
        fully_shard(block, reshard_after_forward=fsdp.reshard_after_forward, **options)
    fully_shard(model, reshard_after_forward=False, **options)  # the root: gathered again at once for backward
    if optimizer is not None:
        if optimizer.state:
            raise ConfigError("the optimizer has stepped already; shard the model (trainer.strategy=fsdp2) first")
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module | None) -> None:
    """Put every FSDP2 module of ``model`` back to its shards (a no-op for a model that is not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules() if model is not None else ():
        if isinstance(module, FSDPModule):
            module.reshard()


def _options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as plain full tensors: a sharded model's gathered into CPU memory on rank 0 (the
    other ranks, which take part, get an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
    """Full weights (:func:`full_model_state`, any strategy's checkpoint) into ``model``, sharded or not; with
    ``from_rank0``, only rank 0 holds them (the others pass an empty dict) and sends them out."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(broadcast_from_rank0=from_rank0))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state in PyTorch's own layout (``optimizer.state_dict()`` of the unsharded model: states
    keyed by each parameter's place in the groups), gathered from the shards on rank 0 (the others: {})."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options())
    if not by_name:  # a rank other than 0
        return {}
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for group in by_name["param_groups"]:
        groups.append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return {"state": {index[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """:func:`full_optimizer_state`'s layout (any strategy's checkpoint) into the optimizer of ``model``."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    groups, start = [], 0
    for group in state["param_groups"]:
        groups.append({**group, "params": order[start:start + len(group["params"])]})
        start += len(group["params"])
    by_name = {"state": {order[int(i)]: value for i, value in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())


@contextlib.contextmanager
def weights_of(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` with other full ``weights`` (the best epoch's) for a while: a copy, or, for a sharded model, which
    cannot be copied, the model itself with its own weights put back after."""
    if not is_sharded(model):
        other = copy.deepcopy(model)
        other.load_state_dict(weights)
        yield other
        return
    own = full_model_state(model)  # rank 0's, as ``weights`` are
    load_full_model_state(model, weights, from_rank0=True)
    try:
        yield model
    finally:
        load_full_model_state(model, own, from_rank0=True)


