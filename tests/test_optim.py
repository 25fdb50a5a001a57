"""Parameter groups and learning-rate schedules: exact numbers."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from timm.optim.adan import Adan
from timm.optim.lamb import Lamb
from timm.optim.lion import Lion
from timm.optim.lookahead import Lookahead
from timm.optim.nadamw import NAdamW

import vitrain.models
from vitrain import optim
from vitrain.config import CONFIG_DIR, compose, to_config
from vitrain.errors import ConfigError
from vitrain.models import create_model, heads
from vitrain.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
    check_optimizer,
    layer_ids,
    lr_factor,
    optimizer_and_schedule,
    optimizer_names,
    param_groups,
    set_backbone_trainable,
)


def test_warmup_is_linear_and_reaches_one() -> None:
    assert [lr_factor(s, total_steps=100, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize(("step", "expected"), [
    (10, 1.0),                                          # end of warmup: the full rate
    (55, 0.1 + 0.9 * 0.5),                              # half way through the cosine: mid-point
    (32.5, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),  # a quarter of the way
    (100, 0.1),                                         # the end: the floor
    (150, 0.1),                                         # past the end: stays at the floor
])
def test_cosine_values(step: float, expected: float) -> None:
    assert lr_factor(step, total_steps=100, warmup_steps=10, min_ratio=0.1) == pytest.approx(expected)


def test_constant_schedule_after_warmup() -> None:
    assert [lr_factor(s, 10, 2, kind="constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_param_groups_split_head_backbone_and_decay() -> None:
    model = create_model("vit_nano_patch4_16", num_classes=3)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, backbone_lr=1e-5, weight_decay=0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert members["head"] == {"head.weight"}
    assert members["head_no_decay"] == {"head.bias"}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.bias",
            "patch_embed.proj.bias"} <= members["backbone_no_decay"]
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight"} <= members["backbone"]
    assert all(n.endswith("weight") for n in members["backbone"])
    assert sum(len(m) for m in members.values()) == len(names)  # every parameter exactly once
    assert (groups["head"]["lr"], groups["backbone"]["lr"]) == (1e-3, 1e-5)
    assert (groups["backbone"]["weight_decay"], groups["backbone_no_decay"]["weight_decay"]) == (0.05, 0.0)


def test_backbone_lr_defaults_to_lr() -> None:
    model = create_model("vit_nano_patch4_16", num_classes=3)
    assert {g["lr"] for g in param_groups(model, lr=3e-4)} == {3e-4}


def test_frozen_backbone_is_not_updated_until_unfrozen() -> None:
    """Linear probing: only the head moves; after unfreezing, the same optimizer moves the backbone."""
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_16", num_classes=3)
    set_backbone_trainable(model, False)
    opt = build_optimizer(model, lr=1e-2)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step() -> None:
        loss = model(torch.randn(4, 3, 16, 16)).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"head.weight", "head.bias"}
    set_backbone_trainable(model, True)
    step()
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])


def test_adamw_step_applies_no_decay_to_tokens() -> None:
    """With zero gradients AdamW only decays: decayed weights shrink by lr*wd, tokens stay put."""
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before_w, before_cls = model.head.weight.detach().clone(), model.cls_token.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.head.weight, before_w * (1 - 0.1 * 0.5))
    torch.testing.assert_close(model.cls_token, before_cls)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0.0}, "optimizer.lr must be positive"),
    ({"lr": 1e-3, "backbone_lr": -1.0}, "optimizer.backbone_lr must be positive"),
    ({"name": "lino"}, "unknown optimizer 'lino'"),
])
def test_bad_optimizer_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_optimizer(create_model("vit_nano_patch4_16"), **kwargs)


def test_unknown_scheduler() -> None:
    opt = build_optimizer(create_model("vit_nano_patch4_16"))
    with pytest.raises(ConfigError, match="unknown scheduler 'poly'"):
        build_scheduler(opt, 10, name="poly")


def test_step_schedule_values() -> None:
    steps = (0, 2, 11, 12, 22, 95)
    values = [lr_factor(s, 100, warmup_steps=2, kind="step", decay_steps=10, decay_rate=0.5) for s in steps]
    assert values == [0.5, 1.0, 1.0, 0.5, 0.25, 0.5**9]


def test_schedule_at_warmup_start_end_midpoint_and_end_for_two_groups() -> None:
    """Backbone 1e-5 and head 1e-3, 10 warmup steps of 110, floor 1%: the numbers at the four points."""
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt = build_optimizer(model, lr=1e-3, backbone_lr=1e-5)
    sched = build_scheduler(opt, total_steps=110, warmup_steps=10, min_lr_ratio=0.01)
    lrs = []
    for _ in range(111):
        lrs.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    expected = {0: 0.1, 9: 1.0, 60: 0.01 + 0.99 * 0.5, 110: 0.01}  # warmup start, warmup end, midpoint, end
    for step, factor in expected.items():
        assert lrs[step]["head"] == pytest.approx(1e-3 * factor)
        assert lrs[step]["backbone"] == lrs[step]["backbone_no_decay"] == pytest.approx(1e-5 * factor)


def test_warmup_start_is_the_first_rate_then_linear_to_one() -> None:
    """timm's warmup_lr_init: s at step 0, s + (1 - s) k / W at step k, 1 at W."""
    assert [lr_factor(k, 100, warmup_steps=4, warmup_start=0.2) for k in range(5)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1.0])


