"""Attention, rollout, position-embedding and Grad-CAM maps: the math on known inputs, the hooks against the
models' own forward, and the command on checkpoints made by short digits runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from vitrain import maps
from vitrain.config import compose
from vitrain.data.datasets import load_digits
from vitrain.errors import ConfigError, DataError
from vitrain.figures import attention_modules, capture_attentions, grad_cam_of, log_figures, make_figures
from vitrain.models import create_model
from vitrain.train import train
from vitrain.visualize import visualize

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def tiny_vit(name: str = "vit_nano_patch4_16") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=3, img_size=16, depth=2).eval()


def tiny_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("swin_nano_patch2_window4_32", num_classes=3, img_size=32).eval()


def random_attention(B: int, H: int, N: int, seed: int) -> torch.Tensor:
    return torch.randn(B, H, N, N, generator=torch.Generator().manual_seed(seed)).softmax(dim=-1)


# --- the math -------------------------------------------------------------------------------------------------


def test_rollout_of_identity_attention_is_identity() -> None:
    eye = torch.eye(7).expand(2, 3, 7, 7)
    for fusion in maps.HEAD_FUSIONS:
        torch.testing.assert_close(maps.attention_rollout([eye] * 4, fusion), torch.eye(7).expand(2, 7, 7))


def test_rollout_equals_the_product_of_half_attention_plus_half_identity() -> None:
    a1, a2 = random_attention(2, 4, 5, 0), random_attention(2, 4, 5, 1)
    rollout = maps.attention_rollout([a1, a2])
    eye = torch.eye(5)
    # mean fusion keeps rows summing to 1, so A + I renormalised is (A + I) / 2; the last layer multiplies on the left
    expected = ((a2.mean(1) + eye) / 2) @ ((a1.mean(1) + eye) / 2)
    torch.testing.assert_close(rollout, expected, atol=1e-6, rtol=0)
    for fusion in maps.HEAD_FUSIONS:
        for ratio in (0.0, 0.4):
            rows = maps.attention_rollout([a1, a2, a1], fusion, ratio).sum(dim=-1)
            torch.testing.assert_close(rows, torch.ones(2, 5), atol=1e-5, rtol=0)


def test_discard_ratio_zeroes_the_smallest_weights_of_each_row() -> None:
    a = random_attention(1, 2, 5, 2)
    one_layer = maps.attention_rollout([a], "mean", discard_ratio=0.4)[0]  # int(5 * 0.4) = 2 weights per row dropped
    fused = a.mean(1)[0]
    kept = fused.scatter(-1, fused.topk(2, dim=-1, largest=False).indices, 0.0) + torch.eye(5)
    torch.testing.assert_close(one_layer, kept / kept.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    assert ((one_layer == 0).sum(dim=-1) >= 1).all()
    with pytest.raises(ValueError, match="discard_ratio"):
        maps.attention_rollout([a], discard_ratio=1.0)
    with pytest.raises(ValueError, match="head_fusion"):
        maps.attention_rollout([a], "median")


def test_token_map_is_the_row_over_the_patches() -> None:
    a = random_attention(2, 3, 2 + 6, 3)  # CLS, distillation token, then a 2x3 grid
    cls = maps.token_map(a, 0, num_prefix_tokens=2, grid=(2, 3))
    assert cls.shape == (2, 3, 2, 3)
    torch.testing.assert_close(cls.sum(dim=(-2, -1)), 1 - a[:, :, 0, :2].sum(-1), atol=1e-6, rtol=0)
    assert cls[1, 2, 1, 0] == a[1, 2, 0, 2 + 3]  # row-major: patch (1, 0) is patch token 3
    rollout_cls = maps.token_map(maps.attention_rollout([a]), 1, 2, (2, 3))
    assert rollout_cls.shape == (2, 2, 3) and (rollout_cls >= 0).all() and (rollout_cls.sum((-2, -1)) < 1).all()


def test_position_similarity_has_ones_on_the_diagonal_and_is_symmetric() -> None:
    pos_embed = torch.randn(1, 1 + 12, 16, generator=torch.Generator().manual_seed(0))
    sim = maps.position_similarity(pos_embed, num_prefix_tokens=1, grid=(3, 4))
    assert sim.shape == (12, 3, 4)
    flat = sim.reshape(12, 12)
    torch.testing.assert_close(flat.diagonal(), torch.ones(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat, flat.T, atol=1e-6, rtol=0)
    assert flat.abs().max() <= 1 + 1e-6
    pos_embed[0, 0] = 1e6  # the CLS position is left out
    torch.testing.assert_close(maps.position_similarity(pos_embed, 1, (3, 4)), sim)
    one_hot = torch.cat([torch.zeros(2, 9), torch.eye(9)])  # orthogonal positions: each map is a single one
    torch.testing.assert_close(maps.position_similarity(one_hot, 2, 3), torch.eye(9).reshape(9, 3, 3))
    with pytest.raises(ValueError, match="not 4x4"):
        maps.position_similarity(pos_embed, 1, 4)


def test_grad_cam_on_a_known_grid() -> None:
    activations = torch.zeros(1, 2, 2, 2)  # (B, H, W, C)
    activations[0, 0, 0, 0], activations[0, 1, 1, 1], activations[0, 0, 1, 0] = 2.0, 3.0, 1.0
    gradients = torch.zeros(1, 2, 2, 2)
    gradients[..., 0], gradients[..., 1] = 0.5, -1.0  # channel weights (spatial means): 0.5 and -1
    expected = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])  # ReLU(0.5 A0 - A1) = [[1, 0.5], [0, -3 -> 0]], / max
    torch.testing.assert_close(maps.grad_cam(activations, gradients), expected)
    nchw = maps.grad_cam(activations.permute(0, 3, 1, 2), gradients.permute(0, 3, 1, 2), channels_last=False)
    torch.testing.assert_close(nchw, expected)


# --- the hooks and the models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["vitrain", "deit", "timm"])
def test_recomputed_attention_reproduces_the_module_output(source: str) -> None:
    torch.manual_seed(0)
    if source == "timm":
        model = timm.models.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                              num_classes=3).eval()
    else:
        model = tiny_vit("deit_nano_distilled_patch4_16" if source == "deit" else "vit_nano_patch4_16")
    attn = attention_modules(model)[-1]
    seen: dict[str, torch.Tensor] = {}
    attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
        weights = maps.attention_weights(attn, seen["x"])  # (B, heads, N, N)
        B, N, C = seen["x"].shape
        v = attn.qkv(seen["x"]).reshape(B, N, 3, attn.num_heads, C // attn.num_heads)[:, :, 2].transpose(1, 2)
        rebuilt = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(rebuilt, seen["out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, attn.num_heads, N), atol=1e-5, rtol=0)


def test_capturing_attention_leaves_the_forward_unchanged() -> None:
    model, x = tiny_vit(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    logits, attentions = capture_attentions(model, x)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    assert [a.shape for a in attentions] == [(2, 4, 17, 17)] * 2
    assert all(not m._forward_pre_hooks for m in attention_modules(model))


def test_grad_cam_of_swin_and_a_cnn() -> None:
    cam = grad_cam_of(tiny_swin(), torch.randn(2, 3, 32, 32))
    assert cam.shape == (2, 4, 4)  # the last stage's grid: 32 / 2 / 2 / 2
    assert cam.min() >= 0 and cam.amax(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0])
    cnn = timm.create_model("resnet10t", num_classes=3).eval()
    cam = grad_cam_of(cnn, torch.randn(1, 3, 64, 64))
    assert cam.shape == (1, 2, 2) and cam.max() == pytest.approx(1.0)
    assert grad_cam_of(tiny_vit(), torch.randn(1, 3, 16, 16)) is None  # tokens, not a grid


def test_make_figures_draws_what_applies() -> None:
    image = torch.randn(3, 16, 16)
    deit = tiny_vit("deit_nano_distilled_patch4_16").train()
    figures = make_figures(deit, image, MEAN, STD, class_names=["a", "b", "c"])
    assert set(figures) == {"attention", "rollout", "position"} and deit.training  # the mode is restored
    assert len(figures["attention"].axes) == 2 * (1 + 4)  # CLS and distillation rows: input + 4 heads
    assert len(figures["rollout"].axes) == 2 * 2
    assert set(make_figures(tiny_swin(), torch.randn(3, 32, 32), MEAN, STD)) == {"gradcam"}
    with pytest.raises(ConfigError, match="head_fusion=median"):
        make_figures(deit, image, MEAN, STD, head_fusion="median")


def test_log_figures_writes_images_to_tensorboard(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path)) as writer:
        tags = log_figures(writer, tiny_vit(), torch.randn(3, 16, 16), step=7, mean=MEAN, std=STD)
    assert tags == ["visualize/attention", "visualize/rollout", "visualize/position"]
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(tags)
    for tag in tags:
        (image,) = events.Images(tag)
        assert image.step == 7 and image.width > 100 and image.height > 100


# --- the command on trained checkpoints ------------------------------------------------------------------------

SHORT_RUN = ["trainer.epochs=1", "data.train_fraction=0.1", "data.batch_size=64", "trainer.progress=false"]


@pytest.fixture(scope="module")
def digit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "seven.png"
    _, test, _ = load_digits()
    Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).save(path)  # the first test digit is a 7
    return path


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vit_run")
    train(compose([*SHORT_RUN, "trainer.log_images=true"]), out)
    return out


def test_log_images_puts_the_figures_in_the_runs_tensorboard_at_the_last_step(vit_run: Path) -> None:
    """trainer.log_images=true: attention, rollout and position figures of the first validation image."""
    events = EventAccumulator(str(vit_run / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = ["visualize/attention", "visualize/rollout", "visualize/position"]
    assert sorted(t for t in events.Tags()["images"] if t.startswith("visualize/")) == sorted(tags)
    last_step = max(event.step for event in events.Scalars("val/top1"))
    for tag in tags:
        (image,) = events.Images(tag)
        assert image.step >= last_step and image.width > 100


def test_cli_writes_the_vit_figures_beside_the_run(vit_run: Path, digit: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vitrain.visualize", f"checkpoint={vit_run / 'checkpoints/best.pt'}",
                           f"image={digit}", f"hydra.run.dir={tmp_path}/hydra"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("attention", "rollout", "position"):
        path = vit_run / "visualize" / f"seven_{name}.png"
        assert str(path) in done.stdout
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width > 100 and picture.height > 100
    assert not (vit_run / "visualize" / "seven_gradcam.png").exists()
    assert f"(3 figures for {digit}; not applicable to this model: gradcam)" in done.stdout


def test_cli_errors_are_one_line(vit_run: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vitrain.visualize", f"checkpoint={vit_run / 'checkpoints/best.pt'}",
                           f"image={tmp_path / 'missing.png'}", f"hydra.run.dir={tmp_path}/hydra"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: no image at image={tmp_path / 'missing.png'}; give the path of an image file"
    checkpoint = vit_run / "checkpoints" / "best.pt"
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match="cannot read image .*notes.png"):
        visualize(checkpoint, tmp_path / "notes.png", tmp_path)
    with pytest.raises(DataError, match="is a folder; give one image file"):
        visualize(checkpoint, tmp_path, tmp_path)
    with pytest.raises(ConfigError, match=r"discard_ratio=1.5 must be in \[0, 1\)"):
        visualize(checkpoint, tmp_path / "notes.png", tmp_path, discard_ratio=1.5)


def test_swin_checkpoint_gets_grad_cam(tmp_path_factory: pytest.TempPathFactory, digit: Path) -> None:
    run = tmp_path_factory.mktemp("swin_run")
    train(compose([*SHORT_RUN, "model=swin_nano"]), run)
    written = visualize(run / "checkpoints" / "last.pt", digit, run / "figures")
    assert written == {"gradcam": run / "figures" / "seven_gradcam.png"}
    with Image.open(written["gradcam"]) as picture:
        assert picture.width > 100 and picture.height > 100
