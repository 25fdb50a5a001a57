"""The checkpoint format: files written by vitrain 0.1.0 keep loading, evaluating and resuming; a save
killed mid-write leaves nothing behind for the next run."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from vitrain.checkpoint import (
    load_checkpoint,
    load_training_checkpoint,
    remove_partial_saves,
    save_checkpoint,
    write_checkpoints,
)
from vitrain.config import compose
from vitrain.evaluate import evaluate_checkpoint
from vitrain.inference import load_trained
from vitrain.predict import predict
from vitrain.train import train

V010 = Path(__file__).parent / "data" / "v0.1.0"  # made by vitrain 0.1.0; reference.json says how
REFERENCE = json.loads((V010 / "reference.json").read_text())
V010_RUN = ["+model.depth=2", "+model.embed_dim=32", "trainer.ema=true", "trainer.ema_decay=0.9",
            "trainer.progress=false"]


def test_a_010_checkpoint_is_upgraded_to_todays_format() -> None:
    state = load_training_checkpoint(V010 / "best.pt")
    assert state["vitrain_version"] == "0.1.0" and "model_spec" not in load_checkpoint(V010 / "best.pt")
    assert state["model_spec"] == {"name": "vit_nano_patch4_16", "source": "vitrain", "num_classes": 10,
                                   "img_size": 16, "drop_rate": 0.0, "drop_path_rate": 0.0, "depth": 2,
                                   "embed_dim": 32}
    assert state["preprocess"] == {"img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    assert state["global_batch"] == 32
    trained = load_trained(V010 / "best.pt", "cpu")
    assert trained.ema is not None and trained.class_names == [str(i) for i in range(10)]
    assert trained.data is not None and trained.data.name == "digits"


def test_a_010_checkpoint_evaluates_to_the_same_top1(tmp_path: Path) -> None:
    """Scored by 0.1.0's evaluate: 25.83% (raw) and 25.56% (EMA) on the 360 test digits; one image is 0.28%."""
    (tmp_path / "run").mkdir()
    shutil.copytree(V010, tmp_path / "run" / "checkpoints")  # evaluate writes beside it, and into <run>/tb
    result = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    expected = REFERENCE["evaluate_best"]
    assert result["model"]["top1"] == pytest.approx(expected["model_top1"], abs=1e-9)
    assert result["model_ema"]["top1"] == pytest.approx(expected["model_ema_top1"], abs=1e-9)
    old = json.loads((V010 / "eval_best.json").read_text())["model"]
    assert result["model"]["confusion"] == old["confusion"]
    top = predict(V010 / "best.pt", Path(__file__).parent.parent / "docs" / "images" / "digit_3.png", topk=3)
    assert len(top[0]["top"]) == 3 and sum(t["probability"] for t in top[0]["top"]) <= 1.0


def test_a_010_last_pt_resumes_to_the_same_weights_as_010(tmp_path: Path) -> None:
    """0.1.0 resumed its own last.pt (end of epoch 3) to epoch 4 with these numbers; today's code continues
    the same way: the same batches, random draws and weights (CPU, in-memory data)."""
    shutil.copytree(V010, tmp_path / "run" / "checkpoints", ignore=shutil.ignore_patterns("*.json"))
    cfg = compose([*V010_RUN, "trainer.epochs=4", "trainer.resume=auto"])
    metrics = train(cfg, tmp_path / "run")
    expected = REFERENCE["resumed_to_epoch_4"]
    assert metrics["steps"] == 4 * 45 and len(metrics["history"]) == 4
    assert metrics["final_top1"] == pytest.approx(expected["final_top1"], abs=1e-9)
    assert metrics["final_top1_ema"] == pytest.approx(expected["final_top1_ema"], abs=1e-9)
    assert metrics["final_val_loss"] == pytest.approx(expected["final_val_loss"], rel=1e-5)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["vitrain_version"] != "0.1.0" and state["model_spec"]["depth"] == 2


