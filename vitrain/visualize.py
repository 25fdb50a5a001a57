"""``python -m vitrain.visualize checkpoint=PATH image=PATH``: where a trained model looks.

For one image, preprocessed with the checkpoint's evaluation transform, it writes one PNG per map that
applies to the model: ``attention`` (last layer, per head), ``rollout``, ``position`` (position-embedding
similarity) and ``gradcam`` (Swin, CNNs). The figures are drawn by :mod:`vitrain.figures`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from vitrain.cli import check_override_keys, entry_point, run_command
from vitrain.config import CONFIG_DIR, VisualizeConfig, to_config
from vitrain.errors import ConfigError, DataError
from vitrain.schema import check_rollout

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def load_image(path: str | Path, transform: torch.nn.Module) -> torch.Tensor:
    """One image file through ``transform``, or a one-line DataError that says what to give instead."""
    from vitrain.data.datasets import open_rgb

    path = Path(path)
    if path.is_dir():
        raise DataError(f"image={path} is a folder; give one image file (python -m vitrain.predict takes folders)")
    if not path.is_file():
        raise DataError(f"no image at image={path}; give the path of an image file")
    return transform(open_rgb(path, fix="give a PNG, JPEG or other image file"))


def visualize(checkpoint: str | Path, image: str | Path, out_dir: str | Path | None = None, device: str = "auto",
              use_ema: bool = False, head_fusion: str = "mean", discard_ratio: float = 0.0,
              dpi: int = 150) -> dict[str, Path]:
    """Write ``<out_dir>/<image stem>_<map>.png`` for every map that applies; returns {map: path}.

    ``out_dir`` defaults to ``<run>/visualize`` for a checkpoint in ``<run>/checkpoints/``."""
    from vitrain.figures import make_figures  # torch and matplotlib: once the values have passed
    from vitrain.inference import load_trained, run_folder

    check_rollout(head_fusion, discard_ratio)  # before the checkpoint is read
    checkpoint, image = Path(checkpoint), Path(image)
    trained = load_trained(checkpoint, device)
    if use_ema and trained.ema is None:
        log.info("%s has no EMA weights; showing the raw weights", checkpoint)
    pre = trained.preprocess
    x = load_image(image, trained.transform)
    figures = make_figures(trained.pick(use_ema), x, pre["mean"], pre["std"], trained.class_names, head_fusion,
                           discard_ratio)
    if not figures:
        raise ConfigError(f"no map applies to {trained.spec['name']}: visualize needs attention blocks (ViT, DeiT), "
                          f"a pos_embed or a feature grid from forward_features (Swin, CNNs)")
    out = Path(out_dir) if out_dir else run_folder(checkpoint) / "visualize"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, figure in figures.items():
        written[name] = out / f"{image.stem}_{name}.png"
        figure.savefig(written[name], dpi=dpi)
    return written


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="visualize")
def hydra_main(cfg: DictConfig) -> None:
    """Print what was written, one line per figure."""

    def run() -> None:
        c = to_config(cfg, VisualizeConfig)
        written = visualize(c.checkpoint, c.image, c.out_dir, c.device, c.ema, c.head_fusion, c.discard_ratio, c.dpi)
        from vitrain.figures import DESCRIPTIONS

        for name, path in written.items():
            print(f"{path}  ({DESCRIPTIONS[name]})")
        skipped = [name for name in DESCRIPTIONS if name not in written]
        print(f"({len(written)} figure{'s' if len(written) > 1 else ''} for {c.image}"
              + (f"; not applicable to this model: {', '.join(skipped)})" if skipped else ")"))

    run_command(run)


@entry_point
def main() -> None:
    """``python -m vitrain.visualize``: a misspelt key is one line naming the nearest keys; then the Hydra app."""
    check_override_keys(sys.argv[1:], VisualizeConfig, CONFIG_DIR, groups=())
    hydra_main()


if __name__ == "__main__":
    main()
