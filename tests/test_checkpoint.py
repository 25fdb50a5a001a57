"""The checkpoint format: files written by vitrain 0.1.0 keep loading, evaluating and resuming; a save
killed mid-write leaves nothing behind for the next run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vitrain.checkpoint import load_checkpoint, load_training_checkpoint, remove_partial_saves, save_checkpoint
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
