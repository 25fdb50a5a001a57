"""The loss group: BCE against its formula (hard, smoothed, soft and thresholded targets), two heads, CE
unchanged, BCE as the base of distillation, and the config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vitrain.build import build_loss
from vitrain.config import compose, to_config
from vitrain.distill import DistillationLoss, build_criterion
from vitrain.errors import ConfigError
from vitrain.losses import BinaryCrossEntropyLoss, ClassificationLoss, LossConfig, build_base_loss
from vitrain.train import train

LOGITS = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.5, -2.0]])
DIST = torch.tensor([[0.5, 0.5, 0.0], [1.0, -1.0, 0.0]])
LABELS = torch.tensor([0, 2])
SOFT = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.45, 0.5]])
TEACHER = torch.tensor([[0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])  # top-1: class 1, then class 0
INPUTS = torch.zeros(2, 3, 4, 4)


def bce_formula(logits: list[list[float]], targets: list[list[float]]) -> float:
    """Mean over batch and classes of -[t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))], in float64."""
    terms = []
    for z_row, t_row in zip(logits, targets, strict=True):
        for z, t in zip(z_row, t_row, strict=True):
            p = 1 / (1 + math.exp(-z))
            terms.append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
    return sum(terms) / len(terms)


def one_hot(labels: list[int], classes: int, smoothing: float = 0.0) -> list[list[float]]:
    off = smoothing / classes
    return [[1 - smoothing + off if c == y else off for c in range(classes)] for y in labels]


def log_softmax_row(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


def value(loss: nn.Module, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> float:
    return loss(INPUTS, outputs, labels).item()


# --- BCE against its formula ---------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bce_of_class_indices_is_the_formula_with_smoothed_one_hot_targets(smoothing: float) -> None:
    targets = one_hot(LABELS.tolist(), 3, smoothing)  # 0.1: 0.0333... off, 0.9333... on
    expected = bce_formula(LOGITS.tolist(), targets)
    assert value(BinaryCrossEntropyLoss(smoothing), LOGITS, LABELS) == pytest.approx(expected, abs=1e-6)


def test_bce_numbers_by_hand() -> None:
    # one-hot targets: row 0 -> softplus(-2) + softplus(-1) + softplus(0.5); row 1 -> softplus(0) + softplus(1.5)
    # + softplus(2); softplus(x) = log(1 + e^x)
    softplus = [0.1269280110, 0.3132616875, 0.9740769842, 0.6931471806, 1.7014132779, 2.1269280110]
    assert value(BinaryCrossEntropyLoss(), LOGITS, LABELS) == pytest.approx(sum(softplus) / 6, abs=1e-6)
    assert sum(softplus) / 6 == pytest.approx(bce_formula(LOGITS.tolist(), one_hot([0, 2], 3)), abs=1e-9)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bce_of_soft_targets_uses_them_unchanged(smoothing: float) -> None:
    """Soft targets (B, classes) from mixup/cutmix are already smoothed: smoothing is not applied again."""
    expected = bce_formula(LOGITS.tolist(), SOFT.tolist())
    assert value(BinaryCrossEntropyLoss(smoothing), LOGITS, SOFT) == pytest.approx(expected, abs=1e-6)


def test_bce_target_threshold_binarizes_the_targets() -> None:
    thresholded = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]  # SOFT > 0.3
    expected = bce_formula(LOGITS.tolist(), thresholded)
    assert value(BinaryCrossEntropyLoss(target_thresh=0.3), LOGITS, SOFT) == pytest.approx(expected, abs=1e-6)
    # smoothed class indices: the 0.0333 off values fall to 0 and the 0.9333 on values rise to 1
    unsmoothed = bce_formula(LOGITS.tolist(), one_hot([0, 2], 3))
    assert value(BinaryCrossEntropyLoss(0.1, target_thresh=0.2), LOGITS, LABELS) == pytest.approx(unsmoothed, abs=1e-6)


def test_bce_target_threshold_zero_is_deit3s_binarised_targets() -> None:
    """DeiT III (facebookresearch/deit engine.py, --bce-loss): targets.gt(0.0) after mixup, then
    BCEWithLogitsLoss; loss.bce_target_thresh=0.0 (experiment=deit3_recipe) gives the same loss."""
    from vitrain.data import build_mixup

    cfg = to_config(compose(["experiment=deit3_recipe"]))
    mixup = build_mixup(cfg.data, num_classes=10, label_smoothing=cfg.loss.label_smoothing)
    torch.manual_seed(0)
    images, logits = torch.randn(8, 3, 16, 16), torch.randn(8, 10)
    mixed, targets = mixup(images, torch.arange(8))
    deit3 = nn.BCEWithLogitsLoss()(logits, targets.gt(0.0).type(targets.dtype))
    assert cfg.loss.bce_target_thresh == 0.0
    assert build_base_loss(cfg.loss)(mixed, logits, targets).item() == pytest.approx(deit3.item(), abs=1e-6)


def test_bce_of_mixup_targets_is_the_formula_of_those_targets() -> None:
    """timm's Mixup (as build_mixup makes it, smoothing folded in) gives targets that BCE takes as they are."""
    from vitrain.data import build_mixup

    cfg = to_config(compose(["loss=bce", "data.mixup=0.8", "data.cutmix=1.0", "loss.label_smoothing=0.1"]))
    mixup = build_mixup(cfg.data, num_classes=10, label_smoothing=cfg.loss.label_smoothing)
    torch.manual_seed(0)
    images, logits = torch.randn(8, 3, 16, 16), torch.randn(8, 10)
    mixed, targets = mixup(images, torch.arange(8))
    assert targets.shape == (8, 10) and (targets.max(dim=1).values < 0.95).all()
    loss = build_base_loss(cfg.loss)(mixed, logits, targets)
    assert loss.item() == pytest.approx(bce_formula(logits.tolist(), targets.tolist()), abs=1e-6)


