"""Data-parallel training under torchrun: the samplers' sharding, and real 2-process runs on the CPU (gloo)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitrain.checkpoint import check_resume_position, load_checkpoint
from vitrain.config import compose, to_config
from vitrain.data import EpochSampler, ShardedEpochSampler, ShardSampler
from vitrain.data.gpu import DeviceLoader, GpuAugment
from vitrain.distributed import World, init_distributed
from vitrain.errors import ConfigError
from vitrain.evaluate import evaluate_checkpoint
from vitrain.models import create_model
from vitrain.optim import optimizer_and_schedule
from vitrain.train import train


def shards(size: int, world: int, batch: int, drop_last: bool = False, epoch: int = 3) -> list[list[list[int]]]:
    """Every rank's batches of one epoch: shards[rank][step] is a list of indices."""
    out = []
    for rank in range(world):
        sampler = ShardedEpochSampler(size, 7, rank, world, batch, drop_last)
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(sampler)
        out.append([order[i : i + batch] for i in range(0, len(order), batch)])
    return out


@pytest.mark.parametrize(("size", "world", "batch"), [(37, 2, 4), (40, 4, 3), (429, 2, 16), (64, 2, 32), (30, 3, 5)])
def test_each_step_of_all_ranks_is_the_single_process_batch(size: int, world: int, batch: int) -> None:
    """Step k of all ranks together holds the indices of step k of one process with a batch of
    batch x world, from the same shuffled order; every index once per epoch; the same steps on all ranks."""
    ranks = shards(size, world, batch)
    single = EpochSampler(size, 7)
    single.set_epoch(3)
    order, big = list(single), batch * world
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == math.ceil(size / big)
    for k in range(len(ranks[0])):
        step = [i for r in ranks for i in r[k]]
        assert sorted(step) == sorted(order[k * big : (k + 1) * big]), k
    everything = [i for r in ranks for b in r for i in b]
    assert sorted(everything) == list(range(size))


def test_drop_last_keeps_whole_global_batches_only() -> None:
    ranks = shards(429, 2, 16, drop_last=True)  # 13 steps of 32; the 13 left over are dropped, as by one process
    assert [len(r) for r in ranks] == [13, 13] and all(len(b) == 16 for r in ranks for b in r)


def test_a_last_step_with_fewer_images_than_ranks_waits_for_the_next_epoch() -> None:
    """65 images, 2 ranks of 32: the 65th would be one rank's batch alone (its DDP step unmatched), so it
    is left out of this epoch; the other 64 are dealt out as usual."""
    ranks = shards(65, 2, 32)
    assert [len(r) for r in ranks] == [1, 1]
    single = EpochSampler(65, 7)
    single.set_epoch(3)
    assert sorted(ranks[0][0] + ranks[1][0]) == sorted(list(single)[:64])


def test_resume_start_counts_this_ranks_indices() -> None:
    """set_epoch(epoch, start=j x batch) continues every rank after its j-th batch, as the trainer does."""
    for rank in range(2):
        sampler = ShardedEpochSampler(101, 1, rank, 2, 8)
        sampler.set_epoch(2)
        full = list(sampler)
        sampler.set_epoch(2, start=3 * 8)
        assert list(sampler) == full[24:] and len(sampler) == len(full) - 24
    with pytest.raises(ValueError):
        ShardedEpochSampler(10, 0, 2, 2, 4)


def test_device_loaders_of_the_ranks_together_give_the_single_process_batches() -> None:
    """The device-resident data path with the sharded sampler: per step, the labels (here the image
    indices) of both ranks are those of one loader with the doubled batch; each rank augments its own."""
    images, labels = torch.randint(0, 256, (45, 3, 8, 8), dtype=torch.uint8), torch.arange(45)
    augment = GpuAugment(8, (0.5,) * 3, (0.5,) * 3, True, crop_padding=2)
    single = DeviceLoader(images, labels, 8, augment, EpochSampler(45, 3))
    ranks = [DeviceLoader(images, labels, 4, augment, ShardedEpochSampler(45, 3, r, 2, 4)) for r in range(2)]
    for loader in (single, *ranks):
        loader.sampler.set_epoch(1)
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 6
    for (_, y), (_, y0), (_, y1) in zip(single, *ranks, strict=True):
        assert sorted(y.tolist()) == sorted(y0.tolist() + y1.tolist())
    assert ranks[0].batch_seed(1, 0) != ranks[1].batch_seed(1, 0)


