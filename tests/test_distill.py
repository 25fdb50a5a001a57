"""Distillation: loss values against hand-computed numbers, a frozen teacher, the teacher's inputs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import vitrain
from vitrain.build import build_loss, build_model, checkpoint_metadata, resolve_preprocess
from vitrain.checkpoint import load_checkpoint, save_checkpoint
from vitrain.config import TrainConfig, compose, to_config
from vitrain.data.config import IMAGENET_MEAN, IMAGENET_STD
from vitrain.distill import (
    DistillationLoss,
    TeacherConfig,
    TeacherInputs,
    build_criterion,
    hard_distillation_loss,
    resolve_teacher,
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


# --- the teacher sees what it was trained on: its own normalization and size ---------------------------------------

TEACHER_MEAN, TEACHER_STD = [0.3, 0.4, 0.6], [0.2, 0.3, 0.25]  # a vitrain teacher trained with its own values


def normalize(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def randomize(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Noise on every parameter, so that the logits are O(1) and depend on the input's normalization."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def student_run(overrides: list[str]) -> TrainConfig:
    """The digits_distill student (DeiT-Nano at 16, data mean/std 0.5) with its teacher's inputs resolved, as
    build_trainer resolves them before any data is read."""
    cfg, _ = resolve_preprocess(to_config(compose(["experiment=digits_distill", "distill=soft",
                                                   "distill.teacher.img_size=null", *overrides])))
    teacher, _ = resolve_teacher(cfg.distill.teacher, cfg.data.mean, cfg.data.std, cfg.model.img_size)
    cfg.distill = dataclasses.replace(cfg.distill, teacher=teacher)  # a no-op where resolve_preprocess did it
    return cfg


def what_the_teacher_sees(criterion: DistillationLoss, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's input and logits inside the loss, for a student batch."""
    seen: dict[str, torch.Tensor] = {}
    hook = criterion.teacher.register_forward_hook(lambda m, args, out: seen.update(x=args[0], z=out))
    criterion(batch, torch.zeros(batch.shape[0], 10), torch.zeros(batch.shape[0], dtype=torch.long))
    hook.remove()
    return seen["x"], seen["z"]


def assert_teacher_gets_its_own_inputs(cfg: TrainConfig, t_mean: list[float], t_std: list[float],
                                       t_size: int) -> None:
    """Pixels in [0, 1] normalized for the student: inside the loss, the teacher's logits are its logits on the
    same pixels normalized with its own mean/std (resized to its own size), and not those of the student's batch."""
    torch.manual_seed(0)
    criterion = build_loss(cfg, 10, torch.device("cpu"))
    size = cfg.model.img_size
    pixels = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8).float() / 255
    x, z = what_the_teacher_sees(criterion, normalize(pixels, cfg.data.mean, cfg.data.std))
    own = normalize(pixels, t_mean, t_std)
    if t_size != size:
        own = torch.nn.functional.interpolate(own, size=(t_size, t_size), mode="bicubic", align_corners=False)
    assert x.shape == (4, 3, t_size, t_size)
    with torch.no_grad():
        expected = criterion.teacher(own)
        wrong = criterion.teacher(normalize(pixels, cfg.data.mean, cfg.data.std)) if t_size == size else expected
    assert (x - own).abs().max() <= 1e-5
    assert (z - expected).abs().max() <= 1e-5
    assert t_size != size or (wrong - expected).abs().max() > 0.1  # the normalization matters to this teacher


def vitrain_teacher(folder: Path, img_size: int) -> Path:
    """A best.pt as a vitrain run writes it (model spec, preprocess with its own mean/std, config), random weights:
    a ViT-Nano teacher for the 10 digits, trained at ``img_size``."""
    cfg = to_config(compose(["model=vit_nano", f"model.img_size={img_size}", f"data.mean={TEACHER_MEAN}",
                             f"data.std={TEACHER_STD}"]))
    torch.manual_seed(0)
    model = randomize(build_model(cfg.model, 10))
    state = {**checkpoint_metadata(cfg, [str(i) for i in range(10)], 64, 1), "model": model.state_dict(),
             "vitrain_version": vitrain.__version__}
    return save_checkpoint(state, folder / "checkpoints" / "best.pt")


def test_the_teacher_takes_its_pretrained_weights_values_and_a_set_value_wins() -> None:
    """deit_small_patch16_224.fb_in1k (ImageNet mean/std, 224) under a student normalized with 0.5: timm's
    pretrained_cfg gives the teacher's values (read without weights, offline)."""
    cfg = TeacherConfig(source="timm", name="deit_small_patch16_224.fb_in1k", pretrained=True)
    resolved, said = resolve_teacher(cfg, [0.5] * 3, [0.5] * 3, 16)
    assert (resolved.mean, resolved.std, resolved.img_size) == (IMAGENET_MEAN, IMAGENET_STD, 224)
    assert said == (f"distillation teacher deit_small_patch16_224.fb_in1k: distill.teacher.img_size=224 (the "
                    f"teacher's weights'), distill.teacher.mean={IMAGENET_MEAN} (the teacher's weights'), "
                    f"distill.teacher.std={IMAGENET_STD} (the teacher's weights')")
    assert resolve_teacher(resolved, [0.5] * 3, [0.5] * 3, 16)[0] == resolved  # resolving again changes nothing
    explicit, said = resolve_teacher(dataclasses.replace(cfg, mean=[0.5] * 3, img_size=32), [0.5] * 3, [0.5] * 3, 16)
    assert (explicit.mean, explicit.std, explicit.img_size) == ([0.5] * 3, IMAGENET_STD, 32)
    assert "distill.teacher.mean=[0.5, 0.5, 0.5] (set)" in said and "img_size=32 (set)" in said


