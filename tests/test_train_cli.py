"""``python -m vitrain.train`` as a user runs it: single runs, multirun sweeps, one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from cli_batch import run_cases

FAST = ["trainer.epochs=1", "scheduler.warmup_epochs=0", "data.batch_size=720", "trainer.progress=false"]


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
    (["trainer.resume={resume_3_classes}"], "error: trainer.resume: {resume_3_classes} does not fit this model: "
                                            "head.weight is (3, 64) in the checkpoint, (10, 64) in the model"),
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
    torch.save({"model": create_model("vit_nano_patch4_16", 3).state_dict(), "step": 1}, root / "resume3.pt")
    return {"vit_tiny": str(root / "vit_tiny.pth"), "corrupt": str(root / "corrupt.pt"),
            "malicious": str(root / "malicious.pt"), "broken_images": str(root / "images"),
            "teacher_3_classes": str(root / "teacher3.pth"), "pwned": str(root / "pwned"),
            "resume_3_classes": str(root / "resume3.pt")}


@pytest.fixture(scope="module")
def bad_input_results(bad_files: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every BAD_INPUT command line through the real entry point, in one process (tests/cli_batch.py)."""
    root = tmp_path_factory.mktemp("bad_input")
    cases = [[*(a.format(**bad_files) for a in args), "data.num_workers=0", "trainer.progress=false",
              f"hydra.run.dir={root}/run{i}"] for i, (args, _) in enumerate(BAD_INPUT)]
    return run_cases("vitrain.train", cases, root)


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[" ".join(args) for args, _ in BAD_INPUT])
def test_bad_input_is_one_line_without_traceback(case: int, bad_input_results: list[dict],
                                                 bad_files: dict[str, str]) -> None:
    result, expected = bad_input_results[case], BAD_INPUT[case][1].format(**bad_files)
    assert result["code"] == 1 and "Traceback" not in result["stderr"]
    assert result["stderr"].strip().startswith(expected), result["stderr"]
    assert len(result["stderr"].strip().splitlines()) == 1
    assert not Path(bad_files["pwned"]).exists()  # the malicious pickle ran nothing


