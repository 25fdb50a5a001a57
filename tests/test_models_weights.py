"""Starting weights, offline: timm's pretrained weights from a local Hugging Face cache (hub layout, random weights),
the preprocessing that follows them into the run, its checkpoints and its ONNX export, and the one-line error
when they are neither cached nor reachable (vitrain/models/weights.py, vitrain/hub.py, vitrain/build.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_batch import run_cases
from hub_cache import write_hub_cache

from vitrain import hub
from vitrain.build import checkpoint_metadata, resolve_preprocess
from vitrain.checkpoint import load_checkpoint
from vitrain.config import compose, to_config
from vitrain.data.config import IMAGENET_MEAN, IMAGENET_STD
from vitrain.errors import VitrainError
from vitrain.models import create_model
from vitrain.models.weights import ensure_pretrained, weights_preprocess

VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # mean/std 0.5, bicubic, crop 0.9 (as vit_small's augreg)
DEIT = "deit_tiny_patch16_224.fb_in1k"  # ImageNet mean/std, bicubic, crop 0.9
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: the connection is refused at once
FAST = ["trainer.epochs=1", "scheduler.warmup_epochs=0", "data.train_fraction=0.05", "data.batch_size=64",
        "trainer.progress=false", "model.img_size=32", "logger=[]"]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf_hub")
    for name in (VIT, DEIT):
        write_hub_cache(root, name)
    return root


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> Path:
    """This process's huggingface_hub on ``hub_cache``, the hub unreachable; HF_HUB_OFFLINE as it was, after."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # restored after the test, as go_offline() may set it
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def hub_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_HUB_CACHE": str(cache), **extra}


