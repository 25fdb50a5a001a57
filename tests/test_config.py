"""The Hydra configs: composition, groups, overrides, comments on every key."""

from __future__ import annotations

import re

import pytest

from vitrain.config import CONFIG_DIR, compose, to_config
from vitrain.models import list_models

GROUPS = ("model", "data", "optimizer", "scheduler", "loss", "trainer", "distill")


def test_default_composes_to_the_offline_digits_job() -> None:
    cfg = compose()
    assert cfg.model.name == "vit_nano_patch4_16" and cfg.data.name == "digits"
    assert (cfg.optimizer.name, cfg.scheduler.name, cfg.distill.name) == ("adamw", "cosine", "none")
    assert cfg.seed == 0 and cfg.trainer.epochs > 0
    assert set(GROUPS) <= set(cfg)


def test_overrides_from_the_shell() -> None:
    cfg = compose(["model=vit_small", "data=cifar10", "optimizer.lr=5e-4", "optimizer.backbone_lr=1e-5"])
    assert (cfg.model.name, cfg.model.img_size) == ("vit_small_patch16_224", None)  # null: resolved in TrainConfig
    assert to_config(cfg).model.img_size == 224  # the size its name gives (no weights)
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


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_becomes_its_schema_object(group: str) -> None:
    """Each YAML file holds only keys of its group's schema, with values of the right types and ranges."""
    from vitrain.config import TrainConfig

    fill = {"data": ["data.root=/tmp/x", "data.train_list=/tmp/x.csv", "data.shards=/tmp/x.tar", "data.path=/tmp/x"],
            "distill": ["distill.teacher.name=resnet18"]}.get(group, [])
    for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
        cfg = to_config(compose([f"{group}={option}", *fill]))
        assert isinstance(cfg, TrainConfig)
        assert type(getattr(cfg, group)).__name__.endswith("Config")


def test_every_key_is_declared_for_every_option_of_its_group() -> None:
    """data.split_seed is one key of DataConfig, not a digits-only one."""
    cfg = compose(["data=cifar10", "data.split_seed=3"])
    assert cfg.data.split_seed == 3 and to_config(cfg).data.split_seed == 3


def test_extra_model_keys_go_to_the_constructor() -> None:
    model = to_config(compose(["+model.embed_dim=24", "model=swin_nano"])).model
    assert model.constructor_kwargs() == {"drop_rate": 0.0, "drop_path_rate": 0.0, "embed_dim": 24}


@pytest.mark.parametrize(("override", "message"), [
    ("trainer.epochs=-3", "trainer.epochs must be positive (at least 1), got -3"),
    ("trainer.accum_steps=0", "trainer.accum_steps must be positive (at least 1), got 0"),
    ("trainer.precision=fp8", "unknown trainer.precision 'fp8'"),
    ("trainer.channels_last=sometimes", "trainer.channels_last must be auto, true or false"),
    ("trainer.ema_decay=1.5", "trainer.ema_decay must be in (0, 1)"),
    ("data.batch_size=0", "data.batch_size must be positive, got 0"),
    ("data.re_prob=2", "data.re_prob is a probability"),
    ("data.train_fraction=0", "data.train_fraction must be in (0, 1]"),
    ("data.pipeline=tpu", "unknown data.pipeline 'tpu'"),
    ("data.mixup=-1", "data.mixup must be >= 0"),
    ("model.img_size=0", "model.img_size must be positive, got 0"),
    ("model.drop_path=1.5", "model.drop_path is a rate"),
    ("model.source=keras", "unknown model source 'keras' (model.source)"),
    ("optimizer.lr=-1", "optimizer.lr must be positive, got -1"),
    ("optimizer.layer_decay=2", "optimizer.layer_decay must be in (0, 1]"),
    ("scheduler.name=linear", "unknown scheduler 'linear' (scheduler.name)"),
    ("scheduler.warmup_epochs=-1", "scheduler.warmup_epochs must be >= 0"),
    ("loss.label_smoothing=1.5", "loss.label_smoothing must be in [0, 1), got 1.5"),
    ("distill.alpha=2", "distill.alpha must be in [0, 1]"),
])
def test_out_of_range_values_are_refused_naming_the_key(override: str, message: str) -> None:
    from vitrain.errors import ConfigError

    extra = ["distill=soft", "distill.teacher.name=resnet18"] if override.startswith("distill") else []
    with pytest.raises(ConfigError) as e:
        to_config(compose([*extra, override]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


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
    cfg = to_config(compose(["model=deit", "data=cifar10"]))
    assert (cfg.model.name, cfg.model.img_size, cfg.data.name) == ("deit_base_distilled_patch16_224", 224, "cifar10")


def test_finetune_cifar10_quick_experiment_is_the_seed_recipe() -> None:
    cfg = to_config(compose(["experiment=finetune_cifar10_quick"]))  # img_size null: the weights' 224
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.img_size) == ("vit_small_patch16_224", True, 224)
    assert (cfg.data.name, cfg.data.batch_size, cfg.data.crop_padding, cfg.data.hflip) == ("cifar10", 32, 4, True)
    assert (cfg.optimizer.lr, cfg.optimizer.backbone_lr, cfg.optimizer.weight_decay) == (1e-3, 1e-5, 0.01)
    assert (cfg.scheduler.name, cfg.trainer.epochs) == ("cosine", 10)


def test_deit_recipe_experiment_has_deits_values() -> None:
    cfg = compose(["experiment=deit_recipe", "model=deit_small"])
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.re_prob == 0.25
    assert (cfg.data.mixup, cfg.data.cutmix, cfg.loss.label_smoothing) == (0.8, 1.0, 0.1)
    assert (cfg.model.drop_path, cfg.scheduler.warmup_epochs, cfg.optimizer.weight_decay) == (0.1, 5, 0.05)
    assert (cfg.optimizer.lr, cfg.optimizer.lr_base_batch, cfg.trainer.ema) == (5e-4, 512, True)
    assert cfg.model.name == "deit_small_distilled_patch16_224"  # the recipe leaves the model to the user


def test_linear_probe_experiment_freezes_the_backbone() -> None:
    cfg = compose(["experiment=linear_probe"])
    assert cfg.trainer.freeze_backbone and cfg.model.pretrained


def test_lr_scales_with_the_batch_when_asked() -> None:
    from vitrain.models import create_model
    from vitrain.optim import optimizer_and_schedule

    cfg = compose(["experiment=deit_recipe", "data.batch_size=128", "trainer.accum_steps=2"])
    model = create_model("vit_nano_patch4_16", num_classes=10)
    optimizer, _ = optimizer_and_schedule(model, to_config(cfg).optimizer, to_config(cfg).scheduler, 128 * 2,
                                          steps_per_epoch=10, epochs=2)
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([5e-4 * 256 / 512] * 4)


def test_a_saved_run_config_converts_to_the_schema(tmp_path) -> None:
    """A run's .hydra/config.yaml, read back without Hydra (untyped), becomes the same checked objects."""
    from omegaconf import OmegaConf

    from vitrain.config import TrainConfig

    composed = compose(["data=cifar10", "optimizer.lr=5e-4", "+model.depth=2"])
    OmegaConf.save(composed, tmp_path / "config.yaml")
    loaded = OmegaConf.load(tmp_path / "config.yaml")
    assert OmegaConf.get_type(loaded) is not TrainConfig
    cfg = to_config(loaded)
    assert isinstance(cfg, TrainConfig) and cfg == to_config(composed)
    assert cfg.model.constructor_kwargs()["depth"] == 2