def test_absolute_floor_and_warmup_start_are_rates_of_the_lr_group() -> None:
    """min_lr 1e-5 and warmup_lr 1e-6 with lr 1e-3 x 256 / 512 = 5e-4 and backbone 5e-5: the head starts at 1e-6
    and ends at 1e-5; the backbone keeps its ratio of 1/10 (1e-7, 1e-6). min_lr replaces min_lr_ratio."""
    model = create_model("vit_nano_patch4_16", num_classes=3)
    optimizer = OptimizerConfig(lr=1e-3, backbone_lr=1e-4, scale_lr=True)
    scheduler = SchedulerConfig("cosine", warmup_epochs=1, warmup_lr=1e-6, min_lr_ratio=0.5, min_lr=1e-5)
    opt, sched = optimizer_and_schedule(model, optimizer, scheduler, global_batch=256, steps_per_epoch=10, epochs=3)
    factor = sched.lr_lambdas[0]
    rates = {g["name"]: (g["initial_lr"] * factor(0), g["initial_lr"] * factor(30)) for g in opt.param_groups}
    assert rates["head"] == pytest.approx((1e-6, 1e-5)) and rates["backbone"] == pytest.approx((1e-7, 1e-6))
    assert {g["name"]: g["lr"] for g in opt.param_groups}["head"] == pytest.approx(1e-6)  # the first step's rate


@pytest.mark.parametrize(("key", "message"), [
    ("min_lr", "scheduler.min_lr=0.01 is above the peak learning rate 0.001"),
    ("warmup_lr", "scheduler.warmup_lr=0.01 is above the peak learning rate 0.001"),
])
def test_an_absolute_rate_above_the_peak_is_refused(key: str, message: str) -> None:
    model = create_model("vit_nano_patch4_16", num_classes=3)
    with pytest.raises(ConfigError, match=message):
        optimizer_and_schedule(model, OptimizerConfig(lr=1e-3), SchedulerConfig(**{key: 1e-2}), 64, 10, 1)
    with pytest.raises(ConfigError, match=f"scheduler.{key} must be >= 0"):
        SchedulerConfig(**{key: -1.0})


def test_lr_is_used_as_given_without_scale_lr_or_a_base_batch() -> None:
    """DeiT III's --unscale-lr: scale_lr false and lr_base_batch null keep optimizer.lr at any batch."""
    cfg = OptimizerConfig(name="lamb", lr=4e-3, scale_lr=False, lr_base_batch=None)
    assert cfg.lr_scale(64) == cfg.lr_scale(2048) == 1.0
    assert OptimizerConfig(name="lamb", lr=4e-3, lr_base_batch=2048).lr_scale(64) == 64 / 2048


