"""Nothing lost: exact resume after SIGTERM, atomic checkpoints under SIGKILL, non-finite losses."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitrain.checkpoint import load_checkpoint
from vitrain.config import compose
from vitrain.errors import NonFiniteLoss, Preempted, VitrainError
from vitrain.train import train
from vitrain.trainer import Trainer

# 4 epochs of 44 steps (mixup drops the short batch): random crops, drop path, mixup/cutmix, EMA
RUN = ["trainer.epochs=4", "trainer.progress=false", "model.drop_path=0.1", "data.mixup=0.5",
       "data.cutmix=1.0", "trainer.ema=true", "trainer.ema_decay=0.9"]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path: Path, monkeypatch) -> None:
    """176 steps uninterrupted, against the same run stopped by a real SIGTERM at step 100 (inside
    epoch 3) and continued with trainer.resume=auto: every tensor of the final checkpoint is equal."""
    whole = train(compose(RUN), tmp_path / "whole")

    step = Trainer._optimizer_step

    def step_then_signal(self: Trainer) -> None:
        step(self)
        if self.state.step == 100:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_signal)
    with pytest.raises(Preempted) as stop:
        train(compose(RUN), tmp_path / "stopped")
    assert (stop.value.signum, stop.value.step) == (signal.SIGTERM, 100)
    saved = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["batch_in_epoch"], saved["step"]) == (2, 12, 100)
    monkeypatch.setattr(Trainer, "_optimizer_step", step)

    resumed = train(compose([*RUN, "trainer.resume=auto"]), tmp_path / "stopped")
    assert resumed["steps"] == whole["steps"] == 176
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    for part in ("model", "model_ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    assert [r["val_top1"] for r in resumed["history"]] == [r["val_top1"] for r in whole["history"]]


def test_cli_sigterm_exits_143_and_prints_how_to_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "vitrain.train", "trainer.epochs=30", "trainer.progress=false",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.2)  # wait until training is under way (the first epoch's checkpoint)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "trainer.resume=auto" in err and "Traceback" not in err
    command = err.strip().splitlines()[-1].removeprefix("resume with: ").split()
    assert command[:3] == ["python", "-m", "vitrain.train"]
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 0 < saved["step"] < 30 * 45


def test_sigkill_while_writing_a_checkpoint_leaves_a_loadable_one(tmp_path: Path) -> None:
    """A process saving a 16 MB checkpoint in a loop is killed at random moments, 6 times: the file
    on disk always loads, and holds one whole save."""
    path = tmp_path / "last.pt"
    writer = ("import sys, torch\nfrom vitrain.checkpoint import save_checkpoint\ni = 0\nwhile True:\n"
              "    i += 1\n    save_checkpoint({'w': torch.full((4_000_000,), float(i)), 'i': i}, sys.argv[1])\n")
    rng = random.Random(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)])
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(path)
        assert torch.equal(state["w"], torch.full((4_000_000,), float(state["i"])))


def test_non_finite_loss_stops_at_its_step_without_saving_nan(tmp_path: Path) -> None:
    cfg = compose(["trainer.epochs=3", "trainer.progress=false", "optimizer.lr=1e30", "trainer.grad_clip=null",
                   "scheduler.warmup_epochs=0"])
    with pytest.raises(NonFiniteLoss, match=r"the loss is (nan|inf) at step \d+ \(epoch \d, batch \d+\)"):
        train(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    if last.exists():  # an epoch finished before the divergence: its weights are finite
        assert all(torch.isfinite(v).all() for v in load_checkpoint(last)["model"].values())


def test_skip_nonfinite_counts_and_goes_on(tmp_path: Path, monkeypatch) -> None:
    from vitrain.losses import ClassificationLoss

    forward = ClassificationLoss.forward
    calls = {"n": 0}

    def sometimes_nan(self, inputs, outputs, labels):  # every 10th batch gives a NaN loss
        calls["n"] += 1
        loss = forward(self, inputs, outputs, labels)
        return loss * float("nan") if calls["n"] % 10 == 0 else loss

    monkeypatch.setattr(ClassificationLoss, "forward", sometimes_nan)
    metrics = train(compose(["trainer.epochs=1", "trainer.progress=false", "trainer.skip_nonfinite=true",
                             "trainer.max_skipped_fraction=0.1"]), tmp_path)
    assert metrics["skipped_nonfinite"] == 4 and metrics["steps"] == 41  # 45 batches, 4 skipped
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"].values())


def test_resume_from_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VitrainError, match="trainer.resume=.*no such file"):
        train(compose(["trainer.resume=/nonexistent/last.pt", "trainer.progress=false"]), tmp_path)


def test_keep_last_bounds_the_numbered_checkpoints(tmp_path: Path) -> None:
    train(compose(["trainer.epochs=2", "data.batch_size=720", "trainer.progress=false", "trainer.keep_last=2",
                   "trainer.checkpoint_every_steps=1"]), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == ["step_00000003.pt",
                                                                                    "step_00000004.pt"]
