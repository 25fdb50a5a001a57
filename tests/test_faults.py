"""Runs that survive what a cluster or a laptop does to them: signals to the whole process group with loader
workers alive, a stop at every point of an epoch, two runs in one folder, a full disk, too many NaN batches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from formats import make_shards, write_id_folder

from vitrain import runfolder
from vitrain.checkpoint import CheckpointWriteError, load_checkpoint, remove_partial_saves, write_checkpoints
from vitrain.config import compose
from vitrain.errors import NonFiniteLoss, Preempted
from vitrain.train import train
from vitrain.trainer import Trainer

# Augmentation without random draws (no flips, a crop of the unpadded image), so that a run resumed with loader
# workers repeats the uninterrupted one exactly: the batch order and every step's state are what is tested.
FIXED = ["trainer.progress=false", "data.hflip=false", "data.crop_padding=0", "data.batch_size=4",
         "data.num_workers=2"]


def _history(metrics: dict) -> list[tuple[int, float, float]]:
    return [(row["epoch"], row["val_top1"], row["val_loss"]) for row in metrics["history"]]


def _same_figures(resumed: dict, whole: dict) -> None:
    assert [e for e, *_ in _history(resumed)] == [e for e, *_ in _history(whole)]
    for (epoch, top1, loss), (_, top1_ref, loss_ref) in zip(_history(resumed), _history(whole), strict=True):
        assert top1 == top1_ref and loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-6), f"epoch {epoch}"


@pytest.fixture(scope="module")
def id_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_id_folder(tmp_path_factory.mktemp("faults") / "ids", train=16, val=3)


def _data_args(kind: str, folder: Path, tmp_path: Path) -> list[str]:
    if kind == "imagefolder":
        return ["data=imagefolder", f"data.root={folder}"]
    if kind == "cache":
        return ["data=imagefolder", f"data.root={folder}", "data.cache=true", f"data.cache_dir={tmp_path}/cache"]
    make_shards(folder, tmp_path / "shards", per_shard=12)
    return ["data=webdataset", f"data.shards='{tmp_path}/shards/train-{{000000..000003}}.tar'",
            f"data.val_shards='{tmp_path}/shards/val-000000.tar'"]


@pytest.mark.parametrize("kind", ["imagefolder", pytest.param("shards", marks=pytest.mark.slow),
                                  pytest.param("cache", marks=pytest.mark.slow)])
def test_sigterm_to_the_process_group_saves_and_resumes_to_the_same_figures(kind: str, id_folder: Path,
                                                                            tmp_path: Path) -> None:
    """A real ``python -m vitrain.train`` with 2 loader workers gets SIGTERM through ``os.killpg``, as SLURM and
    ``timeout`` send it, early in epoch 2: exit 143 with last.pt written (the workers used to die first and the run
    ended in a traceback with nothing saved); the resumed run ends with the uninterrupted run's validation figures."""
    args = [*_data_args(kind, id_folder, tmp_path), *FIXED, "trainer.epochs=3"]
    whole = train(compose(args), tmp_path / "whole")
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "vitrain.train", *args, f"hydra.run.dir={run}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the end of epoch 1
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM" in err, err[-3000:]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 12 <= saved["step"] < 3 * 12
    stopped = json.loads((run / "metrics.json").read_text())  # what a requeue script reads, whatever the launcher
    assert (stopped["state"], stopped["signal"], stopped["exit_code"], stopped["steps"]) == (
        "preempted", "SIGTERM", 143, saved["step"])
    resumed = train(compose([*args, "trainer.resume=auto"]), run)
    assert json.loads((run / "metrics.json").read_text())["state"] == "complete"
    _same_figures(resumed, whole)


DIGITS = ["trainer.progress=false", "data.train_fraction=0.1", "data.batch_size=32", "trainer.epochs=2",
          "scheduler.warmup_epochs=1"]


def test_a_checkpoint_from_any_batch_of_an_epoch_resumes_to_the_same_figures(tmp_path: Path, monkeypatch) -> None:
    """Checkpoints saved after every batch of epoch 1 (5; the last one, before validation, included) and at its end
    each resume and end with the uninterrupted run's per-epoch validation figures and train losses.
    The one saved after an epoch's last batch used to be dead: ``__len__() should return >= 0``."""
    whole = train(compose([*DIGITS, "trainer.checkpoint_every_steps=1"]), tmp_path / "whole")
    saves: list[Path] = []
    save = Trainer._save

    def save_and_keep(self: Trainer, val=None) -> Path:
        path = save(self, val)
        self.saves.wait()  # written in the background: on disk now
        saves.append(path.with_name(f"save_{len(saves):02d}.pt"))
        shutil.copy(path, saves[-1])
        return path

    monkeypatch.setattr(Trainer, "_save", save_and_keep)
    train(compose([*DIGITS, "trainer.checkpoint_every_steps=1"]), tmp_path / "snapshots")
    monkeypatch.setattr(Trainer, "_save", save)
    positions = [(s["epoch"], s["batch_in_epoch"]) for s in map(load_checkpoint, saves)]
    assert (0, 5) in positions and (1, 0) in positions  # after epoch 1's last batch, and after its validation
    for i, snapshot in enumerate(saves[:6]):  # after batches 1-5 of epoch 1, then after its validation
        run = tmp_path / f"from_{i:02d}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(snapshot, run / "checkpoints" / "last.pt")
        resumed = train(compose([*DIGITS, "trainer.checkpoint_every_steps=1", "trainer.resume=auto"]), run)
        _same_figures(resumed, whole)
        train_loss = [r["train_loss"] for r in whole["history"]]  # the same sum, added up in another grouping
        assert [r["train_loss"] for r in resumed["history"]] == pytest.approx(train_loss, rel=1e-6), i