def test_layer_decay_factors_per_block() -> None:
    """ViT with 6 blocks, decay 0.5: embeddings 0.5^7, block i (0-based) 0.5^(6-i), final norm and head 1."""
    model = create_model("vit_nano_patch4_16", num_classes=3)
    ids = layer_ids(model)
    assert (ids["cls_token"], ids["patch_embed.proj.weight"], ids["blocks.0.attn.qkv.weight"]) == (0, 0, 1)
    assert (ids["blocks.5.mlp.fc2.bias"], ids["norm.weight"], ids["head.weight"]) == (6, 7, 7)
    lrs = {n: g["lr"] for g in param_groups(model, lr=1.0, backbone_lr=0.1, layer_decay=0.5) for n in [g["name"]]}
    assert lrs["backbone_layer0_no_decay"] == pytest.approx(0.1 * 0.5**7)
    for i in range(6):
        assert lrs[f"backbone_layer{i + 1}"] == pytest.approx(0.1 * 0.5 ** (6 - i))
    assert lrs["backbone_layer7_no_decay"] == pytest.approx(0.1)  # final norm: the top of the backbone
    assert lrs["head"] == 1.0


def test_layer_decay_counts_swin_blocks_across_stages() -> None:
    model = create_model("swin_nano_patch2_window4_32", num_classes=3)  # depths (2, 2, 2), merging before 2, 3
    ids = layer_ids(model)
    assert ids["layers.0.blocks.1.attn.qkv.weight"] == 2
    assert ids["layers.1.downsample.reduction.weight"] == 3
    assert ids["layers.1.blocks.0.attn.qkv.weight"] == 4
    assert ids["layers.2.blocks.1.mlp.fc1.weight"] == 8 and ids["norm.weight"] == 9


def test_layer_decay_needs_blocks() -> None:
    from vitrain.models.external import create_timm_model

    with pytest.raises(ConfigError, match="optimizer.layer_decay needs a model with transformer blocks"):
        build_optimizer(create_timm_model("resnet18", num_classes=3), layer_decay=0.7)


@pytest.mark.parametrize(("name", "head", "no_decay", "decay"), [
    ("deit_tiny_distilled_patch16_224", {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"},
     {"cls_token", "dist_token", "pos_embed", "blocks.0.norm1.weight"}, {"blocks.11.attn.proj.weight"}),
    ("swin_nano_patch2_window4_32", {"head.fc.weight", "head.fc.bias"},
     {"layers.0.blocks.0.attn.relative_position_bias_table", "patch_embed.norm.weight"},
     {"layers.1.downsample.reduction.weight"}),
])
def test_groups_for_deit_and_swin(name: str, head: set, no_decay: set, decay: set) -> None:
    model = create_model(name, num_classes=3)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, backbone_lr=1e-5, weight_decay=0.05)}
    members = {k: {names[id(p)] for p in g["params"]} for k, g in groups.items()}
    assert members["head"] | members["head_no_decay"] == head
    assert no_decay <= members["backbone_no_decay"] and decay <= members["backbone"]
    assert (groups["head"]["lr"], groups["backbone_no_decay"]["lr"]) == (1e-3, 1e-5)
    assert (groups["backbone"]["weight_decay"], groups["backbone_no_decay"]["weight_decay"]) == (0.05, 0.0)


# the model layer owns the classifier names; it imports nothing from the optimizer or above -----------------

