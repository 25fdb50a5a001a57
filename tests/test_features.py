"""trainer.cache_features: the frozen backbone runs once, the head trains on cached features, and the checkpoint is
the whole model's, which evaluates on images to the figures the head reached on features."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitrain import build
from vitrain.config import compose, to_config
from vitrain.errors import ConfigError
from vitrain.evaluate import evaluate_checkpoint
from vitrain.features import FeatureLoader, FeatureProbe
from vitrain.models import create_model
from vitrain.train import train

PROBE = ["trainer.cache_features=true", "trainer.freeze_backbone=true", "trainer.epochs=10", "trainer.progress=false",
         "scheduler.warmup_epochs=0", "optimizer.lr=5e-2", "data.train_fraction=0.3"]


def test_a_probe_on_cached_features_is_a_checkpoint_of_the_whole_model(tmp_path: Path, monkeypatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The digits with a frozen random ViT: the head learns from the features alone (above the 10% of chance), the
    backbone is unchanged, and best.pt scored on the images by vitrain.evaluate gives the val top-1 that the head
    had on the features (the same evaluation transform: equal within float noise). A second run reads the
    features from the cache: the backbone does not run, and the figures repeat exactly."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    built = {}
    build_model = build.build_model

    def keep_initial_weights(*args, **kwargs):
        model = build_model(*args, **kwargs)
        built.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(build, "build_model", keep_initial_weights)
    first = train(compose(PROBE), tmp_path / "a")
    monkeypatch.setattr(build, "build_model", build_model)
    assert first["best_top1"] > 20  # random 0.3M-parameter features, a linear head: twice chance
    best = torch.load(tmp_path / "a/checkpoints/best.pt", weights_only=True)
    assert best["model"].keys() == built.keys()  # the whole model's checkpoint, not the probe's
    for key, value in best["model"].items():
        assert torch.equal(value, built[key]) != key.startswith("head."), key  # only the head trained
    scored = evaluate_checkpoint(tmp_path / "a/checkpoints/best.pt", device="cpu")
    assert scored["model"]["top1"] == pytest.approx(first["best_top1"], abs=1e-6)
    with caplog.at_level(logging.INFO, logger="vitrain.features"):
        second = train(compose(PROBE), tmp_path / "b")
    assert "features from" in caplog.text and "(the backbone does not run)" in caplog.text
    assert [r["val_top1"] for r in second["history"]] == [r["val_top1"] for r in first["history"]]


def test_feature_loader_orders_are_the_samplers_and_resume_inside_an_epoch() -> None:
    views = [(torch.arange(10.0)[:, None] + 100 * v, torch.arange(10)) for v in range(2)]
    loader = FeatureLoader(views, batch_size=4, seed=3)
    loader.sampler.set_epoch(1)
    whole = [f for f, _ in loader]
    assert len(whole) == 3 and all((f >= 100).all() for f in whole)  # epoch 1 trains on view 1
    loader.sampler.set_epoch(1, start=4)
    assert [f.tolist() for f, _ in loader] == [f.tolist() for f in whole[1:]]
    ordered = FeatureLoader(views[:1], batch_size=4)
    assert torch.cat([f for f, _ in ordered]).flatten().tolist() == list(range(10))


def test_what_cannot_train_on_cached_features_is_refused() -> None:
    with pytest.raises(ConfigError, match="trainer.cache_features trains the head on features computed once"):
        to_config(compose([*PROBE, "data.mixup=0.8"]))
    with pytest.raises(ConfigError, match="cannot unfreeze the backbone"):
        to_config(compose([*PROBE, "trainer.unfreeze_after_epochs=2"]))
    with pytest.raises(ConfigError, match="one classifier head and forward_head"):
        FeatureProbe(create_model("deit_nano_distilled_patch4_16", num_classes=3))  # two heads


def write_photos(root: Path, per_class: int = 100) -> Path:
    """A user's folder: 3 classes of photos in mixed sizes and formats (RGB PNG, grayscale, CMYK and EXIF-rotated
    JPEGs, an upper-case .JPG), with a .DS_Store and notes.txt lying around; the classes differ in colour."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate(([200, 40, 40], [40, 200, 40], [40, 40, 200])):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        for i in range(per_class):
            w, h = int(rng.integers(80, 260)), int(rng.integers(80, 260))
            pixels = np.clip(rng.normal(colour, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            kind = i % 5
            if kind == 0:
                image.save(folder / f"{i}.png")
            elif kind == 1:
                image.convert("L").save(folder / f"{i}.png")  # grayscale: a weaker cue, still a photo
            elif kind == 2:
                image.convert("CMYK").save(folder / f"{i}.jpg", quality=90)
            elif kind == 3:
                exif = Image.Exif()
                exif[0x0112] = 6  # stored sideways; a viewer turns it upright
                image.rotate(90, expand=True).save(folder / f"{i}.jpg", exif=exif, quality=90)
            else:
                image.save(folder / f"{i}.JPG", quality=90)
    (root / "notes.txt").write_text("holiday photos\n")
    return root


@pytest.mark.slow
def test_the_laptop_path_trains_and_predicts_within_five_minutes(tmp_path: Path) -> None:
    """The README's laptop path on 300 photos, ViT-S/16 at 224 with random backbone weights (no network): the
    training command and a prediction, in at most 3 commands and 5 minutes on a 2-core CPU."""
    photos = write_photos(tmp_path / "photos")
    start = time.perf_counter()
    run = tmp_path / "run"
    commands = [
        [sys.executable, "-m", "vitrain.train", "experiment=probe_imagefolder", f"data.root={photos}",
         "data.val_fraction=0.2", "model.pretrained=false", f"hydra.run.dir={run}"],
        [sys.executable, "-m", "vitrain.predict", f"checkpoint={run}/checkpoints/best.pt",
         f"inputs={photos}/class_1/4.JPG", f"output={tmp_path}/predictions.json"],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    elapsed = time.perf_counter() - start
    assert elapsed < 300, f"{elapsed:.0f} s"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_top1"] > 60  # colours that random features still separate
    (prediction,) = json.loads((tmp_path / "predictions.json").read_text())["predictions"]
    assert prediction["top"][0]["class"] == "class_1"  # a green photo, stored as an upper-case .JPG
