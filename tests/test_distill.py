"""Distillation: loss values against hand-computed numbers, a frozen teacher, the teacher's inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vitrain.checkpoint import load_checkpoint
from vitrain.config import compose, to_config
from vitrain.distill import (
    DistillationLoss,
    TeacherInputs,
    build_criterion,
    hard_distillation_loss,
    soft_distillation_loss,
)
from vitrain.errors import ConfigError
from vitrain.losses import ClassificationLoss
from vitrain.train import train

STUDENT = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
TEACHER = torch.tensor([[0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])


def log_softmax_row(row: list[float], tau: float = 1.0) -> list[float]:
    z = [v / tau for v in row]
    lse = math.log(sum(math.exp(v) for v in z))
    return [v - lse for v in z]


def test_hard_loss_is_cross_entropy_to_the_teachers_top_class() -> None:
    # teacher top-1: class 1 for row 0, class 0 for row 1
    expected = (-log_softmax_row([2, 1, 0])[1] - log_softmax_row([0, 0, 3])[0]) / 2
    assert expected == pytest.approx((2.4076059644 - 1.0 + 3.0949229057) / 2)
    assert hard_distillation_loss(STUDENT, TEACHER).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_loss_both_reductions(tau: float) -> None:
    kl = 0.0
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist(), strict=True):
        log_s, log_t = log_softmax_row(s_row, tau), log_softmax_row(t_row, tau)
        kl += sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t, strict=True))
    batchmean = kl * tau**2 / 2  # divided by the batch (timm)
    numel = kl * tau**2 / 6  # divided by batch x classes (DeiT's reference code)
    assert soft_distillation_loss(STUDENT, TEACHER, tau, "batchmean").item() == pytest.approx(batchmean, rel=1e-6)
    assert soft_distillation_loss(STUDENT, TEACHER, tau, "numel").item() == pytest.approx(numel, rel=1e-6)


class FixedTeacher(nn.Module):
    """Returns TEACHER whatever the input; has one parameter to check that it never moves."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TEACHER * self.w


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_total_is_the_alpha_mix_of_base_and_distillation(mode: str) -> None:
    labels = torch.tensor([0, 2])
    dist = torch.tensor([[0.5, 0.5, 0.0], [1.0, -1.0, 0.0]])
    loss = DistillationLoss(ClassificationLoss(), FixedTeacher(), mode=mode, alpha=0.3, tau=2.0)
    base = (-log_softmax_row([2, 1, 0])[0] - log_softmax_row([0, 0, 3])[2]) / 2  # CE of the CLS head
    kd = hard_distillation_loss(dist, TEACHER) if mode == "hard" else soft_distillation_loss(dist, TEACHER, 2.0)
    value = loss(torch.zeros(2, 3, 4, 4), (STUDENT, dist), labels)
    assert value.item() == pytest.approx(0.7 * base + 0.3 * kd.item(), rel=1e-6)
    assert loss.teacher_seconds > 0


def test_teacher_inputs_renormalise_and_resize() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 8, 8)
    s_mean, s_std, t_mean, t_std = [0.5] * 3, [0.5] * 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    student = (pixels - torch.tensor(s_mean).view(1, 3, 1, 1)) / torch.tensor(s_std).view(1, 3, 1, 1)
    expected = (pixels - torch.tensor(t_mean).view(1, 3, 1, 1)) / torch.tensor(t_std).view(1, 3, 1, 1)
    torch.testing.assert_close(TeacherInputs(s_mean, s_std, t_mean, t_std)(student), expected)
    assert TeacherInputs(s_mean, s_std, size=16)(student).shape == (2, 3, 16, 16)
    assert TeacherInputs(s_mean, s_std)(student) is student  # nothing to do


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="distill=hard needs a teacher"):
        build_criterion("hard")
    with pytest.raises(ConfigError, match="distill.alpha must be in"):
        build_criterion("soft", teacher=FixedTeacher(), alpha=1.5)
    with pytest.raises(ConfigError, match="unknown distill.reduction 'mean'"):
        soft_distillation_loss(STUDENT, TEACHER, 1.0, "mean")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real vitrain run of a timm ResNet-18 teacher on digits (2 steps: quality does not matter here)."""
    out = tmp_path_factory.mktemp("teacher")
    train(compose(["experiment=digits_teacher", "trainer.epochs=1", "data.batch_size=720",
                   "trainer.progress=false"]), out)
    return out / "checkpoints" / "best.pt"


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_student_trains_from_a_vitrain_teacher_which_stays_frozen(mode: str, teacher_run: Path,
                                                                   tmp_path: Path) -> None:
    cfg = compose(["experiment=digits_distill", f"distill={mode}", f"distill.teacher.checkpoint={teacher_run}",
                   "trainer.epochs=1", "data.batch_size=64", "trainer.progress=false", "data.mixup=0.8"])
    metrics = train(cfg, tmp_path)
    assert metrics["steps"] == 22  # mixup keeps the 22 full batches of 64
    assert 0 < metrics["history"][0]["teacher_time_share"] < 1
    # the student's checkpoint reloads; the teacher's file is untouched by training
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["config"]["distill"]["name"] == mode


def test_teacher_weights_are_bit_identical_after_training_steps(teacher_run: Path, tmp_path: Path) -> None:
    from vitrain.models import create_model
    from vitrain.trainer import Trainer

    teacher = create_model("resnet18", num_classes=10, img_size=32, source="timm", checkpoint=teacher_run)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = compose(["experiment=digits_distill", f"distill.teacher.checkpoint={teacher_run}"])
    from vitrain.data import build_datasets, cpu_loaders
    from vitrain.trainer import Loaders, TrainerConfig

    splits = build_datasets(to_config(cfg).data, 16)
    loader = cpu_loaders(splits, 64)[0]
    student = create_model("deit_nano_distilled_patch4_16", num_classes=10)
    criterion = build_criterion("soft", teacher=teacher, teacher_inputs=TeacherInputs([0.5] * 3, [0.5] * 3, size=32))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    trainer = Trainer(student, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), criterion,
                      Loaders(loader, loader), TrainerConfig(epochs=1, progress=False), tmp_path)
    trainer.train_one_epoch(0)
    assert trainer.state.step == 23
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():  # batch-norm statistics included
        assert torch.equal(value, before[key]), key


def test_teacher_of_another_class_count_is_refused(teacher_run: Path, tmp_path: Path) -> None:
    cfg = compose(["experiment=digits_distill", f"distill.teacher.checkpoint={teacher_run}", "data.classes=[0,1,2]"])
    with pytest.raises(ConfigError, match="teacher checkpoint .* another number of classes than the student's data"):
        train(cfg, tmp_path)