@pytest.fixture(scope="module")
def runs(hub_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny fine-tuning runs from the cached weights, through ``python -m vitrain.train`` in one process with
    HF_HUB_OFFLINE=1: vitrain's ViT-Ti with a timm tag, and timm's DeiT-Ti."""
    root = tmp_path_factory.mktemp("runs")
    cases = {"vit": ["model=vit_tiny", f"model.name={VIT}"],
             "deit": ["model=timm", f"model.name={DEIT}"]}
    with pytest.MonkeyPatch.context() as env:  # what the child process starts with
        env.setenv("HF_HUB_CACHE", str(hub_cache))
        env.setenv("HF_HUB_OFFLINE", "1")
        results = run_cases("vitrain.train", [[*args, "model.pretrained=true", *FAST, f"hydra.run.dir={root / key}"]
                                              for key, args in cases.items()], root)
    for key, result in zip(cases, results, strict=True):
        assert result["code"] == 0, (key, result["stderr"][-3000:])
        assert "Retry" not in result["stderr"]
    return {key: root / key for key in cases}


def saved_preprocess(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "best.pt")["preprocess"]


@pytest.mark.parametrize(("run", "mean", "std"), [("vit", [0.5] * 3, [0.5] * 3), ("deit", IMAGENET_MEAN, IMAGENET_STD)])
def test_checkpoint_and_onnx_carry_the_weights_preprocessing(runs: dict[str, Path], run: str, mean: list[float],
                                                             std: list[float]) -> None:
    """The digits' own mean and std (0.5), filter (bilinear) and crop (none) give way to the weights'. The checkpoint
    and the ONNX export say what the run fed the model."""
    import onnx

    from vitrain.exporting import export_checkpoint

    pre = saved_preprocess(runs[run])
    assert (pre["img_size"], pre["interpolation"], pre["crop_pct"]) == (32, "bicubic", pytest.approx(0.9))
    assert pre["mean"] == pytest.approx(mean) and pre["std"] == pytest.approx(std)
    assert set(pre) == {"img_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
    assert pre["crop_mode"] == "center"
    saved = load_checkpoint(runs[run] / "checkpoints" / "best.pt")
    assert saved["data_config"]["mean"] == pre["mean"] and saved["config"]["data"]["crop_pct"] == 0.9
    exported = export_checkpoint(runs[run] / "checkpoints" / "best.pt", "onnx", weights="raw")
    metadata = {p.key: p.value for p in onnx.load(str(exported.path), load_external_data=False).metadata_props}
    assert json.loads(metadata["preprocess"]) == pre


def test_the_run_log_says_which_values_and_whence(runs: dict[str, Path]) -> None:
    (log,) = runs["vit"].glob("*.log")
    lines = [line for line in log.read_text().splitlines() if "preprocessing: " in line]
    assert len(lines) == 1 and "[INFO]" in lines[0]
    assert ("data.mean=[0.5, 0.5, 0.5] (the weights'), data.std=[0.5, 0.5, 0.5] (the weights'), "
            "data.interpolation=bicubic (the weights'), data.crop_pct=0.9 (the weights'), "
            "data.crop_mode=center (the weights'); "
            f"the weights: timm's pretrained_cfg of {VIT}") in lines[0]


def test_a_checkpoint_of_the_run_brings_its_preprocessing(runs: dict[str, Path]) -> None:
    """Fine-tuning further from a vitrain checkpoint: its preprocess is the weights' (their origin is known)."""
    checkpoint = runs["vit"] / "checkpoints" / "best.pt"
    cfg, said = resolve_preprocess(to_config(compose(["model=vit_tiny", "model.img_size=32",
                                                      f"model.checkpoint={checkpoint}"])))
    assert (cfg.data.mean, cfg.data.crop_pct, cfg.data.interpolation) == ([0.5] * 3, 0.9, "bicubic")
    assert f"the weights: model.checkpoint={checkpoint}" in said


def test_a_timm_hub_folder_is_a_checkpoint_with_its_preprocessing(hub_cache: Path) -> None:
    """model.checkpoint=local-dir:FOLDER (timm's hub layout): its weights load, its config.json gives the values."""
    import timm

    (folder,) = hub_cache.glob(f"models--timm--{VIT}/snapshots/*")
    values = weights_preprocess("vitrain", "vit_tiny_patch16_224", False, f"local-dir:{folder}").values
    assert values == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.9,
                      "crop_mode": "center", "img_size": 224}
    ours = create_model("vit_tiny_patch16_224", num_classes=1000, checkpoint=f"local-dir:{folder}").eval()
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_a_plain_weights_file_says_nothing(tmp_path: Path) -> None:
    """A state dict without metadata: its preprocessing is unknown, so the data set's values stay."""
    torch.save(create_model("vit_nano_patch4_16").state_dict(), tmp_path / "plain.pth")
    cfg, said = resolve_preprocess(to_config(compose([f"model.checkpoint={tmp_path / 'plain.pth'}"])))
    assert (cfg.data.mean, cfg.data.interpolation) == ([0.5] * 3, "bilinear")  # digits' own, and the default
    assert "(it does not say its preprocessing)" in said