def test_unwritable_output_folder_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    result = run_cli([f"hydra.run.dir={tmp_path}/a_file/run"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: cannot write to {tmp_path}/a_file/run (Not a directory); "
                                     f"set hydra.run.dir to a writable folder")


CHECKED_BEFORE_DATA = [  # each refused in one line before the data set is read (the CIFAR-10 folder is empty)
    (["seed=-1"], "error: seed must be in [0, 2**32 - 1] (NumPy's range), got -1"),
    (["data.std=[0,0,0]"], "error: data.std must be positive in every channel, got [0.0, 0.0, 0.0]"),
    (["scheduler.warmup_epochs=100", "trainer.epochs=2"],
     "error: scheduler.warmup_epochs=100 must be shorter than trainer.epochs=2; lower it (0: no warmup) or train "
     "longer"),
    (["model.img_size=30"], "error: image size 30x30 is not divisible by the patch size 4; set model.img_size to a "
                            "multiple of it"),
    (["model=vit_tiny", "+model.patch_size=7", "model.img_size=32"],
     "error: image size 32x32 is not divisible by the patch size 7; set model.img_size to a multiple of it"),
    (["model.name=vit_smal_patch16_224"], "error: unknown model 'vit_smal_patch16_224' (model.name); "
                                          "did you mean vit_small_patch16_224"),
    (["model=timm", "model.name=resnt18"], "error: unknown timm model 'resnt18' (model.name); did you mean resnet18"),
    (["trainer.resume={missing}"], "error: trainer.resume={missing}: no such file; give a last.pt (or an FSDP2 "
                                   "run's last.dcp), or trainer.resume=auto"),
    (["trainer.device=tpu"], "error: trainer.device=tpu is not a device PyTorch knows; use auto, cpu, cuda or cuda:N"),
    (["trainer.resume={root}/empty"], "error: trainer.resume={root}/empty is a folder, not a checkpoint; give a run's "
                                      "checkpoints/last.pt"),
    (["trainer.resume={root}/cli_cases.json"], "error: trainer.resume={root}/cli_cases.json is not a PyTorch "
                                               "checkpoint (neither a zip archive nor a pickle"),
    (["model=vit_nanoo"], "error: unknown model 'vit_nanoo'; did you mean vit_nano? choose from deit, "),
    (["data=imagenett"], "error: unknown data 'imagenett'; did you mean imagefolder? choose from cifar10, "),
    (["optimizer=adamz"], "error: unknown optimizer 'adamz'; did you mean adamw? choose from adamw, lamb, lion, sgd"),
    (["scheduler=cosin"], "error: unknown scheduler 'cosin'; did you mean cosine? choose from "),
    (["+trainer.epoch=3"], "error: unknown key trainer.epoch; did you mean trainer.epochs?"),
    (["trainer.epoch=3"], "error: unknown key trainer.epoch; did you mean trainer.epochs?"),
    (["trainer.epochs=abc"], "error: trainer.epochs must be a whole number, got abc"),
    (["trainer.epochs=2.5"], "error: trainer.epochs must be a whole number, got 2.5"),
    (["data.hflip=maybe"], "error: data.hflip must be true or false, got maybe"),
    (["-m", "optimizer.lr=1e-3,fast"], "error: optimizer.lr must be a number (such as 0.1 or 1e-3), got fast"),
    (["data.mean=0.5"], "error: data.mean must be a list in brackets (data.mean=[...]), got 0.5"),
    (["seed=null"], "error: seed cannot be null; give it a value"),
    (["+model.deptj=6"], "error: unknown key model.deptj: not an argument of vit_nano_patch4_16; "
                         "did you mean model.depth?"),
    (["model=swin_nano", "+model.depth=2"], "error: unknown key model.depth: not an argument of "
                                            "swin_nano_patch2_window4_32; did you mean model.depths?"),
    (["model.depth=6"], "error: unknown key model.depth; an argument of the model's constructor is added with +: "
                        "+model.depth=..."),
    (["-m", "optimizer.lr=1e-3,5e-4", "+loss.smoothing=0.1"],
     "error: unknown key loss.smoothing; did you mean loss.label_smoothing?"),
]


@pytest.fixture(scope="module")
def before_data_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Every CHECKED_BEFORE_DATA command line, with CIFAR-10 asked of an empty folder, in one process."""
    root = tmp_path_factory.mktemp("before_data")
    (root / "empty").mkdir()
    cases = [["data=cifar10", f"data.root={root}/empty", "data.download=false",
              *(a.format(missing=root / "no.pt", root=root) for a in args), f"hydra.run.dir={root}/run{i}",
              f"hydra.sweep.dir={root}/sweep{i}"] for i, (args, _) in enumerate(CHECKED_BEFORE_DATA)]
    return root, run_cases("vitrain.train", cases, root)


@pytest.mark.parametrize("case", range(len(CHECKED_BEFORE_DATA)),
                         ids=[" ".join(args) for args, _ in CHECKED_BEFORE_DATA])
def test_bad_config_is_refused_before_any_data_is_read(case: int, before_data_results: tuple[Path, list[dict]]) -> None:
    root, results = before_data_results
    result, expected = results[case], CHECKED_BEFORE_DATA[case][1].format(missing=root / "no.pt", root=root)
    assert result["code"] == 1 and "Traceback" not in result["stderr"]
    assert result["stderr"].strip().startswith(expected), result["stderr"]  # not "cifar10 not found": no data read
    assert len(result["stderr"].strip().splitlines()) == 1


def test_a_run_refused_at_start_leaves_no_run_folder(before_data_results: tuple[Path, list[dict]]) -> None:
    """Hydra makes the run folder (.hydra/, the log, the lock) before the config is checked: a refused run takes it
    away again, and the folder of the data it was asked to read stays."""
    root, results = before_data_results
    assert all(r["code"] == 1 for r in results)
    assert sorted(p.name for p in root.iterdir()) == ["cli_cases.json", "empty"]


@pytest.mark.slow
def test_a_run_refused_once_data_or_weights_are_looked_at_leaves_no_run_folder(tmp_path: Path) -> None:
    """An empty class folder, a single folder without a validation split, missing pretrained weights (offline):
    refused after the logger and the checkpoint folder were made; the run folder goes all the same (no event
    file, no empty folders), and the data's folder stays."""
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "a" / "0.png")
    cases = [["data=imagefolder", f"data.root={tmp_path}/photos"],  # b is empty
             ["model=vit_small", "model.pretrained=true"]]
    for i, args in enumerate(cases):
        result = subprocess.run([sys.executable, "-m", "vitrain.train", *args, "trainer.progress=false",
                                 f"hydra.run.dir={tmp_path}/runs/run{i}"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "b" / "0.png")
    result = subprocess.run([sys.executable, "-m", "vitrain.train", "data=imagefolder", f"data.root={tmp_path}/photos",
                             f"hydra.run.dir={tmp_path}/runs/run2"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "has no validation split here" in result.stderr
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a", "b"]


def test_keys_added_to_the_model_still_reach_its_constructor(tmp_path: Path) -> None:
    """docs/models.md's ``+model.depth=6``: a constructor argument passes, and the run trains."""
    result = run_cli([*FAST, "+model.depth=1", "+model.embed_dim=32", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 1


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