@pytest.mark.parametrize(("size", "world"), [(369, 2), (10, 4), (3, 4)])
def test_val_shards_hold_every_image_once(size: int, world: int) -> None:
    parts = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(size))
    assert [len(ShardSampler(size, rank, world)) for rank in range(world)] == [len(p) for p in parts]


def test_bad_backend_settings_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked before joining any process group, so no second process is needed."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match="dist_backend=nccl needs CUDA devices"):
        init_distributed("cpu", "nccl")
    with pytest.raises(ConfigError, match="unknown trainer.dist_backend 'mpi'"):
        init_distributed("cpu", "mpi")


def test_scale_lr_follows_the_global_batch() -> None:
    """DeiT's rule over all processes: lr x (batch_size x accum_steps x processes) / 512."""
    cfg = to_config(compose(["optimizer.scale_lr=true", "optimizer.lr=5e-4"]))
    model = create_model("vit_nano_patch4_16", num_classes=10)
    for global_batch in (64 * 4 * 2, 64):  # batch_size 64, accum_steps 4, 2 processes; one process
        optimizer, _ = optimizer_and_schedule(model, cfg.optimizer, cfg.scheduler, global_batch, 10, 1)
        assert {g["initial_lr"] for g in optimizer.param_groups} == {5e-4 * global_batch / 512}


def test_resuming_inside_an_epoch_needs_the_same_global_batch() -> None:
    state = {"config": {"data": {"batch_size": 16}}, "world_size": 2, "batch_in_epoch": 5}
    check_resume_position(state, 32)
    check_resume_position({**state, "batch_in_epoch": 0}, 64)  # at an epoch's end any batch goes
    with pytest.raises(ConfigError, match="inside an epoch with 32 images per step"):
        check_resume_position(state, 64)


# --- real runs: 2 processes on the CPU through torchrun (gloo) ---

# the digits cut to 429 train images (odd: the last step of 13 splits 7 + 6 between the ranks) and
# 369 val images (odd: no rank can pad its share without counting an image twice)
SMALL = ["data.train_fraction=0.3", "data.test_fraction=0.205", "trainer.progress=false", "data.num_workers=0",
         "trainer.log_every=5"]
# nothing random during training, so that 2 processes and 1 can be compared weight for weight
DETERMINISTIC = [*SMALL, "trainer.epochs=2", "data.crop_padding=0", "model.drop_path=0", "model.drop_rate=0"]
# max |difference| of any weight after 28 AdamW steps: float sums in another order give about 1e-5;
# averaging the ranks' 7 + 6 image last steps unweighted would give about 5e-4
WEIGHT_TOLERANCE = 1e-4


