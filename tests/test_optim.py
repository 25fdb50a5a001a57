"""Parameter groups and learning-rate schedules: exact numbers."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import vitrain.models
from vitrain import optim
from vitrain.errors import ConfigError
from vitrain.models import create_model, heads
from vitrain.optim import (
    build_optimizer,
    build_scheduler,
    layer_ids,
    lr_factor,
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
    ({"name": "lion"}, "unknown optimizer 'lion'"),
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