def test_both_heads_give_the_mean_of_their_losses() -> None:
    def ce(z: list[list[float]]) -> float:
        return -(log_softmax_row(z[0])[0] + log_softmax_row(z[1])[2]) / 2

    for loss, per_head in [(BinaryCrossEntropyLoss(0.1), lambda z: bce_formula(z, one_hot([0, 2], 3, 0.1))),
                           (ClassificationLoss(), ce)]:
        expected = (per_head(LOGITS.tolist()) + per_head(DIST.tolist())) / 2
        assert value(loss, (LOGITS, DIST), LABELS) == pytest.approx(expected, abs=1e-6)


def test_bce_under_bf16_autocast_is_float32_and_gives_gradients() -> None:
    logits = LOGITS.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BinaryCrossEntropyLoss(0.1)(INPUTS, (logits.bfloat16(), logits.bfloat16()), LABELS)
    assert loss.dtype == torch.float32
    loss.backward()
    # d/dz of the mean: (sigmoid(z) - t) / (B * classes), with bf16 logits
    expected = (torch.sigmoid(LOGITS.bfloat16().float()) - torch.tensor(one_hot([0, 2], 3, 0.1))) / 6
    torch.testing.assert_close(logits.grad, expected, atol=1e-3, rtol=0)


# --- cross-entropy unchanged -----------------------------------------------------------------------------------


def test_cross_entropy_is_unchanged() -> None:
    """Smoothing s: (1 - s) CE(y) + s * mean over classes of CE(c); soft targets: -sum t log p, not smoothed again."""
    rows = [log_softmax_row(r) for r in LOGITS.tolist()]
    hard = -(rows[0][0] + rows[1][2]) / 2
    uniform = -(sum(rows[0]) + sum(rows[1])) / 6
    soft = -sum(t * lp for t_row, lp_row in zip(SOFT.tolist(), rows, strict=True)
                for t, lp in zip(t_row, lp_row, strict=True)) / 2
    assert value(ClassificationLoss(), LOGITS, LABELS) == pytest.approx(hard, abs=1e-6)
    assert value(ClassificationLoss(0.1), LOGITS, LABELS) == pytest.approx(0.9 * hard + 0.1 * uniform, abs=1e-6)
    assert value(ClassificationLoss(0.1), LOGITS, SOFT) == pytest.approx(soft, abs=1e-6)
    for base in (build_criterion("none", 0.1), build_criterion("none", LossConfig(label_smoothing=0.1))):
        assert isinstance(base, ClassificationLoss) and base.label_smoothing == 0.1
    assert value(build_criterion(), LOGITS, LABELS) == pytest.approx(hard, abs=1e-6)


