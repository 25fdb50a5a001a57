"""``python -m vitrain.train`` as a user runs it: single runs, multirun sweeps, one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

FAST = ["trainer.epochs=1", "data.batch_size=720", "trainer.progress=false"]


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitrain.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_run_writes_into_the_run_folder(tmp_path: Path) -> None:
    result = run_cli([*FAST, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / ".hydra" / "config.yaml").is_file()  # the resolved config, for the record


def test_default_run_folder_is_outputs_date_time(tmp_path: Path) -> None:
    result = run_cli(FAST, tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list(tmp_path.glob("outputs/????-??-??/??-??-??/metrics.json"))
    assert len(runs) == 1


def test_multirun_sweeps_into_numbered_folders(tmp_path: Path) -> None:
    result = run_cli(["-m", "optimizer.lr=1e-3,5e-4", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr
    sweeps = list(tmp_path.glob("outputs/multirun/????-??-??/??-??-??"))
    assert len(sweeps) == 1
    lrs = []
    for n in ("0", "1"):
        assert json.loads((sweeps[0] / n / "metrics.json").read_text())["steps"] == 2
        lrs.append((sweeps[0] / n / ".hydra" / "overrides.yaml").read_text())
    assert "optimizer.lr=0.001" in lrs[0] and "optimizer.lr=0.0005" in lrs[1]


BAD_INPUT = [  # one case per kind of bad input: the one-line message each gets
    (["model.name=vit_smal_patch16_224"], "error: unknown model 'vit_smal_patch16_224' (model.name); "
                                          "did you mean vit_small_patch16_224"),
    (["data.name=mnist"], "error: unknown data set 'mnist' (data.name); choose one of digits, cifar10"),
    (["model.img_size=30"], "error: image size 30x30 is not divisible by the patch size 4"),
    (["model=swin", "model.img_size=40"], "error: image size 40x40 gives a 10x10 grid at stage 1"),
    (["data.batch_size=0"], "error: data.batch_size must be positive"),
    (["trainer.epochs=0"], "error: trainer.epochs must be positive"),
    (["optimizer.lr=-1"], "error: optimizer.lr must be positive"),
    (["data=cifar10", "data.download=false", "data.root=nowhere"], "error: cifar10 not found under data.root="),
    # values are checked before any data set is opened: the bad value is named, not the missing CIFAR-10
    (["data=cifar10", "data.download=false", "data.root=nowhere", "trainer.epochs=-3"],
     "error: trainer.epochs must be positive (at least 1), got -3"),
    (["data=cifar10", "data.download=false", "data.root=nowhere", "loss.label_smoothing=1.5"],
     "error: loss.label_smoothing must be in [0, 1), got 1.5"),
    (["data=imagefolder"], "error: data.root has no value; set it"),
    (["data=imagefolder", "data.root=nowhere"], "error: no images under"),
    (["distill=hard"], "error: distill.teacher.name has no value; set it"),
    (["model.checkpoint={vit_tiny}"], "error: checkpoint {vit_tiny} does not fit vit_nano_patch4_16: "),
    (["model.checkpoint={corrupt}"], "error: cannot load checkpoint {corrupt}: "),
    (["model.checkpoint={malicious}"], "error: cannot load checkpoint {malicious}: refused, it holds Python objects"),
    (["data=imagefolder", "data.root={broken_images}"], "error: cannot read image {broken_images}/train/"),
    (["experiment=digits_distill", "distill.teacher.checkpoint={teacher_3_classes}"],
     "error: the teacher checkpoint {teacher_3_classes} has a classifier for another number of classes"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files for the bad-input cases: a checkpoint of another architecture, a truncated one, a pickle
    that would run code, an image folder with a broken PNG, a teacher trained on 3 classes."""
    import numpy as np
    import torch
    from PIL import Image

    from vitrain.models import create_model

    root = tmp_path_factory.mktemp("bad")
    torch.save(create_model("vit_tiny_patch16_224", depth=1).state_dict(), root / "vit_tiny.pth")
    (root / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")

    class RunsCode:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {root / 'pwned'}",))

    with open(root / "malicious.pt", "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / "images" / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / split / cls / "0.png")
    (root / "images" / "train" / "a" / "1.png").write_bytes(b"not a png")
    teacher = create_model("resnet18", num_classes=3, source="timm")
    torch.save(teacher.state_dict(), root / "teacher3.pth")
    return {"vit_tiny": str(root / "vit_tiny.pth"), "corrupt": str(root / "corrupt.pt"),
            "malicious": str(root / "malicious.pt"), "broken_images": str(root / "images"),
            "teacher_3_classes": str(root / "teacher3.pth"), "pwned": str(root / "pwned")}


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT)
def test_bad_input_is_one_line_without_traceback(tmp_path: Path, args: list[str], expected: str,
                                                 bad_files: dict[str, str]) -> None:
    args, expected = [a.format(**bad_files) for a in args], expected.format(**bad_files)
    result = run_cli([*args, "data.num_workers=0", "trainer.progress=false", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not Path(bad_files["pwned"]).exists()  # the malicious pickle ran nothing


def test_unwritable_output_folder_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    result = run_cli([f"hydra.run.dir={tmp_path}/a_file/run"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: cannot write to {tmp_path}/a_file/run (Not a directory); "
                                     f"set hydra.run.dir to a writable folder")


def test_unknown_config_key_is_refused_by_hydra_without_traceback(tmp_path: Path) -> None:
    result = run_cli(["trainer.epoch=3"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Could not override 'trainer.epoch'" in result.stderr


@pytest.mark.slow
def test_default_run_reaches_97_percent_within_3_minutes(tmp_path: Path) -> None:
    """The README's promise: `python -m vitrain.train`, no arguments, >= 97% test top-1 on digits."""
    import time

    start = time.perf_counter()
    result = run_cli(["trainer.progress=false"], tmp_path, timeout=600)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    (metrics_file,) = tmp_path.glob("outputs/*/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["final_top1"] >= 97.0
    assert elapsed <= 180.0


@pytest.mark.slow
def test_deit_base_on_cifar10_starts_and_checkpoints(cifar10_root: Path, tmp_path: Path) -> None:
    """The design card's `python -m vitrain.train model=deit data=cifar10`, on a CIFAR-format folder
    of 100 training images (2 steps of DeiT-B at 224 on the CPU)."""
    result = run_cli(["model=deit", "data=cifar10", f"data.root={cifar10_root}", "data.num_workers=0",
                      "data.batch_size=50", "trainer.epochs=1", "trainer.progress=false",
                      f"hydra.run.dir={tmp_path}/run"], tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