def test_cached_weights_load_when_the_hub_does_not_answer(offline_hub: Path) -> None:
    """The connection check fails, the process goes offline, and timm reads the cache: no retries, no wait."""
    from huggingface_hub import constants

    start = time.monotonic()
    model = create_model(DEIT, num_classes=3, img_size=32, source="timm", pretrained=True)
    assert time.monotonic() - start < 15 and model.pos_embed.shape[1] == 1 + 4
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_hf_hub_offline_skips_the_check(monkeypatch: pytest.MonkeyPatch, offline_hub: Path) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("HF_HUB_OFFLINE=1 must not touch the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("socket.create_connection", no_network)
    assert not hub.hub_online()
    ensure_pretrained("vitrain", VIT)  # cached: fine


def test_missing_weights_are_one_line_naming_the_ways_on(offline_hub: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    start = time.monotonic()
    with pytest.raises(VitrainError) as info:
        ensure_pretrained("timm", "resnet18.a1_in1k")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message and message.endswith("or model.pretrained=false to start from random weights")
    for way in ("not in the Hugging Face cache", f"the hub ({UNREACHABLE}) did not answer within 3 s",
                "hf download timm/resnet18.a1_in1k", "HF_HUB_OFFLINE=1", "model.checkpoint=PATH", "local-dir:FOLDER"):
        assert way in message


def test_offline_cli_fails_in_one_line_without_retries(tmp_path: Path) -> None:
    """No network, nothing cached: the run stops in seconds with one line, not after the hub client's minute of
    retries (each with a warning)."""
    args = ["model=timm", f"model.name={DEIT}", "model.pretrained=true", *FAST, f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vitrain.train", *args], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=hub_env(tmp_path / "empty", HF_ENDPOINT=UNREACHABLE))
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: timm's pretrained weights for '{DEIT}' are not in the Hugging Face "
                                    f"cache ({tmp_path / 'empty'})")
    assert result.stderr.count("\n") == 1 and "Retry" not in result.stderr + result.stdout
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    assert elapsed < 30, elapsed  # interpreter start and imports (~10 s on a loaded 2-core machine), check <= 3 s


def test_the_connection_check_is_bounded() -> None:
    start = time.monotonic()
    hub.reachable("http://10.255.255.1:81", timeout=0.5)  # unroutable: no answer, or refused at once
    assert time.monotonic() - start < 1.5
    assert not hub.reachable(UNREACHABLE)


def test_values_given_on_the_command_line_win_over_the_weights() -> None:
    """What the run resolves before reading data (build_trainer), and what its checkpoints then hold."""
    cfg = to_config(compose(["model=timm", f"model.name={DEIT}", "model.pretrained=true", "data.mean=[0.4,0.4,0.4]",
                             "data.interpolation=bilinear"]))
    resolved, said = resolve_preprocess(cfg)
    assert (resolved.data.mean, resolved.data.std, resolved.data.interpolation, resolved.data.crop_pct) == (
        [0.4] * 3, IMAGENET_STD, "bilinear", 0.9)
    assert said.startswith("model.img_size=224 (the starting weights' own); preprocessing: "
                           "data.mean=[0.4, 0.4, 0.4] (set), data.std=[0.229, 0.224, 0.225] "
                           "(the weights'), data.interpolation=bilinear (set), data.crop_pct=0.9 (the weights')")
    pre = checkpoint_metadata(cfg, ["a", "b"], 64, 1)["preprocess"]
    assert (pre["mean"], pre["std"], pre["crop_pct"]) == ([0.4] * 3, IMAGENET_STD, 0.9)


def test_recipes_count_as_set() -> None:
    recipe, _ = resolve_preprocess(to_config(compose(["experiment=deit_recipe", "model=deit_small",
                                                      "model.pretrained=true"])))
    assert recipe.data.crop_pct == 0.875  # the recipe says so


def test_a_timm_tag_picks_the_weights_and_their_values() -> None:
    in21k = weights_preprocess("vitrain", "vit_small_patch16_224.augreg_in21k", True, None)
    assert in21k.origin == "timm's pretrained_cfg of vit_small_patch16_224.augreg_in21k"
    dino = weights_preprocess("vitrain", "vit_small_patch16_224.dino", True, None)
    assert dino.values["mean"] == IMAGENET_MEAN and in21k.values["mean"] == [0.5] * 3
    assert weights_preprocess("timm", "vit_small_patch16_224", True, None).origin.endswith(
        "vit_small_patch16_224.augreg_in21k_ft_in1k")  # timm's default tag, named


def test_torchvision_weights_give_their_transforms_values() -> None:
    values = weights_preprocess("torchvision", "resnet18", True, None).values
    assert values == {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "crop_pct": 0.875,
                      "crop_mode": "center", "img_size": 224}


def test_an_unknown_tag_is_refused_before_anything_runs() -> None:
    from vitrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^timm has no pretrained weights 'vit_small_patch16_224\.augreg_in22k'; "
                                          r"set model.name=vit_small_patch16_224.TAG with a TAG of augreg_in1k, "):
        to_config(compose(["model=vit_small", "model.name=vit_small_patch16_224.augreg_in22k"]))