def torchrun(args: list[str], cwd: Path, **popen: object) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "vitrain.train", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_to_end(args: list[str], cwd: Path) -> str:
    proc = torchrun(args, cwd)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def test_two_processes_train_and_evaluate_like_one_with_the_global_batch(tmp_path: Path) -> None:
    """One run folder (although the folder name has microseconds, which differ between the processes),
    written by rank 0 alone; the weights of 2 x 16 images per step match one process with 32; the
    all-reduced top-1 equals a single-process evaluation of the checkpoint over all 369 val images."""
    run_to_end([*DETERMINISTIC, "data.batch_size=16", "hydra.run.dir=outputs/${now:%H-%M-%S-%f}"], tmp_path)
    folders = list((tmp_path / "outputs").iterdir())
    assert len(folders) == 1, folders
    run = folders[0]
    for pattern in ("metrics.json", "tb/events.out.tfevents.*", ".hydra/config.yaml", "*.log", "checkpoints/last.pt"):
        assert len(list(tmp_path.rglob(pattern))) == 1, pattern
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 * 14

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1); much faster on a busy 2-core machine
    try:
        single = train(compose([*DETERMINISTIC, "data.batch_size=32"]), tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    assert single["steps"] == metrics["steps"]
    ddp_state = load_checkpoint(run / "checkpoints" / "last.pt")
    one_state = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")
    assert ddp_state["model"].keys() == one_state["model"].keys()  # no "module." prefix
    assert ddp_state["world_size"] == 2 and len(ddp_state["rng_ranks"]) == 2
    gap = max((ddp_state["model"][k] - v).abs().max().item() for k, v in one_state["model"].items())
    assert gap < WEIGHT_TOLERANCE

    scored = evaluate_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert scored["images"] == 369
    assert scored["top1"] == pytest.approx(metrics["final_top1"], abs=1e-9)


# random crops (on the device-side data path), drop path, mixup (and with it drop_last), EMA: every
# rank's own randomness must come back on resume
RANDOM = [*SMALL, "trainer.epochs=3", "data.batch_size=16", "data.pipeline=gpu", "model.drop_path=0.1",
          "data.mixup=0.5", "trainer.ema=true", "trainer.ema_decay=0.9"]


def worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of ``rank`` (Linux: from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_and_resume_is_exact(tmp_path: Path) -> None:
    """SIGTERM reaches rank 1 only: both ranks stop after the same step, rank 0 writes the checkpoint
    and the resume command; continuing from it ends with the weights of a run that never stopped."""
    run_to_end([*RANDOM, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path)

    stopped = tmp_path / "stopped"
    every = ["trainer.checkpoint_every_steps=4"]  # a first last.pt soon after training starts
    proc = torchrun([*RANDOM, *every, f"hydra.run.dir={stopped}"], tmp_path)
    deadline = time.time() + 200
    while not (stopped / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    pid = worker_pid(proc.pid, 1)
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode != 0, err[-3000:]
    assert err.count("stopped by SIGTERM") == 1, err[-3000:]
    assert "resume with: torchrun --nproc_per_node=2 -m vitrain.train" in err
    saved = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert 4 <= saved["step"] < 3 * 13 and f"after step {saved['step']};" in err, (saved["step"], err[-3000:])
    metrics = json.loads((stopped / "metrics.json").read_text())  # whatever torchrun's own exit code says
    assert (metrics["state"], metrics["signal"], metrics["steps"]) == ("preempted", "SIGTERM", saved["step"])

    run_to_end([*RANDOM, *every, f"hydra.run.dir={stopped}", "trainer.resume=auto"], tmp_path)
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 3 * 13
    for part in ("model", "model_ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} (stopped after step {saved['step']})"
    assert [r["val_top1"] for r in a["history"]] == [r["val_top1"] for r in b["history"]]


# --- srun without torchrun: SLURM's variables for 2 tasks on one node ---

def slurm_env(rank: int, job: int = 4242) -> dict[str, str]:
    """What srun gives task ``rank`` of 2 on one node (the names SLURM sets; no torchrun variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_")) and
           k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": str(job), "SLURM_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost",
            "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}


def test_slurm_variables_become_torchruns(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitrain.distributed import first_host, launcher, torchrun_world

    # a copy of the environment for this test: what slurm_to_torchrun sets must not reach the tests after it
    monkeypatch.setattr(os, "environ", {**slurm_env(1, job=123456), "SLURM_JOB_NODELIST": "gpu[007-009,012],cpu1"})
    assert torchrun_world() == World(rank=1, local_rank=1, size=2)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], os.environ["LOCAL_WORLD_SIZE"]) == (
        "gpu007", str(15000 + 123456 % 20000), "2")
    assert launcher() == "srun python"
    assert first_host("node[1,3]") == "node1"


def test_a_batch_script_or_salloc_shell_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM_PROCID without a job step (the batch script itself, an salloc shell): plain python is rank 0 of 1."""
    from vitrain.distributed import torchrun_world

    env = slurm_env(0)
    del env["SLURM_STEP_ID"]
    monkeypatch.setattr(os, "environ", env)
    assert torchrun_world() == World(0, 0, 1) and "RANK" not in os.environ


@pytest.mark.slow
def test_srun_tasks_train_as_torchrun_does(tmp_path: Path) -> None:
    """2 tasks started as srun starts them (SLURM's variables only) write one run folder and end with the weights
    and figures of the same run under torchrun, exactly."""
    args = [*DETERMINISTIC, "data.batch_size=16"]
    run_to_end([*args, f"hydra.run.dir={tmp_path / 'torchrun'}"], tmp_path)
    tasks = [subprocess.Popen([sys.executable, "-m", "vitrain.train", *args, "hydra.run.dir=srun/${now:%H-%M-%S-%f}"],
                              cwd=tmp_path, env=slurm_env(rank), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    for task in tasks:
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err[-3000:]
    (run,) = (tmp_path / "srun").iterdir()  # one run folder, although the tasks started at other microseconds
    srun_metrics = json.loads((run / "metrics.json").read_text())
    torchrun_metrics = json.loads((tmp_path / "torchrun" / "metrics.json").read_text())
    def figures(metrics: dict) -> list[tuple]:
        return [(r["epoch"], r["train_loss"], r["val_loss"], r["val_top1"]) for r in metrics["history"]]

    assert figures(srun_metrics) == figures(torchrun_metrics) and srun_metrics["steps"] == 2 * 14
    ours = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    theirs = load_checkpoint(tmp_path / "torchrun" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
