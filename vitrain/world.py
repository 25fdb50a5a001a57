"""Where this process stands in a torchrun or ``srun`` job, read from the environment alone (no torch): the command
line's checks and the one-line errors need it before torch is imported. :mod:`vitrain.distributed` joins the
process group.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from vitrain.errors import ConfigError

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, TensorBoard events, checkpoints and metrics."""
        return self.rank == 0


def torchrun_world() -> World:
    """The world torchrun (or srun: :func:`slurm_to_torchrun`) describes in the environment; a plain ``python``
    process is rank 0 of 1."""
    slurm_to_torchrun()
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


def slurm_task() -> bool:
    """This process is one task of several that ``srun`` started (a job step: ``SLURM_STEP_ID``), not under
    torchrun (no ``RANK``): a batch script or an ``salloc`` shell that runs plain ``python`` is one process."""
    env = os.environ
    return ("RANK" not in env and "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
            and int(env.get("SLURM_NTASKS", "1")) > 1)


def slurm_to_torchrun() -> None:
    """Under ``srun`` (:func:`slurm_task`), set torchrun's variables from SLURM's: RANK from SLURM_PROCID,
    WORLD_SIZE from SLURM_NTASKS, LOCAL_RANK from SLURM_LOCALID, LOCAL_WORLD_SIZE the tasks on this node, and
    MASTER_ADDR the job's first node, MASTER_PORT derived from the job id (both unless already set), so that every
    task finds the same rendezvous. Nothing happens outside srun, or when torchrun set them."""
    if not slurm_task():
        return
    env = os.environ
    tasks = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               LOCAL_WORLD_SIZE=re.match(r"\d+", tasks).group(0))
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")))
    env.setdefault("MASTER_PORT", str(15000 + int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0) % 20000))


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``node[07-09,12],gpu1`` -> ``node07`` (a range keeps its zero
    padding), as ``scontrol show hostnames`` would list it first."""
    found = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if found is None:
        raise ConfigError(f"cannot read the first node of SLURM_NODELIST={nodelist}; set MASTER_ADDR")
    prefix, ranges = found.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def leave_process_group() -> None:
    """Leave the process group, if this process joined one (:func:`vitrain.distributed.close_distributed`); a command
    refused before torch was imported has none, and imports nothing here."""
    if "vitrain.distributed" in sys.modules:
        sys.modules["vitrain.distributed"].close_distributed()
