"""trainer.cache_features: the frozen backbone runs once, the head trains on cached features, and the checkpoint is
the whole model's, which evaluates on images to the figures the head reached on features."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_cache import write_hub_cache
from PIL import Image, ImageOps

from vitrain import build
from vitrain.config import compose, to_config
from vitrain.errors import ConfigError
from vitrain.evaluate import evaluate_checkpoint
from vitrain.features import FeatureLoader, FeatureProbe
from vitrain.models import create_model
from vitrain.predict import predict
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
    with caplog.at_level(logging.INFO, logger="vitrain"):
        first = train(compose(PROBE), tmp_path / "a")
    monkeypatch.setattr(build, "build_model", build_model)
    said = [r.getMessage() for r in caplog.records]
    data_line = next(i for i, m in enumerate(said) if m.startswith("data digits: 434 train / 360 val images; 10 "
                                                                      "classes with their training images: 0 (43)"))
    assert data_line < next(i for i, m in enumerate(said) if m.startswith("features of"))  # before the 1st pass
    assert re.search(r"s in all: start [\d.]+ s, features [\d.]+ s, training [\d.]+ s$", said[-1]), said[-1]
    caplog.clear()
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
    """The README's laptop path on 300 small photos of every kind (PNG, grayscale, CMYK), ViT-S/16 at 224 with
    random backbone weights (model.pretrained=false): the training command and a prediction, in 5 minutes on a
    2-core CPU. The README's figure is the phone-photo test below."""
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


PHONE = (4032, 3024)  # a 12-megapixel phone photo as stored: width, height
SCENES = {"beach": ((90, 150, 220), (215, 195, 140)), "forest": ((150, 190, 140), (40, 90, 40)),
          "sunset": ((230, 120, 60), (70, 40, 60))}  # each class: its sky above its ground
STORE = {1: None, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}  # undone by EXIF orientation k


def phone_jpeg(sky: tuple, ground: tuple, orientation: int, rng: np.random.Generator, grain: np.ndarray) -> bytes:
    """A photo as a phone writes it: a 4032x3024 JPEG (quality 90, about 3.5 MB) of a scene, sky above ground,
    with sensor grain; a portrait scene (3024x4032 upright) is stored sideways with EXIF orientation 6 or 8. Drawn
    at 1/16 of the size and resized up, so that writing one takes a fraction of a second."""
    h, w = (PHONE[0], PHONE[1]) if STORE[orientation] else (PHONE[1], PHONE[0])  # upright
    small = np.empty((h // 16, w // 16, 3))
    horizon = int(rng.uniform(0.35, 0.65) * len(small))
    small[:horizon], small[horizon:] = sky, ground
    small = (small + rng.normal(0, 20, small.shape)).clip(0, 231).astype(np.uint8)
    image = Image.fromarray(small)
    image = image.transpose(STORE[orientation]) if STORE[orientation] else image
    pixels = np.asarray(image.resize(PHONE, Image.Resampling.BILINEAR)) + grain  # at most 231 + 24
    exif = Image.Exif()
    exif[0x010F], exif[0x0112] = "vitrain test phone", orientation  # Make, Orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def write_phone_photos(root: Path, per_class: int = 100, distinct: int = 10) -> Path:
    """``root/<class>/IMG_*.jpg``: ``per_class`` phone photos of each of 3 classes (``SCENES``, apart in colour),
    a fifth of them portrait (EXIF orientation 6 or 8), with a .DS_Store and notes.txt lying around. Each class
    has ``distinct`` photos, each written to several files, as encoding 300 of them would take over a minute."""
    rng = np.random.default_rng(0)
    grain = rng.integers(0, 25, size=(PHONE[1], PHONE[0], 3), dtype=np.uint8)
    orientations = [6, 8] + [1] * (distinct - 2)
    for name, (sky, ground) in SCENES.items():
        folder = root / name
        folder.mkdir(parents=True)
        photos = [phone_jpeg(sky, ground, k, rng, grain) for k in orientations]
        for i in range(per_class):
            (folder / f"IMG_{i:04d}.jpg").write_bytes(photos[i % distinct])
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "notes.txt").write_text("holiday photos\n")
    return root


def cpu_seconds() -> float:
    """User and system CPU time of this process's finished children (a measure that other load does not inflate)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


@pytest.mark.slow
def test_phone_photos_train_and_predict_in_three_minutes_with_cached_weights(tmp_path: Path) -> None:
    """The README's "Your own photos" figure, as a laptop user meets it: 300 12-megapixel phone JPEGs in 3 classes
    (some stored sideways with an EXIF orientation), one folder split by data.val_fraction=0.2, and the
    experiment's own model.pretrained=true read offline from a local Hugging Face cache (HF_HUB_OFFLINE=1) in
    which a randomly initialised ViT-S/16 stands for timm's ImageNet weights (no network here). The README's two
    commands, timed together: 100 s on 2 idle cores (asserted under 5 minutes, for slower or shared machines); the
    colours separate on random features; a photo stored sideways is predicted as its upright copy."""
    start = time.perf_counter()
    photos = write_phone_photos(tmp_path / "photos")
    cache = tmp_path / "hf_hub"
    write_hub_cache(cache, compose(["experiment=probe_imagefolder"]).model.name)  # ViT-S/16, timm's default tag
    print(f"\nwrote 300 photos and the weights in {time.perf_counter() - start:.1f} s")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    run, sideways = tmp_path / "run", photos / "forest" / "IMG_0000.jpg"  # orientation 6
    commands = {
        "train": [sys.executable, "-m", "vitrain.train", "experiment=probe_imagefolder", f"data.root={photos}",
                  "data.val_fraction=0.2", f"hydra.run.dir={run}"],
        "predict": [sys.executable, "-m", "vitrain.predict", f"checkpoint={run}/checkpoints/best.pt",
                    f"inputs={sideways}"],
    }
    seconds, load = {}, os.getloadavg()[0]
    for name, command in commands.items():
        start, used = time.perf_counter(), cpu_seconds()
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        seconds[name] = time.perf_counter() - start
        assert result.returncode == 0, result.stderr[-3000:]
        print(f"{name}: {seconds[name]:.0f} s, {cpu_seconds() - used:.0f} s of CPU")
    total = sum(seconds.values())
    print(f"both commands: {total:.0f} s (load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)")
    assert total < 300, f"{total:.0f} s"
    assert json.loads((run / "metrics.json").read_text())["best_top1"] > 60  # random features, colours apart
    (prediction,) = json.loads((run / "predictions/IMG_0000.best.pt.json").read_text())["predictions"]
    assert prediction["top"][0]["class"] == "forest"
    upright = tmp_path / "upright.png"
    with Image.open(sideways) as image:
        ImageOps.exif_transpose(image).save(upright)  # 3024 wide, 4032 high: as a viewer shows it
    (same,) = predict(run / "checkpoints/best.pt", upright, device="cpu")
    assert [t["class"] for t in same["top"]] == [t["class"] for t in prediction["top"]]
    assert [t["probability"] for t in same["top"]] == pytest.approx([t["probability"] for t in prediction["top"]],
                                                                      abs=1e-5)