def test_the_teacher_gets_its_own_normalization_inside_the_loss(tmp_path: Path) -> None:
    """The key check: a timm ResNet-18 teacher whose weights (a hub folder, local-dir:) record ImageNet's mean/std
    at 16x16, under the 0.5-normalized student at 16: inside the loss it sees the pixels as ImageNet-normalized."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder = tmp_path / "resnet18"
    folder.mkdir()
    save_file(randomize(timm.create_model("resnet18", num_classes=10), 0.05).state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 10, "pretrained_cfg": {
        "input_size": [3, 16, 16], "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic",
        "crop_pct": 0.9}}))
    cfg = student_run([f"distill.teacher.checkpoint=local-dir:{folder}"])
    assert (cfg.data.mean, cfg.distill.teacher.mean, cfg.distill.teacher.img_size) == ([0.5] * 3, IMAGENET_MEAN, 16)
    assert_teacher_gets_its_own_inputs(cfg, IMAGENET_MEAN, IMAGENET_STD, 16)


def test_a_vitrain_teacher_checkpoint_brings_its_normalization(tmp_path: Path) -> None:
    """A vitrain run's best.pt whose preprocess has its own mean/std: the student (0.5, at the teacher's 32)
    feeds the teacher the pixels normalized with the teacher's values."""
    checkpoint = vitrain_teacher(tmp_path, 32)
    cfg = student_run(["distill.teacher.source=vitrain", "distill.teacher.name=vit_nano_patch4_16",
                       f"distill.teacher.checkpoint={checkpoint}", "model.img_size=32"])
    assert (cfg.distill.teacher.mean, cfg.distill.teacher.std) == (TEACHER_MEAN, TEACHER_STD)
    assert_teacher_gets_its_own_inputs(cfg, TEACHER_MEAN, TEACHER_STD, 32)


def test_a_teacher_trained_at_another_size_is_built_and_fed_at_its_own(tmp_path: Path) -> None:
    """Teacher weights trained at 32, student at 16: the teacher is built at 32 (its position table has 8x8 patches)
    and gets 32x32 inputs, resized on the device after its own normalization."""
    checkpoint = vitrain_teacher(tmp_path, 32)
    cfg = student_run(["distill.teacher.source=vitrain", "distill.teacher.name=vit_nano_patch4_16",
                       f"distill.teacher.checkpoint={checkpoint}"])
    assert (cfg.model.img_size, cfg.distill.teacher.img_size) == (16, 32)
    criterion = build_loss(cfg, 10, torch.device("cpu"))
    assert criterion.teacher.pos_embed.shape[1] == 1 + 8 * 8
    assert_teacher_gets_its_own_inputs(cfg, TEACHER_MEAN, TEACHER_STD, 32)


@pytest.mark.parametrize("weights", ["plain", "random"])
def test_a_teacher_without_recorded_normalization_is_said_in_one_line(weights: str, tmp_path: Path) -> None:
    """A plain state dict (or random weights) records no normalization: the student's is used, and the one line
    says so and names distill.teacher.mean/std."""
    from vitrain.models import create_model

    checkpoint = None
    if weights == "plain":
        checkpoint = str(tmp_path / "plain.pth")
        torch.save(create_model("vit_nano_patch4_16", num_classes=10).state_dict(), checkpoint)
    cfg = TeacherConfig(source="vitrain", name="vit_nano_patch4_16", checkpoint=checkpoint)
    resolved, said = resolve_teacher(cfg, [0.5] * 3, [0.5] * 3, 16)
    assert (resolved.mean, resolved.std, resolved.img_size) == ([0.5] * 3, [0.5] * 3, 16)
    assert "\n" not in said and "distill.teacher.mean=[0.5, 0.5, 0.5] (the student's data.mean)" in said
    origin = f"its checkpoint {checkpoint}" if checkpoint else "its random weights"
    assert said.endswith(f"; {origin} record no normalization, so the teacher gets the student's: set "
                         f"distill.teacher.mean=[...] distill.teacher.std=[...] to the values it was trained with")
    _, said = resolve_teacher(dataclasses.replace(cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD), [0.5] * 3, [0.5] * 3, 16)
    assert "record no normalization" not in said  # set by the user: nothing to say


def test_bad_teacher_values_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"distill.teacher.std must be positive in every channel, got \[0.5, 0.0"):
        to_config(compose(["distill.teacher.std=[0.5,0.0,0.5]"]))
    with pytest.raises(ConfigError, match="distill.teacher.img_size must be positive"):
        to_config(compose(["distill.teacher.img_size=0"]))


def test_the_checkpoint_config_records_the_teachers_resolved_inputs(tmp_path: Path) -> None:
    checkpoint = vitrain_teacher(tmp_path, 32)
    cfg = to_config(compose(["experiment=digits_distill", "distill.teacher.source=vitrain",
                             "distill.teacher.name=vit_nano_patch4_16", f"distill.teacher.checkpoint={checkpoint}",
                             "distill.teacher.img_size=null"]))
    teacher = checkpoint_metadata(cfg, [str(i) for i in range(10)], 64, 1)["config"]["distill"]["teacher"]
    assert (teacher["mean"], teacher["std"], teacher["img_size"]) == (TEACHER_MEAN, TEACHER_STD, 32)
