"""Checks that refuse a bad config before any data is read: values across groups, model names and sizes, keys the
schema lacks (with ``+`` or without), each in one line that names the key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from vitrain.cli import check_override_keys, unknown_key
from vitrain.config import CONFIG_DIR, TrainConfig, compose, to_config
from vitrain.errors import ConfigError


def refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        to_config(compose(overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(("seed", "ok"), [(0, True), (2**32 - 1, True), (-1, False), (2**32, False)])
def test_seed_is_in_numpys_range(seed: int, ok: bool) -> None:
    if ok:
        assert to_config(compose([f"seed={seed}"])).seed == seed
    else:
        assert refused([f"seed={seed}"]) == f"seed must be in [0, 2**32 - 1] (NumPy's range), got {seed}"


def test_std_is_positive_in_every_channel() -> None:
    assert refused(["data.std=[0.2,0,0.2]"]) == "data.std must be positive in every channel, got [0.2, 0.0, 0.2]"


def test_warmup_is_shorter_than_the_run() -> None:
    assert refused(["scheduler.warmup_epochs=100", "trainer.epochs=2"]) == (
        "scheduler.warmup_epochs=100 must be shorter than trainer.epochs=2; lower it (0: no warmup) or train longer")
    assert refused(["scheduler.warmup_epochs=3", "trainer.epochs=3"]).startswith("scheduler.warmup_epochs=3 must")
    assert to_config(compose(["scheduler.warmup_epochs=1.5", "trainer.epochs=2"])).scheduler.warmup_epochs == 1.5


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.img_size=30"], "image size 30x30 is not divisible by the patch size 4; set model.img_size to a multiple"),
    (["model=deit_small", "model.img_size=100"], "image size 100x100 is not divisible by the patch size 16"),
    (["model=vit_tiny", "+model.patch_size=6", "model.img_size=32"], "image size 32x32 is not divisible by the patch "
                                                                    "size 6"),
    (["model.name=vit_smal_patch16_224"], "unknown model 'vit_smal_patch16_224' (model.name); "
                                          "did you mean vit_small_patch16_224"),
    (["model=timm", "model.name=convnext_tinny"], "unknown timm model 'convnext_tinny' (model.name); "
                                                  "did you mean convnext_tiny"),
    (["model=torchvision", "model.name=resnet1"], "unknown torchvision model 'resnet1' (model.name); did you mean"),
])
def test_model_name_and_size_are_checked_without_building_it(overrides: list[str], message: str) -> None:
    assert refused(overrides).startswith(message)


def test_a_patch_size_from_the_shell_sets_the_size_that_fits() -> None:
    """scripts/compare_vit_cnn.py trains ViT-Ti with ``+model.patch_size=8`` at 32x32."""
    cfg = to_config(compose(["model=vit_tiny", "+model.patch_size=8", "model.img_size=32"]))
    assert cfg.model.constructor_kwargs()["patch_size"] == 8


def test_timm_models_at_any_size_and_with_any_key_pass() -> None:
    """timm crops what the patches do not cover, and its builders take keyword arguments of their own."""
    cfg = to_config(compose(["model=timm", "model.name=vit_tiny_patch16_224", "model.img_size=30", "+model.depth=1"]))
    assert cfg.model.constructor_kwargs()["depth"] == 1


def test_resume_from_a_missing_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "last.pt"
    assert refused([f"trainer.resume={missing}"]) == (f"trainer.resume={missing}: no such file; give a last.pt (or "
                                                      f"an FSDP2 run's last.dcp), or trainer.resume=auto")
    missing.write_bytes(b"")  # an empty file is no checkpoint either
    assert refused([f"trainer.resume={missing}"]).startswith(f"trainer.resume={missing} is not a PyTorch checkpoint")
    import torch

    torch.save({}, missing)
    assert to_config(compose([f"trainer.resume={missing}"])).trainer.resume == str(missing)
    assert to_config(compose(["trainer.resume=auto"])).trainer.resume == "auto"


@pytest.mark.parametrize(("override", "message"), [
    ("+trainer.epoch=3", "unknown key trainer.epoch; did you mean trainer.epochs?"),
    ("++data.batchsize=8", "unknown key data.batchsize; did you mean data.batch_size, data.epoch_size?"),
    ("+model.lora.rnk=4", "unknown key model.lora.rnk; did you mean model.lora.rank?"),
    ("+distill.teacher.nme=resnet18", "unknown key distill.teacher.nme; did you mean distill.teacher.name?"),
    ("+sed=1", "unknown key sed; did you mean seed?"),
    ("+model.deptj=2", "unknown key model.deptj: not an argument of vit_nano_patch4_16; did you mean model.depth?"),
    ("+model.num_classes=3", "unknown key model.num_classes: vitrain sets it from the data set's classes"),
    ("+model.drop_path_rate=0.1", "unknown key model.drop_path_rate: vitrain sets it from model.drop_path"),
])
def test_a_key_the_schema_lacks_is_refused_even_with_plus(override: str, message: str) -> None:
    assert refused([override]) == message


def test_keys_added_to_the_model_go_to_its_constructor() -> None:
    """docs/models.md: ``+model.depth=6``; Swin's stages are ``depths``."""
    assert to_config(compose(["model=vit_tiny", "+model.depth=6"])).model.constructor_kwargs()["depth"] == 6
    swin = to_config(compose(["model=swin_nano", "+model.depths=[1,1,1]"])).model
    assert list(swin.constructor_kwargs()["depths"]) == [1, 1, 1]
    assert refused(["model=swin_nano", "+model.depth=2"]).startswith("unknown key model.depth: not an argument of "
                                                                     "swin_nano_patch2_window4_32; did you mean "
                                                                     "model.depths?")