def test_leftovers_of_a_killed_save_are_removed_and_the_checkpoints_kept(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    save_checkpoint({"step": 7}, folder / "last.pt")
    (folder / "last.pt.tmp").write_bytes(b"half a checkpoint")
    (folder / "step_00000008.pt.tmp").write_bytes(b"")
    assert [p.name for p in remove_partial_saves(folder)] == ["last.pt.tmp", "step_00000008.pt.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]
    assert torch.load(folder / "last.pt", weights_only=True) == {"step": 7}
    assert remove_partial_saves(tmp_path / "none") == []


def test_the_next_run_in_the_folder_removes_the_leftovers(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.pt.tmp").write_bytes(b"half a checkpoint")
    train(compose(["trainer.epochs=1", "data.batch_size=720", "trainer.progress=false"]), tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]


def test_a_background_save_returns_before_the_write_and_keeps_the_state_it_was_given(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """The writer thread is held at torch.save: submit() has returned and last.pt is not there yet; the weights
    change in place meanwhile (the next step); once released, last.pt holds the weights as they were at submit."""
    import threading

    import vitrain.checkpoint as checkpoint

    release, real_save = threading.Event(), torch.save

    def held_save(obj: object, f: object) -> None:
        assert release.wait(30)
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", held_save)
    weights = torch.arange(6.0)
    from vitrain.saving import BackgroundSaves

    saves = BackgroundSaves()
    path = saves.submit({"model": {"w": weights}, "step": 1, "history": [{"epoch": 1}]},
                        partial(write_checkpoints, folder=tmp_path, best_val={"top1": 1.0}), tmp_path / "last.pt")
    weights.add_(100.0)  # the optimizer's next step, while the save is in flight
    assert path == tmp_path / "last.pt" and not path.exists()
    release.set()
    saves.wait()
    for name in ("last.pt", "best.pt"):
        assert torch.equal(load_checkpoint(tmp_path / name)["model"]["w"], torch.arange(6.0))
    assert len(saves.write_seconds) == 1 and len(saves.copy_seconds) == 1


def test_a_failed_background_save_is_raised_at_the_next_wait_and_the_old_files_stay(tmp_path: Path,
                                                                                     monkeypatch) -> None:
    import os

    from vitrain.checkpoint import CheckpointWriteError
    from vitrain.saving import BackgroundSaves

    saves = BackgroundSaves()
    write = partial(write_checkpoints, folder=tmp_path, best_val={"top1": 1.0})
    saves.submit({"model": {"w": torch.ones(3)}, "step": 1}, write, tmp_path / "last.pt")
    saves.wait()

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    saves.submit({"model": {"w": torch.zeros(3)}, "step": 2}, write, tmp_path / "last.pt")
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*last.pt: Input/output error"):
        saves.wait()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1 and load_checkpoint(tmp_path / "best.pt")["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(RuntimeError, match="the loop failed"), saves.flushed():  # an error on its way out: the
        saves.submit({"model": {"w": torch.zeros(3)}, "step": 3}, write, tmp_path / "last.pt")  # it still lands
        raise RuntimeError("the loop failed")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3


@pytest.mark.slow
def test_a_run_saved_in_the_background_equals_one_saved_in_place(tmp_path: Path) -> None:
    """trainer.async_save=true (the default) and false: the same checkpoints, tensor for tensor."""
    args = ["trainer.epochs=2", "trainer.progress=false", "logger=[]", "data.batch_size=64",
            "scheduler.warmup_epochs=0"]
    train(compose(args), tmp_path / "async")
    train(compose([*args, "trainer.async_save=false"]), tmp_path / "sync")
    for name in ("last.pt", "best.pt"):
        ours, theirs = (load_checkpoint(tmp_path / run / "checkpoints" / name) for run in ("async", "sync"))
        assert ours["step"] == theirs["step"]
        for row, other in zip(ours["history"], theirs["history"], strict=True):  # all but the timing
            assert {k: v for k, v in row.items() if k != "images_per_sec"} == \
                {k: v for k, v in other.items() if k != "images_per_sec"}
        for part in ("model", "model_ema"):
            assert all(torch.equal(v, theirs[part][k]) for k, v in ours.get(part, {}).items())
        if "optimizer" in ours:
            for i, state in ours["optimizer"]["state"].items():
                assert all(torch.equal(v, theirs["optimizer"]["state"][i][k]) for k, v in state.items())
