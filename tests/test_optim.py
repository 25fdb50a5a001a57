"""Parameter groups and learning-rate schedules: exact numbers."""

from __future__ import annotations

import math

import pytest
import torch

from vitrain.errors import ConfigError
from vitrain.models import create_model
from vitrain.optim import build_optimizer, build_scheduler, lr_factor, param_groups


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


def test_each_group_keeps_its_own_base_lr() -> None:
    """The scheduler scales every group's base rate by the same factor: backbone 1e-5, head 1e-3."""
    model = create_model("vit_nano_patch4_16", num_classes=3)
    opt = build_optimizer(model, lr=1e-3, backbone_lr=1e-5)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=5, min_lr_ratio=0.1)
    seen = []
    for _ in range(20):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    for step in (0, 3, 12, 19):
        factor = lr_factor(step, 20, 5, 0.1)
        assert seen[step]["head"] == pytest.approx(1e-3 * factor)
        assert seen[step]["backbone"] == pytest.approx(1e-5 * factor)
        assert seen[step]["backbone_no_decay"] == pytest.approx(1e-5 * factor)


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


def test_frozen_parameters_are_left_out() -> None:
    model = create_model("vit_nano_patch4_16", num_classes=3)
    model.patch_embed.requires_grad_(False)
    params = [p for g in param_groups(model, lr=1e-3) for p in g["params"]]
    assert all(p is not model.patch_embed.proj.weight for p in params)
    assert len(params) == sum(1 for p in model.parameters() if p.requires_grad)


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