def test_every_option_of_a_group_has_the_groups_schema() -> None:
    """Choosing an option (model=swin) never changes which keys a group has: the command line's keys can be
    checked against TrainConfig before Hydra composes."""
    hints = typing.get_type_hints(TrainConfig)
    for group in ("model", "data", "optimizer", "scheduler", "loss", "distill", "trainer", "logger"):
        for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
            node = compose([f"{group}={option}", "data.root=/tmp/x"])[group]
            assert set(node) == {f.name for f in dataclasses.fields(hints[group])}, (group, option)


def check(args: list[str], capsys: pytest.CaptureFixture[str]) -> str | None:
    """The one-line error check_override_keys prints for ``args``, or None when they pass."""
    try:
        check_override_keys(args, TrainConfig, CONFIG_DIR)
    except SystemExit as e:
        assert e.code == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err.strip()
    return None


@pytest.mark.parametrize(("args", "message"), [
    (["trainer.epoch=3"], "unknown key trainer.epoch; did you mean trainer.epochs?"),
    (["+trainer.epoch=3"], "unknown key trainer.epoch; did you mean trainer.epochs?"),
    (["~trainer.epoch"], "unknown key trainer.epoch; did you mean trainer.epochs?"),
    (["-m", "optimizer.lr=1e-3,5e-4", "optimizer.weightdecay=0,0.1"],
     "unknown key optimizer.weightdecay; did you mean optimizer.weight_decay?"),
    (["logger.mlflow.tracking_url=http://x"], "unknown key logger.mlflow.tracking_url; did you mean "
                                              "logger.mlflow.tracking_uri?"),
    (["experimnt=deit_recipe"], "unknown key experimnt; did you mean experiment?"),
    (["modle=swin"], "unknown key modle; did you mean model?"),
    (["model.img_sise=32"], "unknown key model.img_sise; did you mean model.img_size?"),
    (["model.depth=6"], "unknown key model.depth; an argument of the model's constructor is added with +: "
                        "+model.depth=..."),
    (["scheduler.zzz=1"], "unknown key scheduler.zzz; choose from scheduler.name, scheduler.warmup_epochs, "
                          "scheduler.warmup_lr, scheduler.min_lr_ratio, scheduler.min_lr, scheduler.decay_epochs, "
                          "scheduler.decay_rate"),
])
def test_command_line_keys_are_checked_before_hydra_composes(args: list[str], message: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert check(args, capsys) == f"error: {message}"


def test_hydra_keys_group_choices_and_model_arguments_pass(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["-m", "--cfg", "job", "model=swin", "experiment=deit_recipe", "hparams_search=optuna", "logger=[mlflow]",
            "hydra.run.dir=/tmp/x", "hydra/launcher=basic", "hydra.sweeper.n_trials=3", "+model.depth=6",
            "data.mean=[0.5,0.5,0.5]", "optimizer.lr=1e-3,5e-4", "seed=3", "++trainer.epochs=2",
            "distill.teacher.name=resnet18", "~model.checkpoint", "model@distill=vit"]
    assert check(args, capsys) is None
    assert check(["trainer.epochs=[", "trainer.epoch=3"], capsys) == (  # the first fault, in one line
        "error: cannot parse the override 'trainer.epochs=[': no viable alternative at input '['; write key=value "
        "(quote a value with spaces or brackets: key='[a b]')")


def test_unknown_key_lists_the_keys_when_none_is_close() -> None:
    assert unknown_key("trainer.epoch", ["epochs", "device"]) == ("unknown key trainer.epoch; "
                                                                  "did you mean trainer.epochs?")
    assert unknown_key("foo", ["seed", "model"]) == "unknown key foo; choose from seed, model"


@pytest.mark.parametrize(("command", "args", "expected"), [
    ("evaluate", ["checkpoint=x.pt", "batchsize=3"], "error: unknown key batchsize; did you mean batch_size?"),
    ("predict", ["checkpoint=x.pt", "inputs=y", "+topk5=3"], "error: unknown key topk5; did you mean topk?"),
    ("visualize", ["checkpoint=x.pt", "image=a.png", "head_fussion=max"],
     "error: unknown key head_fussion; did you mean head_fusion?"),
    ("export", ["checkpoint=x.pt", "formt=onnx"], "error: unknown key formt; did you mean format?"),
])
def test_every_command_refuses_a_misspelt_key_in_one_line(command: str, args: list[str], expected: str,
                                                          monkeypatch, capsys) -> None:
    """The inference commands check their keys as vitrain.train does, before Hydra composes (its own message spans
    many lines and names no key)."""
    import importlib
    import sys

    monkeypatch.setattr(sys, "argv", [f"vitrain-{command}", *args])
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"vitrain.{command}").main()
    assert stop.value.code == 1 and capsys.readouterr().err.strip() == expected


HEAVY = ("torch", "torchvision", "timm")


@pytest.mark.parametrize(("entry", "args", "expected"), [
    ("train", ["optimizer.lr=-1"], "error: optimizer.lr must be positive, got -1.0"),
    ("train", ["trainer.epochs=abc"], "error: trainer.epochs must be a whole number, got abc"),
    ("train", ["model=vit_nanoo"], "error: unknown model 'vit_nanoo'; did you mean vit_nano?"),
    ("train", ["trainer.device=tpu"], "error: trainer.device=tpu is not a device PyTorch knows"),
    ("train", ["--help"], None),
    ("evaluate", ["checkpoint=none.pt", "batch_size=0"], "error: batch_size must be at least 1, got 0"),
    ("predict", ["checkpoint=none.pt", "inputs=none.png", "topk=0"], "error: topk must be at least 1, got 0"),
    ("visualize", ["checkpoint=none.pt", "image=none.png", "head_fusion=avg"],
     "error: head_fusion=avg is not one of mean, max, min"),
    ("export", ["checkpoint=none.pt", "opset=3"], "error: opset must be >= 14, got 3"),
])
def test_a_bad_value_is_refused_before_torch_is_imported(entry: str, args: list[str], expected: str | None,
                                                         tmp_path: Path) -> None:
    """The checks that need no torch run before torch, torchvision and timm are imported (seconds of a laptop's
    time: docs/speed.md), and so does --help."""
    import subprocess
    import sys

    probe = (f"import runpy, sys; sys.argv = ['vitrain-{entry}', *{args!r}]\n"
             f"try:\n    runpy.run_module('vitrain.{entry}', run_name='__main__')\n"
             f"finally:\n    print('imported:', *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    *lines, imported = result.stderr.strip().splitlines()
    assert imported == "imported:", result.stderr
    if expected is None:
        assert result.returncode == 0 and "vitrain-train" in result.stdout
    else:
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert not list(tmp_path.iterdir())  # no run folder, no log
