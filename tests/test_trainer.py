"""The training loop, used directly (no Hydra) and through the composed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitrain.checkpoint import load_checkpoint
from vitrain.config import compose
from vitrain.data.datasets import load_digits
from vitrain.losses import ClassificationLoss
from vitrain.models import create_model
from vitrain.optim import build_optimizer, build_scheduler
from vitrain.train import train
from vitrain.trainer import Trainer

SMOKE = ["trainer.epochs=1", "data.batch_size=720", "trainer.progress=false"]  # 1437 images: 2 steps


def test_two_step_smoke_run_writes_logs_checkpoints_metrics(tmp_path: Path) -> None:
    cfg = compose(SMOKE)
    metrics = train(cfg, tmp_path)
    assert metrics["steps"] == 2 and metrics["epochs"] == 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("best_top1", "final_top1", "epochs", "train_images_per_sec", "wall_time_sec"):
        assert key in saved
    assert 0.0 <= saved["final_top1"] <= 100.0 and saved["train_images_per_sec"] > 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert (last["epoch"], last["step"]) == (1, 2)
    assert "optimizer" in last and "optimizer" not in best
    assert best["class_names"] == [str(i) for i in range(10)]
    assert best["config"]["model"]["name"] == "vit_nano_patch4_16"

    # The saved weights reproduce the reported accuracy.
    model = create_model(best["model_name"], num_classes=10, img_size=cfg.model.img_size)
    model.load_state_dict(best["model"])
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ClassificationLoss(),
                      [], _digits_val_loader(cfg), tmp_path / "check", epochs=1, progress=False)
    assert trainer.evaluate()["top1"] == saved["final_top1"]


def _digits_val_loader(cfg) -> DataLoader:
    from vitrain.data import build_datasets, build_loaders

    d = cfg.data
    splits = build_datasets("digits", cfg.model.img_size, d.mean, d.std, interpolation=d.interpolation)
    return build_loaders(splits, 64)[1]


def test_loop_fits_a_small_batch(tmp_path: Path) -> None:
    """240 steps on 64 digits: the loop memorises them (loss down more than 10x, top-1 >= 90%)."""
    torch.manual_seed(0)
    train_set, _, _ = load_digits()
    x = torch.nn.functional.interpolate(train_set.images[:64].float() / 127.5 - 1, size=16)
    data = TensorDataset(x, train_set.labels[:64])
    loader = DataLoader(data, batch_size=16, shuffle=True)
    model = create_model("vit_nano_patch4_16", num_classes=10)
    optimizer = build_optimizer(model, lr=2e-3, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, total_steps=240, name="constant")
    trainer = Trainer(model, optimizer, scheduler, ClassificationLoss(), loader, loader, tmp_path,
                      epochs=60, progress=False, log_every=4)
    metrics = trainer.fit()
    losses = [row["train_loss"] for row in metrics["history"]]
    assert losses[-1] < losses[0] / 10
    assert metrics["final_top1"] >= 90.0  # on the images it trained on
    assert trainer.learning_rates() == {"backbone": 2e-3, "head": 2e-3}


def test_two_head_outputs_train_both_heads() -> None:
    """A (cls, dist) pair of outputs is scored on both heads, averaged."""
    loss = ClassificationLoss()
    labels = torch.tensor([0, 1])
    good, bad = torch.tensor([[5.0, -5.0], [-5.0, 5.0]]), torch.zeros(2, 2)
    pair = loss(None, (good, bad), labels)
    expected = (loss(None, good, labels) + loss(None, bad, labels)) / 2
    torch.testing.assert_close(pair, expected)


@pytest.mark.parametrize("overrides", [
    ["model=deit_tiny", "model.img_size=32"],
    ["model=swin", "model.img_size=32", "model.window_size=4"],  # 8x8 grid: 4x4 windows, then one window
    ["model=swin_nano"],
    ["model=timm", "model.name=resnet18", "model.img_size=32"],
    ["model=torchvision", "model.name=resnet18", "model.img_size=32"],
])
def test_model_families_train_and_their_checkpoints_reload(tmp_path: Path, overrides: list[str]) -> None:
    """Two steps on digits, then best.pt goes back through create_model(checkpoint=...) and scores the same."""
    cfg = compose([*SMOKE, *overrides])
    metrics = train(cfg, tmp_path)
    m = cfg.model
    extra = {"window_size": m.window_size} if "window_size" in m else {}
    model = create_model(m.name, num_classes=10, img_size=m.img_size, source=m.source,
                         checkpoint=tmp_path / "checkpoints" / "best.pt", **extra)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ClassificationLoss(),
                      [], _digits_val_loader(cfg), tmp_path / "check", epochs=1, progress=False)
    assert trainer.evaluate()["top1"] == metrics["final_top1"]
