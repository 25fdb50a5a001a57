"""``python -m vitrain.export checkpoint=PATH format=onnx|torch.export|timm|safetensors``: a trained model for
serving and for other libraries.

``onnx``: an ONNX file with a dynamic batch axis, the preprocessing and class names in its metadata (``vitrain.predict``
runs it through onnxruntime); ``torch.export``: a ``.pt2`` program; ``timm``: a folder that
``timm.create_model("local-dir:FOLDER", pretrained=True)`` opens; ``safetensors``: the weights alone. The EMA
weights when the checkpoint has them (``weights=ema|raw`` chooses), LoRA adapters merged; every format that runs
is checked against PyTorch after writing (:mod:`vitrain.exporting`).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from vitrain.cli import check_override_keys, entry_point, run_command
from vitrain.config import CONFIG_DIR, ExportConfig, to_config


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def hydra_main(cfg: DictConfig) -> str:
    """Print where the export went, which weights it holds, and how close it came to PyTorch's logits."""

    def run() -> str:
        c = to_config(cfg, ExportConfig)
        from vitrain.exporting import export_checkpoint  # torch: once the values have passed their checks

        result = export_checkpoint(c.checkpoint, c.format, c.output, c.weights, c.opset, c.atol)
        check = "" if result.max_diff is None else f"; logits within {result.max_diff:.1e} of PyTorch's"
        print(f"wrote {result.path} ({result.format}, {result.weights} weights{check})")
        return str(result.path)

    return run_command(run)


@entry_point
def main() -> None:
    """``python -m vitrain.export``: a misspelt key is refused in one line with the nearest keys, then the Hydra app."""
    check_override_keys(sys.argv[1:], ExportConfig, CONFIG_DIR, groups=())
    hydra_main()


if __name__ == "__main__":
    main()
