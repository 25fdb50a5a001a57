"""Figures of what a model learned, drawn with matplotlib's Agg canvas (no pyplot, no display): attention per
head, attention rollout, position-embedding similarity, Grad-CAM, the confusion matrix; as PNG files or
TensorBoard images. The math is in :mod:`vitrain.maps`.

- ``attention``: the last layer's attention from the CLS token (and DeiT's distillation token) to each
  patch, one panel per head (ViT, DeiT, timm ViTs: ``blocks[i].attn`` with ``qkv`` and ``num_heads``);
- ``rollout``: attention rollout through all layers (Abnar & Zuidema, 2020), from the same tokens;
- ``position``: the cosine similarity of the position embeddings (``pos_embed``), as in the ViT paper;
- ``gradcam``: Grad-CAM of the predicted class on the last stage's feature grid (Swin, CNNs).

The attention weights are recomputed from each attention module's input by a forward pre-hook, so the
models keep their fused kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from vitrain import maps
from vitrain.schema import check_rollout

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "attention": "last layer's attention from the class token to the patches, per head",
    "rollout": "attention rollout through all layers, from the class token",
    "position": "cosine similarity of the position embeddings",
    "gradcam": "Grad-CAM of the predicted class on the last stage",
}
PANEL = 1.7  # inches per panel
OVERLAY = dict(cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="nearest")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every block (``blocks[i].attn`` with ``qkv`` and ``num_heads``), or []."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        return []
    modules = [getattr(block, "attn", None) for block in blocks]
    return modules if all(hasattr(m, "qkv") and hasattr(m, "num_heads") for m in modules) else []


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The (rows, columns) of the model's patch grid (``patch_embed.grid_size``), or None."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


@torch.no_grad()
def capture_attentions(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits of ``images`` (B, C, H, W) and every block's attention weights, each (B, heads, N, N)."""
    attentions: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        attentions.append(maps.attention_weights(module, args[0]))

    handles = [m.register_forward_pre_hook(record) for m in attention_modules(model)]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, attentions


def grad_cam_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
    """Grad-CAM (B, h, w) of each image's predicted class on ``forward_features`` (the last stage's output,
    after the final norm: the grid the head pools), or None when that is not a feature grid."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return None
    with torch.enable_grad():
        images = images.detach().clone().requires_grad_(True)  # gradients flow even through frozen weights
        features = model.forward_features(images)
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            return None
        logits = model.forward_head(features)
        chosen = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
        (gradients,) = torch.autograd.grad(chosen, features)
    channels = getattr(model, "num_features", features.shape[1])
    channels_last = features.shape[1] != channels  # Swin: (B, H, W, C); CNNs: (B, C, H, W)
    return maps.grad_cam(features.detach(), gradients, channels_last)


def _display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalized (C, H, W) image back to (H, W, 3) in [0, 1]."""
    image = image.detach().float().cpu()
    pixels = image * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    pixels = pixels.clamp(0, 1).permute(1, 2, 0)
    return (pixels.expand(-1, -1, 3) if pixels.shape[-1] == 1 else pixels).numpy()