# --- BCE as the base of distillation ---------------------------------------------------------------------------


class FixedTeacher(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TEACHER


@pytest.mark.parametrize("labels", [LABELS, SOFT], ids=["indices", "soft"])
def test_hard_distillation_over_bce_is_the_alpha_mix(labels: torch.Tensor) -> None:
    """(1 - alpha) * BCE(z_cls, y) + alpha * CE(z_dist, argmax teacher); the same from a LossConfig or a module."""
    targets = SOFT.tolist() if labels is SOFT else one_hot([0, 2], 3, 0.1)
    bce = bce_formula(LOGITS.tolist(), targets)
    ce_dist = -(log_softmax_row(DIST[0].tolist())[1] + log_softmax_row(DIST[1].tolist())[0]) / 2
    expected = 0.7 * bce + 0.3 * ce_dist
    for base in (LossConfig(name="bce", label_smoothing=0.1), BinaryCrossEntropyLoss(0.1)):
        criterion = build_criterion("hard", base, teacher=FixedTeacher(), alpha=0.3)
        assert isinstance(criterion, DistillationLoss) and isinstance(criterion.base, BinaryCrossEntropyLoss)
        assert value(criterion, (LOGITS, DIST), labels) == pytest.approx(expected, abs=1e-6)


# --- the config ------------------------------------------------------------------------------------------------


def test_loss_bce_composes_into_its_config_and_loss() -> None:
    assert to_config(compose(["loss=bce"])).loss == LossConfig(name="bce", label_smoothing=0.0, bce_target_thresh=None)
    cfg = to_config(compose(["loss=bce", "loss.label_smoothing=0.1", "loss.bce_target_thresh=0.2"]))
    assert cfg.loss == LossConfig(name="bce", label_smoothing=0.1, bce_target_thresh=0.2)
    loss = build_loss(cfg, num_classes=3, device=torch.device("cpu"))
    assert isinstance(loss, BinaryCrossEntropyLoss) and (loss.label_smoothing, loss.target_thresh) == (0.1, 0.2)
    assert isinstance(build_loss(to_config(compose([])), 3, torch.device("cpu")), ClassificationLoss)


@pytest.mark.parametrize("overrides,message", [
    (["loss.name=focal"], "unknown loss 'focal' (loss.name); choose one of ce, bce"),
    (["loss.bce_target_thresh=0.2"], "loss.bce_target_thresh applies to loss.name=bce only, not ce"),
    (["loss=bce", "loss.bce_target_thresh=1.5"], "loss.bce_target_thresh must be in [0, 1) or null, got 1.5"),
    (["loss=bce", "loss.label_smoothing=1.0"], "loss.label_smoothing must be in [0, 1), got 1.0"),
])
def test_bad_loss_settings_are_refused_in_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        to_config(compose(overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bce_trains_with_mixup_end_to_end(tmp_path: Path) -> None:
    """Two steps on digits under loss=bce with mixup/cutmix and smoothing: a finite loss, a checkpoint."""
    cfg = compose(["loss=bce", "loss.label_smoothing=0.1", "data.mixup=0.8", "data.cutmix=1.0",
                   "trainer.epochs=1", "data.batch_size=700", "trainer.progress=false"])
    metrics = train(cfg, tmp_path)
    assert metrics["steps"] == 2 and math.isfinite(metrics["history"][0]["train_loss"])
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
