"""The config groups' schemas that live apart from their code: importable without torch, torchvision and timm,
so that the command line is checked (a typo, a value out of range, a wrong type) before those are imported. The
``model`` and ``data`` groups' schemas are ``vitrain/models/config.py`` and ``vitrain/data/config.py``, torch-free
as well; :mod:`vitrain.config` gathers them all. Checks that need torch or timm (a model's name, an optimizer's
arguments, a device) run after these (``TrainConfig.__post_init__``).
"""

from vitrain.errors import ConfigError

FORMATS = ("onnx", "torch.export", "timm", "safetensors")  # python -m vitrain.export format=...
WEIGHTS = ("auto", "ema", "raw")  # export's weights=...; auto: the EMA weights when the checkpoint has them
HEAD_FUSIONS = ("mean", "max", "min")  # visualize's head_fusion: how rollout merges a layer's heads


def check_rollout(head_fusion: str, discard_ratio: float) -> None:
    """A one-line ConfigError for a head fusion or discard ratio that rollout does not take."""
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head_fusion={head_fusion} is not one of {', '.join(HEAD_FUSIONS)}")
    if not 0 <= discard_ratio < 1:
        raise ConfigError(f"discard_ratio={discard_ratio} must be in [0, 1); 0 keeps every attention weight")