def test_a_signal_during_validation_stops_after_the_epochs_save(tmp_path: Path, monkeypatch) -> None:
    """SIGUSR1 (SLURM's ``--signal=USR1@90``) arriving while epoch 1 validates: the validation ends, the epoch is
    saved, and the run stops there (no step of the next epoch); the resume gives the same figures."""
    whole = train(compose(DIGITS), tmp_path / "whole")
    evaluate = Trainer.evaluate

    def signal_then_evaluate(self: Trainer, model=None) -> dict:
        if self.state.epoch == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return evaluate(self, model)

    monkeypatch.setattr(Trainer, "evaluate", signal_then_evaluate)
    with pytest.raises(Preempted) as stop:
        train(compose(DIGITS), tmp_path / "run")
    assert stop.value.signum == signal.SIGUSR1 and stop.value.step == 5
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["epoch"] == 1
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    _same_figures(train(compose([*DIGITS, "trainer.resume=auto"]), tmp_path / "run"), whole)


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time\nfrom vitrain import runfolder\nrunfolder.acquire(sys.argv[1])\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_pid(tmp_path: Path) -> None:
    """The first run's files stay as they were (Hydra's .hydra/ included); once the holder dies, however it dies
    (SIGKILL here), the kernel releases the lock and the folder can be used again."""
    run = tmp_path / "run"
    holder = _hold_lock(run)
    (run / ".hydra").mkdir()
    (run / ".hydra/overrides.yaml").write_text("- first run\n")
    (run / "train.log").write_text("")  # the first run at its start: no more than a refused run may take away
    try:
        result = subprocess.run([sys.executable, "-m", "vitrain.train", "trainer.epochs=1", f"hydra.run.dir={run}"],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip() == (f"error: run folder {run.resolve()} is in use by another run (PID "
                                         f"{holder.pid}); wait for it to end, stop it, or choose another hydra.run.dir")
        assert (run / ".hydra/overrides.yaml").read_text() == "- first run\n"
        assert sorted(p.name for p in run.rglob("*")) == [".hydra", ".lock", "overrides.yaml", "train.log"]
    finally:
        holder.kill()
        holder.wait()
    runfolder.acquire(run)  # free again
    runfolder.release(run)


def test_the_lock_is_reentrant_in_one_process_and_exclusive_between_processes(tmp_path: Path) -> None:
    with runfolder.locked(tmp_path), runfolder.locked(tmp_path):  # the Hydra callback, then train()
        assert runfolder.holds(tmp_path)
    assert not runfolder.holds(tmp_path)
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(runfolder.RunFolderInUse, match=f"PID {holder.pid}"):
            runfolder.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_run_refused_at_start_takes_away_only_the_empty_run_folder_it_made(tmp_path: Path) -> None:
    """discard_unused: the folders this process made and holds the lock of, holding only Hydra's start files, the
    log and empty folders, go (with the folders made above them); a folder with anything else, one that was there
    before, or one whose lock another process holds, stays."""
    (tmp_path / "outputs").mkdir()  # there before: stays
    made = tmp_path / "outputs" / "2025-01-01" / "12-00-00"
    kept = tmp_path / "outputs" / "2025-01-01" / "12-00-01"
    there = tmp_path / "there"
    there.mkdir()
    other = tmp_path / "other"
    for folder in (made, kept, there, other):
        runfolder.note_new(folder)
        (folder / ".hydra").mkdir(parents=True)
        for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"):
            (folder / name).write_text("x")
        (folder / "checkpoints").mkdir()
    for folder in (made, kept, there):
        runfolder.acquire(folder)
    holder = _hold_lock(other)
    (kept / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    try:
        assert runfolder.discard_unused() == [made.resolve()]
        assert not made.exists() and kept.is_dir() and (tmp_path / "outputs").is_dir()  # 2025-01-01 holds kept
        assert not runfolder.holds(made) and runfolder.holds(kept) and runfolder.holds(there)
        assert sorted(p.name for p in other.rglob("*")) == [".hydra", ".lock", "checkpoints", "config.yaml",
                                                             "hydra.yaml", "overrides.yaml", "train.log"]
    finally:
        holder.kill()
        holder.wait()
        for folder in (kept, there):
            runfolder.release(folder)  # the end of a run: its folder is no longer one to take away
    (kept / "checkpoints" / "last.pt").unlink()
    runfolder.acquire(kept)
    assert runfolder.discard_unused() == [] and kept.is_dir()
    runfolder.release(kept)


def test_only_the_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for name in (f"last.pt.{live.pid}-0a1b2c3d.tmp", f"last.pt.{dead.pid}-0a1b2c3d.tmp", "last.pt.tmp"):
            (tmp_path / name).write_bytes(b"half a checkpoint")
        removed = {p.name for p in remove_partial_saves(tmp_path)}
        assert removed == {f"last.pt.{dead.pid}-0a1b2c3d.tmp", "last.pt.tmp"}
        assert (tmp_path / f"last.pt.{live.pid}-0a1b2c3d.tmp").exists()  # a save still going on elsewhere
    finally:
        live.kill()
        live.wait()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 6 MiB tmpfs: room for one epoch's checkpoints of the default model (4.8 MB), not for a second pair
    beside them. Needs root (mount); skipped elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_keeps_the_last_good_pair_and_says_so(small_disk: Path) -> None:
    """ENOSPC on a real (small) file system: one line naming the file and the free space; no partial file left
    to keep the disk full; last.pt and best.pt both from epoch 1, loadable (best.pt never newer than last.pt)."""
    run = small_disk / "run"
    result = subprocess.run([sys.executable, "-m", "vitrain.train", "trainer.epochs=3", "trainer.progress=false",
                             "logger=[]", f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {run}/checkpoints/") and "No space left on device" in line
    assert "MiB free there" in line and "Traceback" not in result.stderr
    assert not list((run / "checkpoints").glob("*.tmp"))
    last, best = (load_checkpoint(run / "checkpoints" / name) for name in ("last.pt", "best.pt"))
    assert last["epoch"] == 1 and best["epoch"] == 1


def test_a_read_only_folder_and_an_io_error_leave_the_old_checkpoints(tmp_path: Path, monkeypatch) -> None:
    state = {"model": {"w": torch.ones(3)}, "step": 1, "epoch": 1}
    write_checkpoints(state, tmp_path, {"top1": 50.0})
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*last.pt: Input/output error \(\d+ MiB free"):
        write_checkpoints({**state, "step": 2, "epoch": 2}, tmp_path, {"top1": 60.0})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1 and load_checkpoint(tmp_path / "best.pt")["step"] == 1


def test_skipping_too_many_nonfinite_batches_stops_the_run(tmp_path: Path, monkeypatch) -> None:
    """trainer.skip_nonfinite used to end with exit 0 after skipping 85 of 90 batches; past
    trainer.max_skipped_fraction of an epoch's batches the run stops with the non-finite message."""
    from vitrain.losses import ClassificationLoss

    forward = ClassificationLoss.forward
    monkeypatch.setattr(ClassificationLoss, "forward", lambda self, i, o, t: forward(self, i, o, t) * float("nan"))
    with pytest.raises(NonFiniteLoss, match=r"3 of epoch 1's 45 batches had a NaN/inf loss, more than "
                                            r"trainer.max_skipped_fraction=0.05 allows \(2\)"):
        train(compose(["trainer.epochs=1", "trainer.progress=false", "trainer.skip_nonfinite=true"]), tmp_path)


def test_a_nonfinite_validation_loss_is_an_error_not_a_result(tmp_path: Path, monkeypatch) -> None:
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, model=None: {**evaluate(self, model), "loss": float("nan")})
    with pytest.raises(NonFiniteLoss, match="the validation loss is nan after epoch 1"):
        train(compose(DIGITS), tmp_path)
    assert not (tmp_path / "checkpoints" / "last.pt").exists() and not (tmp_path / "metrics.json").exists()


def test_metrics_json_is_written_whole(tmp_path: Path) -> None:
    metrics = train(compose([*DIGITS, "trainer.epochs=1", "scheduler.warmup_epochs=0"]), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == metrics["steps"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_the_default_warmup_is_only_warned_of_in_a_short_run(caplog) -> None:
    """``trainer.epochs=1`` (a smoke test) with the default 2-epoch warmup runs, with a warning; a warmup that
    was chosen and is as long as the run is refused (tests/test_train_cli.py)."""
    import yaml

    from vitrain.config import CONFIG_DIR, DEFAULT_WARMUP_EPOCHS, to_config

    assert yaml.safe_load((CONFIG_DIR / "scheduler/cosine.yaml").read_text())["warmup_epochs"] == DEFAULT_WARMUP_EPOCHS
    with caplog.at_level("WARNING"):
        to_config(compose(["trainer.epochs=1"]))
    assert "the default warmup of scheduler.warmup_epochs=2 is as long as this 1-epoch run" in caplog.text
