"""The Hydra configs: composition, groups, overrides, comments on every key."""

from __future__ import annotations

import re

import pytest

from vitrain.config import CONFIG_DIR, compose
from vitrain.models import list_models

GROUPS = ("model", "data", "optimizer", "scheduler", "trainer", "distill")


def test_default_composes_to_the_offline_digits_job() -> None:
    cfg = compose()
    assert cfg.model.name == "vit_nano_patch4_16" and cfg.data.name == "digits"
    assert (cfg.optimizer.name, cfg.scheduler.name, cfg.distill.name) == ("adamw", "cosine", "none")
    assert cfg.seed == 0 and cfg.trainer.epochs > 0
    assert set(GROUPS) <= set(cfg)


def test_overrides_from_the_shell() -> None:
    cfg = compose(["model=vit_small", "data=cifar10", "optimizer.lr=5e-4", "optimizer.backbone_lr=1e-5"])
    assert (cfg.model.name, cfg.model.img_size) == ("vit_small_patch16_224", 224)
    assert (cfg.data.name, cfg.optimizer.lr, cfg.optimizer.backbone_lr) == ("cifar10", 5e-4, 1e-5)


def test_vit_is_base_16() -> None:
    assert compose(["model=vit"]).model.name == "vit_base_patch16_224"


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))
def test_every_model_config_names_a_model_of_its_source(option: str) -> None:
    import timm
    import torchvision

    m = compose([f"model={option}"]).model
    known = {"vitrain": list_models(), "timm": timm.list_models(),
             "torchvision": torchvision.models.list_models(module=torchvision.models)}
    assert m.name in known[m.source]


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")))
def test_every_data_config_composes(option: str) -> None:
    cfg = compose([f"data={option}", "data.root=/tmp/x"])
    assert cfg.data.name == option and cfg.data.batch_size > 0


def test_unknown_key_is_refused() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose(["trainer.epoch=3"])  # typo of trainer.epochs


def test_every_user_key_has_a_comment() -> None:
    groups = (*GROUPS, "hparams_search", "hydra/launcher")  # the last two set Hydra's keys: checked too
    files = [p for g in groups for p in (CONFIG_DIR / g).glob("*.yaml")] + [CONFIG_DIR / "train.yaml"]
    missing = []
    for path in files:
        in_hydra = False
        for line in path.read_text().splitlines():
            if re.match(r"^hydra:", line):
                in_hydra = path.name == "train.yaml"  # Hydra's own settings (run folders, callbacks)
            elif re.match(r"^\S", line):
                in_hydra = False
            if in_hydra or not line.strip() or line.lstrip().startswith("#") or line.strip() == "defaults:":
                continue
            if " # " not in line:
                missing.append(f"{path.relative_to(CONFIG_DIR)}: {line.strip()}")
    assert not missing, missing


def test_design_card_deit_on_cifar10_composes() -> None:
    cfg = compose(["model=deit", "data=cifar10"])
    assert (cfg.model.name, cfg.model.img_size, cfg.data.name) == ("deit_base_distilled_patch16_224", 224, "cifar10")


def test_finetune_cifar10_experiment_is_the_seed_recipe() -> None:
    cfg = compose(["experiment=finetune_cifar10"])
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.img_size) == ("vit_small_patch16_224", True, 224)
    assert (cfg.data.name, cfg.data.batch_size, cfg.data.crop_padding, cfg.data.hflip) == ("cifar10", 32, 4, True)
    assert (cfg.optimizer.lr, cfg.optimizer.backbone_lr, cfg.optimizer.weight_decay) == (1e-3, 1e-5, 0.01)
    assert (cfg.scheduler.name, cfg.trainer.epochs) == ("cosine", 10)


def test_deit_recipe_experiment_has_deits_values() -> None:
    cfg = compose(["experiment=deit_recipe", "model=deit_small"])
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.re_prob == 0.25
    assert (cfg.trainer.mixup, cfg.trainer.cutmix, cfg.trainer.label_smoothing) == (0.8, 1.0, 0.1)
    assert (cfg.model.drop_path, cfg.scheduler.warmup_epochs, cfg.optimizer.weight_decay) == (0.1, 5, 0.05)
    assert (cfg.optimizer.lr, cfg.optimizer.lr_base_batch, cfg.trainer.ema) == (5e-4, 512, True)
    assert cfg.model.name == "deit_small_distilled_patch16_224"  # the recipe leaves the model to the user


def test_linear_probe_experiment_freezes_the_backbone() -> None:
    cfg = compose(["experiment=linear_probe"])
    assert cfg.optimizer.freeze_backbone and cfg.model.pretrained


def test_lr_scales_with_the_batch_when_asked() -> None:
    from vitrain.models import create_model
    from vitrain.train import build_optimization

    cfg = compose(["experiment=deit_recipe", "data.batch_size=128", "trainer.accum_steps=2"])
    model = create_model("vit_nano_patch4_16", num_classes=10)
    optimizer, _ = build_optimization(model, cfg.optimizer, cfg.scheduler, 128 * 2, steps_per_epoch=10, epochs=2)
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([5e-4 * 256 / 512] * 4)
