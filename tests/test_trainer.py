"""The training loop, used directly (no Hydra) and through the composed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitrain.checkpoint import load_checkpoint
from vitrain.config import compose, to_config
from vitrain.data.datasets import load_digits
from vitrain.losses import ClassificationLoss
from vitrain.models import create_model
from vitrain.optim import build_optimizer, build_scheduler
from vitrain.train import train
from vitrain.trainer import Loaders, Trainer, TrainerConfig

SMOKE = ["trainer.epochs=1", "data.batch_size=720", "trainer.progress=false"]  # 1437 images: 2 steps


def test_two_step_smoke_run_writes_logs_checkpoints_metrics(tmp_path: Path) -> None:
    cfg = to_config(compose(SMOKE))  # model.img_size resolved (null in the YAML: the model's own 16)
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
    model = create_model(**best["model_spec"])
    assert best["model_spec"]["name"] == "vit_nano_patch4_16" and best["model_spec"]["img_size"] == cfg.model.img_size
    model.load_state_dict(best["model"])
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ClassificationLoss(),
                      Loaders([], _digits_val_loader(cfg)), TrainerConfig(epochs=1, progress=False), tmp_path / "check")
    assert trainer.evaluate()["top1"] == saved["final_top1"]


def _digits_val_loader(cfg) -> DataLoader:
    from vitrain.data import DataConfig, build_datasets, cpu_loaders

    d = to_config(cfg).data.with_preprocess()  # the values the run resolved (no pretrained weights: the data set's)
    digits = DataConfig("digits", mean=list(d.mean), std=list(d.std), interpolation=d.interpolation)
    splits = build_datasets(digits, cfg.model.img_size)
    return cpu_loaders(splits, 64)[1]


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
    trainer = Trainer(model, optimizer, scheduler, ClassificationLoss(), Loaders(loader, loader),
                      TrainerConfig(epochs=60, progress=False, log_every=4), tmp_path)
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
    cfg = to_config(compose([*SMOKE, *overrides]))
    metrics = train(cfg, tmp_path)
    m = cfg.model
    extra = {"window_size": m.window_size} if m.window_size is not None else {}
    model = create_model(m.name, num_classes=10, img_size=m.img_size, source=m.source,
                         checkpoint=tmp_path / "checkpoints" / "best.pt", **extra)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ClassificationLoss(),
                      Loaders([], _digits_val_loader(cfg)), TrainerConfig(epochs=1, progress=False), tmp_path / "check")
    assert trainer.evaluate()["top1"] == metrics["final_top1"]


def _accum_run(accum: int, batch: int, tmp_path: Path) -> torch.nn.Module:
    """One optimizer step over the same 32 digits, as `accum` batches of `batch`."""
    torch.manual_seed(0)
    train_set, _, _ = load_digits()
    x = torch.nn.functional.interpolate(train_set.images[:32].float() / 127.5 - 1, size=16)
    loader = DataLoader(TensorDataset(x, train_set.labels[:32]), batch_size=batch, shuffle=False)
    model = create_model("vit_nano_patch4_16", num_classes=10)  # no dropout, no drop path
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # the update is the gradient itself
    scheduler = build_scheduler(optimizer, total_steps=1, name="constant")
    trainer = Trainer(model, optimizer, scheduler, ClassificationLoss(), Loaders(loader, loader),
                      TrainerConfig(epochs=1, progress=False, accum_steps=accum, grad_clip=None), tmp_path / str(accum))
    trainer.train_one_epoch(0)
    assert trainer.state.step == 1
    return model


def test_gradient_accumulation_4x8_equals_1x32(tmp_path: Path) -> None:
    a, b = _accum_run(4, 8, tmp_path), _accum_run(1, 32, tmp_path)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p - q).abs().max().item() <= 1e-5, name


def test_ema_update_equals_its_formula() -> None:
    """timm's ModelEmaV3 as the trainer uses it: ema <- d * ema + (1 - d) * w, per optimizer step."""
    from timm.utils import ModelEmaV3

    model = create_model("vit_nano_patch4_16", num_classes=3)
    ema = ModelEmaV3(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=5)  # (step 1 copies the weights: timm starts the average from them)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, 0.9 * start[k] + 0.1 * model.state_dict()[k])


def test_mixup_targets_are_soft_and_sum_to_one() -> None:
    from vitrain.data import build_mixup

    cfg = to_config(compose(["data.mixup=0.8", "data.cutmix=1.0", "loss.label_smoothing=0.1"]))
    mixup = build_mixup(cfg.data, num_classes=10, label_smoothing=cfg.loss.label_smoothing)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)
    mixed, targets = mixup(images.clone(), labels)
    assert targets.shape == (8, 10)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8))
    assert (targets.max(dim=1).values < 0.95).all()  # smoothed and mixed: no one-hot rows
    assert not torch.equal(mixed, images)
    loss = ClassificationLoss(label_smoothing=0.1)(mixed, torch.randn(8, 10), targets)
    assert torch.isfinite(loss)


def test_ema_mixup_accumulation_run_end_to_end(tmp_path: Path) -> None:
    """The DeiT-style knobs together on digits; the EMA weights are evaluated and saved beside the raw ones."""
    cfg = compose([*SMOKE, "data.batch_size=64", "trainer.accum_steps=2", "trainer.ema=true",
                   "trainer.ema_decay=0.5", "data.mixup=0.8", "data.cutmix=1.0", "optimizer.layer_decay=0.75"])
    metrics = train(cfg, tmp_path)
    assert metrics["steps"] == 11 and "final_top1_ema" in metrics  # 22 full batches of 64 (mixup drops the last)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert last["model_ema"].keys() == last["model"].keys()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains(precision: str, tmp_path: Path) -> None:
    """Autocast in bf16, and fp16 with the grad scaler, run on the CPU too (on CUDA they are the point)."""
    cfg = compose([*SMOKE, f"trainer.precision={precision}"])
    metrics = train(cfg, tmp_path)
    assert metrics["steps"] == 2 and 0 <= metrics["final_top1"] <= 100
    assert torch.isfinite(torch.tensor(metrics["history"][0]["train_loss"]))