def _figure(rows: int, cols: int, title: str) -> tuple[Figure, np.ndarray]:
    width = max(PANEL * cols, 0.075 * len(title))  # wide enough for the title (9 pt: about 0.07 inch a character)
    figure = Figure(figsize=(width, PANEL * rows + 0.45), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.asarray(figure.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    figure.suptitle(title, fontsize=9)
    return figure, axes


def overlay_figure(picture: np.ndarray, heatmaps: torch.Tensor, labels: list[list[str]], title: str,
                   show_range: bool = True) -> Figure:
    """One row per token: the image, then each heatmap (rows, cols, h, w) stretched to [0, 1] and upsampled
    over it; with ``show_range`` each panel's title gives the range of the map before stretching."""
    rows, cols = heatmaps.shape[:2]
    if show_range:
        low, high = heatmaps.amin(dim=(-2, -1)), heatmaps.amax(dim=(-2, -1))
        labels = [[f"{labels[r][c]}\n{low[r, c]:.3f} to {high[r, c]:.3f}" for c in range(cols)] for r in range(rows)]
    heat = maps.upsample(maps.min_max(heatmaps), picture.shape[:2]).cpu().numpy()
    figure, axes = _figure(rows, cols + 1, title)
    for r in range(rows):
        axes[r, 0].imshow(picture, interpolation="nearest")
        axes[r, 0].set_title("input", fontsize=8)
        for c in range(cols):
            axes[r, c + 1].imshow(picture, interpolation="nearest")
            axes[r, c + 1].imshow(heat[r, c], **OVERLAY)
            axes[r, c + 1].set_title(labels[r][c], fontsize=8)
    return figure


def position_figure(similarity: torch.Tensor, grid: tuple[int, int], title: str) -> Figure:
    """ViT Figure 7: a grid of grid-sized cosine-similarity maps, one per patch, and the centre patch's map."""
    gh, gw = grid
    tiles = similarity.reshape(gh, gw, gh, gw).cpu().numpy()
    mosaic = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)  # one blank line between the maps
    for r in range(gh):
        for c in range(gw):
            mosaic[r * (gh + 1):r * (gh + 1) + gh, c * (gw + 1):c * (gw + 1) + gw] = tiles[r, c]
    figure = Figure(figsize=(2 * PANEL + 3.2, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    grid_ax, centre_ax = figure.subplots(1, 2, width_ratios=[1.6, 1])
    shown = grid_ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    grid_ax.set_xticks([c * (gw + 1) + (gw - 1) / 2 for c in range(gw)], [str(c + 1) for c in range(gw)], fontsize=6)
    grid_ax.set_yticks([r * (gh + 1) + (gh - 1) / 2 for r in range(gh)], [str(r + 1) for r in range(gh)], fontsize=6)
    grid_ax.set_xlabel("input patch column", fontsize=8)
    grid_ax.set_ylabel("input patch row", fontsize=8)
    cy, cx = gh // 2, gw // 2
    centre_ax.imshow(tiles[cy, cx], cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    centre_ax.plot([cx], [cy], marker="s", markersize=6, markerfacecolor="none", markeredgecolor="red")
    centre_ax.set_title(f"patch ({cy + 1}, {cx + 1}) vs all", fontsize=8)
    centre_ax.set_axis_off()
    figure.colorbar(shown, ax=[grid_ax, centre_ax], shrink=0.7, label="cosine similarity")
    figure.suptitle(title, fontsize=9)
    return figure


def _attention_figures(model: nn.Module, attentions: list[torch.Tensor], picture: np.ndarray, caption: str,
                       head_fusion: str, discard_ratio: float) -> dict[str, Figure]:
    """The per-head last-layer and the rollout figures, from the class token (and the distillation token)."""
    grid = patch_grid(model)
    num_tokens = attentions[-1].shape[-1]
    if grid is None or num_tokens - grid[0] * grid[1] < 1:
        log.info("attention maps skipped: no class token before the %s patch tokens", num_tokens)
        return {}
    prefix = num_tokens - grid[0] * grid[1]
    tokens = {"CLS": 0} | ({"dist": 1} if getattr(model, "dist_token", None) is not None and prefix > 1 else {})
    last = attentions[-1][0]  # (heads, N, N) of the first image
    per_head = torch.stack([maps.token_map(last, i, prefix, grid) for i in tokens.values()])  # (T, heads, gh, gw)
    labels = [[f"{name}, head {h + 1}" for h in range(per_head.shape[1])] for name in tokens]
    rollout = maps.attention_rollout(attentions, head_fusion, discard_ratio)[0]  # (N, N)
    rolled = torch.stack([maps.token_map(rollout, i, prefix, grid) for i in tokens.values()])[:, None]
    depth = len(attentions)
    return {
        "attention": overlay_figure(picture, per_head, labels, f"last layer ({depth}) attention; {caption}"),
        "rollout": overlay_figure(picture, rolled, [[f"{name} rollout"] for name in tokens],
                                  f"rollout of {depth} layers ({head_fusion} of heads); {caption}"),
    }


def make_figures(model: nn.Module, image: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 class_names: Sequence[str] | None = None, head_fusion: str = "mean",
                 discard_ratio: float = 0.0) -> dict[str, Figure]:
    """Every figure that applies to ``model`` for ``image`` (C, H, W, normalized with ``mean``/``std``),
    keyed ``attention``, ``rollout``, ``position``, ``gradcam``; what does not apply is logged and skipped."""
    check_rollout(head_fusion, discard_ratio)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    was_training = model.training
    model.eval()
    try:
        x = image[None].to(next(model.parameters()).device)
        logits, attentions = capture_attentions(model, x)
        probs = logits.float().softmax(dim=1)[0]
        label = int(probs.argmax())
        name = class_names[label] if class_names else str(label)
        caption = f"predicted {name} ({probs[label]:.2f})"
        picture = _display(image, mean, std)
        figures = {}
        if attentions:
            figures |= _attention_figures(model, attentions, picture, caption, head_fusion, discard_ratio)
        else:
            log.info("attention maps skipped: %s has no blocks[i].attn with qkv and num_heads (ViT, DeiT)",
                     type(model).__name__)
        figures |= _position_figures(model)
        cam = grad_cam_of(model, x)
        if cam is not None:
            figures["gradcam"] = overlay_figure(picture, cam[:1, None], [["Grad-CAM"]], caption, show_range=False)
        else:
            log.info("Grad-CAM skipped: %s's forward_features gives no (B, H, W, C) or (B, C, H, W) grid",
                     type(model).__name__)
    finally:
        model.train(was_training)
    return figures


def _position_figures(model: nn.Module) -> dict[str, Figure]:
    pos_embed, grid = getattr(model, "pos_embed", None), patch_grid(model)
    if not isinstance(pos_embed, torch.Tensor) or grid is None:
        log.info("position-embedding map skipped: %s has no pos_embed over a patch grid", type(model).__name__)
        return {}
    prefix = pos_embed.shape[-2] - grid[0] * grid[1]
    if prefix < 0:
        log.info("position-embedding map skipped: pos_embed has fewer positions than the %dx%d grid", *grid)
        return {}
    similarity = maps.position_similarity(pos_embed, prefix, grid)
    return {"position": position_figure(similarity, grid, f"position embedding similarity ({grid[0]}x{grid[1]})")}


def figure_to_array(figure: Figure, dpi: int = 100) -> np.ndarray:
    """The figure rendered by Agg as an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figures(writer: Any, model: nn.Module, image: torch.Tensor, step: int, mean: Sequence[float],
                std: Sequence[float], class_names: Sequence[str] | None = None, head_fusion: str = "mean",
                discard_ratio: float = 0.0, prefix: str = "visualize") -> list[str]:
    """Add the figures of :func:`make_figures` for ``image`` (C, H, W, normalized) to a TensorBoard
    ``SummaryWriter`` as images ``<prefix>/<name>`` at ``step``; returns the tags written."""
    tags = []
    for name, figure in make_figures(model, image, mean, std, class_names, head_fusion, discard_ratio).items():
        tags.append(f"{prefix}/{name}")
        writer.add_image(tags[-1], figure_to_array(figure), step, dataformats="HWC")
    return tags


def log_end_of_training(log_dir: str | Path, model: nn.Module, val_set: Any, step: int, mean: Sequence[float],
                        std: Sequence[float], class_names: Sequence[str] | None = None) -> list[str]:
    """``trainer.log_images=true``: the figures of the first validation image, logged to the run's TensorBoard
    at the last step (one explicit-attention forward pass, after training)."""
    from torch.utils.tensorboard import SummaryWriter

    image, _ = val_set[0]
    with SummaryWriter(str(log_dir)) as writer:
        return log_figures(writer, model, image, step, mean, std, class_names)


def confusion_figure(confusion: list[list[int]], class_names: list[str], title: str) -> Figure:
    """The row-normalised confusion matrix as a heatmap (white 0 to dark blue 1), rows the true class and
    columns the predicted one, with the counts written in (up to 20 classes) and the class names as ticks
    (up to 40). The figure is widened to the title's length, so that the title fits inside it."""
    m = np.asarray(confusion, dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(m)
    side = min(12.0, 2.0 + 0.35 * n)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    shown = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=ax, shrink=0.8, label="share of the true class")
    ax.set(xlabel="predicted class", ylabel="true class")
    heading = figure.suptitle(title)  # centred on the figure (an axes title is centred on the matrix, off-centre)
    title_width = heading.get_window_extent(figure.canvas.get_renderer()).width / figure.dpi  # inches
    figure.set_figwidth(max(side + 1.0, title_width + 0.3))
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90 if max(map(len, class_names)) > 2 else 0)
        ax.set_yticks(range(n), class_names)
    if n <= 20:
        for i, j in zip(*np.nonzero(m), strict=True):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    return figure


def write_confusion(result: dict[str, Any], title: str, png: Path, tb: Path, name: str) -> None:
    """The confusion matrix of ``result`` as a PNG, and with the top-1 into the run's TensorBoard (``tb``)."""
    from torch.utils.tensorboard import SummaryWriter

    figure = confusion_figure(result["model"]["confusion"], result["class_names"],
                              f"{title}: top-1 {result['model']['top1']:.2f}%")
    figure.savefig(png, dpi=120)
    with SummaryWriter(str(tb)) as writer:
        writer.add_image(f"eval/{name}_confusion", figure_to_array(figure), dataformats="HWC")
        writer.add_scalar(f"eval/{name}_top1", result["model"]["top1"])
