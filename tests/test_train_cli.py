"""``python -m vitrain.train`` as a user runs it: single runs, multirun sweeps, one-line errors."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(("args", "expected"), [
    (["data=cifar10", "data.download=false", "data.root=nowhere"], "error: cifar10 not found under data.root="),
    (["model.name=vit_smal_patch16_224"], "error: unknown model 'vit_smal_patch16_224' (model.name); "
                                          "did you mean vit_small_patch16_224"),
    (["model.img_size=30"], "error: image size 30x30 is not divisible by the patch size 4"),
    (["data.batch_size=0"], "error: data.batch_size must be positive"),
    (["optimizer.lr=-1"], "error: optimizer.lr must be positive"),
    (["data=imagefolder"], "error: data.root has no value; set it"),
    (["distill=hard"], "error: distill.teacher.name has no value; set it"),
    (["data=imagefolder", "data.root=nowhere"], "error: no images under"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_cli([*args, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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