FORBIDDEN = ("vitrain.optim", "vitrain.train", "vitrain.trainer", "vitrain.evaluate", "vitrain.predict",
             "vitrain.visualize", "vitrain.data")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` anywhere in the file (functions included) names, made absolute."""
    package = "vitrain.models"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.update([module, *(f"{module}.{alias.name}" for alias in node.names)])
    return found


def test_model_layer_imports_neither_the_optimizer_nor_the_entry_points() -> None:
    files = sorted((Path(vitrain.models.__file__).parent).glob("*.py"))
    assert len(files) >= 8
    for path in files:
        bad = {m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_classifier_names_live_in_the_models_and_are_reexported() -> None:
    assert optim.classifier_names is vitrain.models.classifier_names is heads.classifier_names
    assert heads.classifier_names(create_model("deit_nano_distilled_patch4_16")) == ("head", "head_dist")
    timm_like = torch.nn.Linear(2, 2)
    timm_like.pretrained_cfg = {"classifier": ("fc", "fc_dist")}
    assert heads.classifier_names(timm_like) == ("fc", "fc_dist")
    assert heads.classifier_names(torch.nn.Linear(2, 2)) == ("head",)
    assert heads.in_module("head.fc.weight", ["head"]) and not heads.in_module("head_dist.weight", ["head"])


# the optimizers: timm builds each over vitrain's groups, which it keeps -------------------------------------

OPTIMIZERS = [  # name, class, settings, what the optimizer's defaults must then hold
    ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.95), "eps": 1e-6}, {"betas": (0.8, 0.95), "eps": 1e-6}),
    ("sgd", torch.optim.SGD, {"momentum": 0.8, "nesterov": False}, {"momentum": 0.8, "nesterov": False}),
    ("lamb", Lamb, {"betas": (0.85, 0.99), "eps": 1e-7}, {"betas": (0.85, 0.99), "eps": 1e-7}),
    ("lion", Lion, {"betas": (0.9, 0.98)}, {"betas": (0.9, 0.98)}),
    ("adan", Adan, {"betas": (0.9, 0.9, 0.95)}, {"betas": (0.9, 0.9, 0.95)}),
    ("nadamw", NAdamW, {}, {"betas": (0.9, 0.999)}),
]


def _groups_as_numbers(groups: list[dict], model: torch.nn.Module) -> list[tuple]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["name"], g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in groups]


def test_the_paper_optimizers_are_timm_names() -> None:
    assert {"adamw", "sgd", "momentum", "lamb", "lion", "adan", "nadamw"} <= set(optimizer_names())


@pytest.mark.parametrize(("name", "cls", "settings", "defaults"), OPTIMIZERS)
def test_optimizer_keeps_vitrains_groups(name: str, cls: type, settings: dict, defaults: dict) -> None:
    """Same parameters per group, head 1e-2 and backbone 1e-3 x 0.5^depth, weight decay 0.3 or 0."""
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt = build_optimizer(model, name, lr=1e-2, backbone_lr=1e-3, weight_decay=0.3, layer_decay=0.5, **settings)
    assert type(opt) is cls
    expected = param_groups(model, lr=1e-2, backbone_lr=1e-3, weight_decay=0.3, layer_decay=0.5)
    assert _groups_as_numbers(opt.param_groups, model) == _groups_as_numbers(expected, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert len(groups) == 2 + 7 * 2 + 1  # head x 2; embedding and 6 blocks x 2; final norm (no decay only)
    assert (groups["head"]["lr"], groups["head"]["weight_decay"]) == (1e-2, 0.3)
    assert (groups["head_no_decay"]["lr"], groups["head_no_decay"]["weight_decay"]) == (1e-2, 0.0)
    assert groups["backbone_layer6"]["lr"] == pytest.approx(1e-3 * 0.5)  # blocks.5
    assert groups["backbone_layer0_no_decay"]["lr"] == pytest.approx(1e-3 * 0.5**7)  # cls token, pos embed
    assert groups["backbone_layer0_no_decay"]["weight_decay"] == 0.0
    assert groups["backbone_layer7_no_decay"]["lr"] == pytest.approx(1e-3)  # the final norm
    assert {g["weight_decay"] for k, g in groups.items() if not k.endswith("_no_decay")} == {0.3}
    for key, value in defaults.items():
        assert tuple(opt.defaults[key]) == value if isinstance(value, tuple) else opt.defaults[key] == value
        assert all(g[key] == opt.defaults[key] for g in opt.param_groups)


@pytest.mark.parametrize(("name", "cls", "settings", "defaults"), OPTIMIZERS)
def test_one_step_moves_the_weights(name: str, cls: type, settings: dict, defaults: dict) -> None:
    torch.manual_seed(0)
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt = build_optimizer(model, name, lr=1e-2, backbone_lr=1e-3, weight_decay=0.05, **settings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(4, 3, 16, 16)).logsumexp(-1).mean().backward()
    opt.step()
    for n in ("head.weight", "blocks.0.attn.qkv.weight", "cls_token"):
        assert not torch.equal(dict(model.named_parameters())[n], before[n]), n
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("nesterov", "factor"), [(False, 1.0), (True, 1.9)])
def test_sgd_first_step_numbers(nesterov: bool, factor: float) -> None:
    """First step, momentum 0.9: p - lr (g + wd p), times 1 + 0.9 with Nesterov; norms get no decay."""
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.01, momentum=0.9, nesterov=nesterov)
    w, b = model.head.weight.detach().clone(), model.norm.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    torch.testing.assert_close(model.head.weight, w - 0.1 * factor * (0.5 + 0.01 * w))
    torch.testing.assert_close(model.norm.weight, b - 0.1 * factor * 0.5)


def test_sgd_and_momentum_nesterov_defaults_follow_timm() -> None:
    model = create_model("vit_nano_patch4_16", num_classes=3)
    sgd, momentum = build_optimizer(model, "sgd"), build_optimizer(model, "momentum")
    assert (type(sgd), sgd.defaults["nesterov"], sgd.defaults["momentum"]) == (torch.optim.SGD, True, 0.9)
    assert (type(momentum), momentum.defaults["nesterov"]) == (torch.optim.SGD, False)


def test_lion_first_step_numbers() -> None:
    """Lion's first step: p (1 - lr wd) - lr sign(g); no decay on the CLS token."""
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt = build_optimizer(model, "lion", lr=1e-3, weight_decay=2.0)
    w, cls = model.head.weight.detach().clone(), model.cls_token.detach().clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, -0.25)
    opt.step()
    torch.testing.assert_close(model.head.weight, w * (1 - 1e-3 * 2.0) + 1e-3)
    torch.testing.assert_close(model.cls_token, cls + 1e-3)


def test_lookahead_wraps_the_optimizer_with_the_same_groups() -> None:
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt = build_optimizer(model, "lookahead_sgd", lr=0.1, backbone_lr=0.01)
    assert type(opt) is Lookahead and type(opt._base_optimizer) is torch.optim.SGD
    assert _groups_as_numbers(opt.param_groups, model) == _groups_as_numbers(
        param_groups(model, lr=0.1, backbone_lr=0.01), model)


def test_timm_regrouping_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def regroup(groups: list[dict], **kwargs: object) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for g in groups for p in g["params"]], lr=kwargs["lr"])

    monkeypatch.setattr(optim.timm_optim, "create_optimizer_v2", regroup)
    with pytest.raises(RuntimeError, match="timm changed vitrain's parameter groups"):
        build_optimizer(create_model("vit_nano_patch4_16", num_classes=3), "sgd")


@pytest.mark.parametrize(("name", "on_cuda", "fused"), [
    ("adamw", True, True), ("adamw", False, None), ("sgd", True, None), ("lookahead_adamw", True, True),
])
def test_fused_adamw_only_on_cuda(monkeypatch: pytest.MonkeyPatch, name: str, on_cuda: bool, fused: bool) -> None:
    calls = []
    create = optim.timm_optim.create_optimizer_v2
    monkeypatch.setattr(optim, "_on_cuda", lambda groups: on_cuda)
    monkeypatch.setattr(optim.timm_optim, "create_optimizer_v2", lambda *a, **kw: calls.append(kw) or create(*a, **kw))
    opt = build_optimizer(create_model("vit_nano_patch4_16", num_classes=3), name)
    assert calls[0].get("fused") is fused
    base = getattr(opt, "_base_optimizer", opt)
    assert base.defaults["fused"] is fused


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "adamx"}, "unknown optimizer 'adamx' (optimizer.name); did you mean adamax, adam, radam? all of them"),
    ({"name": "AdamW"}, "unknown optimizer 'AdamW' (optimizer.name); did you mean adamw"),
    ({"name": "lookahead_lamm"}, "unknown optimizer 'lookahead_lamm' (optimizer.name); did you mean lamb"),
    ({"name": "adahessian"}, "optimizer 'adahessian' (optimizer.name) needs second-order gradients"),
    ({"name": "sgd", "eps": 1e-8}, "optimizer.eps is not used by sgd; set optimizer.eps=null"),
    ({"name": "adamw", "eps": 0.0}, "optimizer.eps must be positive, got 0.0"),
    ({"name": "adamw", "nesterov": True}, "optimizer.nesterov is not used by adamw"),
    ({"name": "sgd", "betas": [0.9, 0.99]}, "optimizer.betas is not used by sgd"),
    ({"name": "adan", "betas": [0.9, 0.99]}, "optimizer.betas must be 3 values in [0, 1) for adan, got [0.9, 0.99]"),
    ({"name": "lion", "betas": [0.9, 1.0]}, "optimizer.betas must be 2 values in [0, 1) for lion"),
    ({"name": "sgd", "momentum": 1.0}, "optimizer.momentum must be in [0, 1), got 1.0"),
    ({"name": "sgd", "momentum": 0.0}, "Nesterov momentum (sgd) needs optimizer.momentum > 0, got 0"),
])
def test_bad_optimizer_config_is_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_optimizer(OptimizerConfig(**kwargs))  # the values, then the checks that need timm's table
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_unknown_name_lists_close_matches_and_where_to_see_all() -> None:
    with pytest.raises(ConfigError) as e:
        to_config(compose(["optimizer.name=lino"]))
    assert str(e.value) == ("unknown optimizer 'lino' (optimizer.name); did you mean lion, lionc, clion? all of them: "
                            "python -c \"import timm.optim; print(timm.optim.list_optimizers())\"")
    check_optimizer(OptimizerConfig(name="momentum", momentum=0.0))  # classical momentum 0: plain SGD, allowed


@pytest.mark.parametrize("option", ["sgd", "lamb", "lion", "adamw"])
def test_optimizer_configs_compose_to_their_yaml_values(option: str) -> None:
    values = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "optimizer" / f"{option}.yaml"))
    cfg = to_config(compose([f"optimizer={option}"])).optimizer
    assert isinstance(cfg, OptimizerConfig) and values["name"] == option
    assert {key: getattr(cfg, key) for key in values} == values


def test_sgd_config_is_torchvisions_recipe() -> None:
    """optimizer=sgd: lr 0.1 per 256 images, momentum 0.9, classical, weight decay 1e-4; at a global batch
    of 64 the SGD gets lr 0.025."""
    cfg = to_config(compose(["optimizer=sgd"])).optimizer
    assert (cfg.name, cfg.lr, cfg.lr_base_batch, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (
        "sgd", 0.1, 256, 0.9, False, 1e-4)
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt, _ = optimizer_and_schedule(model, cfg, SchedulerConfig(), global_batch=64, steps_per_epoch=10, epochs=1)
    assert type(opt) is torch.optim.SGD
    assert (opt.defaults["momentum"], opt.defaults["nesterov"]) == (0.9, False)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025] * len(opt.param_groups))
    assert {g["weight_decay"] for g in opt.param_groups} == {1e-4, 0.0}


def test_lamb_and_lion_configs_reach_the_optimizer() -> None:
    model = create_model("vit_nano_patch4_16", num_classes=3)
    lamb = to_config(compose(["optimizer=lamb"])).optimizer
    opt, _ = optimizer_and_schedule(model, lamb, SchedulerConfig(), global_batch=512, steps_per_epoch=10, epochs=1)
    assert type(opt) is Lamb and opt.param_groups[0]["lr"] == pytest.approx(3e-3 * 512 / 2048)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    lion = to_config(compose(["optimizer=lion", "optimizer.backbone_lr=1e-5"])).optimizer
    opt, _ = optimizer_and_schedule(model, lion, SchedulerConfig(), global_batch=512, steps_per_epoch=10, epochs=1)
    assert type(opt) is Lion and opt.defaults["betas"] == (0.9, 0.99)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {
        "backbone": 1e-5, "backbone_no_decay": 1e-5, "head": 1e-4, "head_no_decay": 1e-4}
