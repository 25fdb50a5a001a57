"""Loading foreign weights: timm, DeiT and Swin release files, torchvision, vitrain checkpoints.

Every step is a pure function on state dicts. :func:`detect_layout` tells the layouts apart,
:func:`convert_state_dict` renames the keys to timm's names (one table per layout) and fits the
tensors to the target model: position embeddings and Swin's relative position tables are
resampled when the resolution or window changes, and a classifier trained for another number of
classes is dropped so the model keeps its fresh head. :func:`load_pretrained` reads a file and
does all of it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed, resize_rel_pos_bias_table_simple, to_2tuple
from torch import nn

from vitrain.checkpoint import load_checkpoint
from vitrain.errors import ConfigError, VitrainError, first_line, first_sentence
from vitrain.models.heads import classifier_names, in_module
from vitrain.models.weights import ensure_timm_weights
from vitrain.paths import hub_folder_weights, local_path

log = logging.getLogger(__name__)

LAYOUTS = ("vitrain", "deit_release", "swin_release", "torchvision_vit", "torchvision_swin", "timm")

# (pattern, replacement) applied in order with re.sub to every key.
Rule = tuple[str, str | Callable[[re.Match], str]]

TORCHVISION_VIT: list[Rule] = [
    (r"^class_token$", "cls_token"),
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."),
    (r"\.ln_1\.", ".norm1."),
    (r"\.ln_2\.", ".norm2."),
    # nn.MultiheadAttention stacks [q; k; v] along the output dim, each head-major: timm's qkv layout
    (r"\.self_attention\.in_proj_(weight|bias)$", r".attn.qkv.\1"),
    (r"\.self_attention\.out_proj\.", ".attn.proj."),
    (r"\.mlp\.(0|linear_1)\.", ".mlp.fc1."),  # linear_1/linear_2: torchvision before 0.13
    (r"\.mlp\.(3|linear_2)\.", ".mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
]

TORCHVISION_SWIN: list[Rule] = [
    (r"^features\.0\.0\.", "patch_embed.proj."),  # features.0 = (Conv2d, Permute, LayerNorm)
    (r"^features\.0\.2\.", "patch_embed.norm."),
    # odd features.i are the stages (i // 2), even ones the patch merging that opens stage i // 2
    (r"^features\.(\d+)\.", lambda m: f"layers.{int(m[1]) // 2}.{'blocks.' if int(m[1]) % 2 else 'downsample.'}"),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
    (r"^head\.", "head.fc."),
]

# timm.models.swin_transformer.checkpoint_filter_fn renames the same two things (same keys out for our
# models when no tensor needs resampling; tests/test_convert.py checks it), but it is not used: it renames
# and resamples in one pass, the relative position bias tables by resize_rel_pos_bias_table (BEiT's
# geometric-progression interpolation; tables of non-square windows always), not by the bicubic
# resize_rel_pos_bias_table_simple that the other layouts get here, and it needs the target model's
# modules by the file's key names (an AttributeError, not a ConfigError, for another architecture).
SWIN_RELEASE: list[Rule] = [
    # the original code merges patches at the end of stages 0..2, timm at the start of stages 1..3
    (r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m[1]) + 1}.downsample."),
    (r"^head\.", "head.fc."),
]

# DeiT III's release (facebookresearch/deit, models_v2.py Layer_scale_init_Block) keeps LayerScale as bare
# gamma_1/gamma_2 parameters; timm's deit checkpoint_filter_fn (adapt_layer_scale=True) renames them the same way.
DEIT_RELEASE: list[Rule] = [
    (r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma"),
]

RULES: dict[str, list[Rule]] = {
    "torchvision_vit": TORCHVISION_VIT, "torchvision_swin": TORCHVISION_SWIN, "swin_release": SWIN_RELEASE,
    "deit_release": DEIT_RELEASE,
}

# Buffers that the model computes itself (Swin); old files persisted them.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: model keys the file lacked, file keys the model lacks, and
    keys left at their fresh init because their shape differs (a classifier for other classes)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)


def unwrap_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: inside ``model`` (DeiT/Swin releases, vitrain), ``state_dict`` or
    ``state_dict_ema`` (timm's train script) if present, with DistributedDataParallel's ``module.`` removed."""
    for key in ("model", "state_dict", "state_dict_ema"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    weights = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    return weights


def detect_layout(state: Mapping[str, Any]) -> str:
    """Which of :data:`LAYOUTS` a loaded checkpoint is in, from its keys."""
    if "vitrain_version" in state and isinstance(state.get("model"), Mapping):
        return "vitrain"
    keys = unwrap_state_dict(state).keys()
    if "class_token" in keys or "conv_proj.weight" in keys:
        return "torchvision_vit"
    if any(k.startswith("features.") and k.endswith("relative_position_bias_table") for k in keys):
        return "torchvision_swin"
    if "layers.0.downsample.reduction.weight" in keys:  # only the release has a merge after stage 0
        return "swin_release"
    if isinstance(state.get("model"), Mapping):
        return "deit_release"
    return "timm"


def rename_keys(weights: Mapping[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Apply a mapping table to every key; Swin's derived buffers are dropped."""
    out = {}
    for key, value in weights.items():
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize a (1, prefix + h*w, D) position embedding to another patch grid: timm's
    :func:`~timm.layers.resample_abs_pos_embed` (bicubic with antialiasing, float32; the prefix tokens,
    CLS and distillation, have no position and are kept), the same numbers as our former copy.

    Needed when fine-tuning at another resolution: the patch grid, and with it the number of
    positions, changes while the learned embedding should stay a smooth function of position.
    Kept around timm's call: ``new_grid`` may be an int, and without ``old_grid`` a patch count that is
    not a square is a ConfigError (timm would take the floor of its square root and fail in a reshape).
    The batch dimension must be 1, as in every position embedding (timm reshapes to a batch of one).
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"pos_embed has {n} patch positions, not a square grid; pass old_grid")
        old_grid = (side, side)
    return resample_abs_pos_embed(pos_embed, list(to_2tuple(new_grid)), list(old_grid), num_prefix_tokens)


def resample_relative_position_bias_table(table: torch.Tensor, new_window: int | tuple[int, int]) -> torch.Tensor:
    """Resize Swin's ((2w-1)^2, heads) relative position bias table to another window, bicubic: timm's
    :func:`~timm.layers.resize_rel_pos_bias_table_simple`, the same numbers as our former copy.

    A window of w tokens has 2w-1 relative offsets per axis; the table is a (2w-1) x (2w-1) image
    per head, so a larger window gets the same biases interpolated over more offsets. Kept around
    timm's call: the table is interpolated in float32 and returned contiguous in its own dtype (timm
    interpolates in the table's dtype and returns a transposed view), and a table that is not
    square is a ConfigError (timm would take the floor of its square root).
    """
    new_window = to_2tuple(new_window)
    rows, heads = table.shape
    old = math.isqrt(rows)
    if old * old != rows:
        raise ConfigError(f"relative_position_bias_table has {rows} rows, not the (2w-1)^2 of a square window")
    new = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if (old, old) == new:
        return table
    resized = resize_rel_pos_bias_table_simple(table.float(), new_window, (new[0] * new[1], heads))
    return resized.contiguous().to(table.dtype)  # ((2w'-1)^2, heads)


def _head_names(model: nn.Module) -> tuple[str, ...]:
    return tuple(getattr(model, "head_names", None) or classifier_names(model))


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return getattr(model, "model_name", None) or cfg.get("architecture") or type(model).__name__


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def _fit_pos_embed(value: torch.Tensor, weights: Mapping[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    prefix, expected = sum(k in weights for k in ("cls_token", "dist_token")), getattr(model, "num_prefix_tokens", 1)
    if prefix != expected:
        raise ConfigError(
            f"pos_embed has {prefix} prefix tokens (CLS, distillation) in the file, {expected} in "
            f"{_model_name(model)}; set model.name to a {'distilled' if prefix == 2 else 'non-distilled'} variant"
        )
    # DeiT III (timm's no_embed_class): the prefix tokens have no position; pos_embed holds the patches only
    placed = 0 if getattr(model, "no_embed_class", False) else prefix
    if not _is_square(value.shape[1] - placed) and _is_square(value.shape[1] - (prefix - placed)):
        raise ConfigError(
            f"pos_embed has positions for {prefix - placed} prefix tokens (CLS, distillation) in the file, {placed} "
            f"in {_model_name(model)} (DeiT III models have none); set model.name to the file's architecture"
        )
    return resample_pos_embed(value, tuple(model.patch_embed.grid_size), placed)


def _resample(key: str, value: torch.Tensor, want: torch.Size, weights: Mapping, model: nn.Module) -> Any:
    """``value`` resampled to the model's ``want`` shape, or None when it cannot be."""
    if key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want[-1] and hasattr(model, "patch_embed"):
        return _fit_pos_embed(value, weights, model)
    if key.endswith("patch_embed.proj.weight") and value.ndim == 4 and value.shape[:2] == want[:2]:
        # another patch size: timm's FlexiViT resize keeps the patch embedding's response to images
        return resample_patch_embed(value, list(want[-2:]), interpolation="bicubic", antialias=True)
    if key.endswith("relative_position_bias_table") and value.ndim == 2 and value.shape[1] == want[-1]:
        return resample_relative_position_bias_table(value, (math.isqrt(want[0]) + 1) // 2)  # want[0] = (2w-1)^2
    return None


def fit_to_model(
    weights: Mapping[str, torch.Tensor], model: nn.Module, strict_shapes: bool = True, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit timm-named ``weights`` to ``model``'s shapes: resample what can be resampled, drop the
    classifier when it has another number of classes. Returns the weights and the dropped keys.

    Any other shape difference means the file is for another architecture: a ``ConfigError`` naming the
    first such key, or, with ``strict_shapes=False``, the key is dropped (and listed) as well.
    """
    target, heads = model.state_dict(), _head_names(model)
    out, dropped = {}, []
    for key, value in weights.items():
        want = target[key].shape if key in target else value.shape
        if value.shape != want:
            resampled = _resample(key, value, want, weights, model)
            resampled = resampled if resampled is not None and resampled.shape == want else None
            if resampled is None and strict_shapes and not in_module(key, heads):
                raise ConfigError(
                    f"{source} does not fit {_model_name(model)}: {key} is {tuple(value.shape)} in the file, "
                    f"{tuple(want)} in the model; is it a checkpoint of another architecture? "
                    f"set model.name to match it"
                )
            if resampled is None:
                dropped.append(key)
                continue
            log.info("resampled %s from %s to %s", key, tuple(value.shape), tuple(want))
            value = resampled
        out[key] = value
    return out, dropped


def convert_state_dict(state: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint in any of :data:`LAYOUTS` as a state dict for ``model`` (timm's names and shapes).

    Classifier weights for another number of classes are left out, so the model keeps its own head.
    """
    weights, _ = _convert(state, model)
    return weights


def _convert(
    state: Mapping[str, Any], model: nn.Module, strict_shapes: bool = True, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    weights = unwrap_state_dict(state) if isinstance(state, Mapping) else {}
    if not weights:
        raise VitrainError(f"{source} holds no state dict of tensors; is it a weights file?")
    layout, own = detect_layout(state), model.state_dict().keys()
    renamed = rename_keys(weights, RULES.get(layout, []))
    if len(weights.keys() & own) > len(renamed.keys() & own):  # a torchvision model takes torchvision's names
        layout, renamed = "the model's own", rename_keys(weights, [])
    log.info("%s is in the %s layout", source, layout)
    return fit_to_model(renamed, model, strict_shapes, source)


def read_weights(path: str | Path) -> dict[str, Any]:
    """A weights file as a dict, without running code: safetensors, or a weights-only torch pickle; a timm hub
    folder (``local-dir:FOLDER`` or the folder itself) gives its model.safetensors or pytorch_model.bin."""
    path = local_path(path)
    if path.is_dir():
        path = hub_folder_weights(path)
    if path.suffix != ".safetensors":
        return load_checkpoint(path)
    if not path.is_file():
        raise VitrainError(f"checkpoint {path} does not exist; check the path")
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise VitrainError(f"cannot load checkpoint {path}: {first_line(e, 200)}") from e


def load_pretrained(
    model: nn.Module, source: str | Path | Mapping[str, Any], strict_shapes: bool = True
) -> LoadReport:
    """Load a checkpoint file (or an already-loaded dict) of any supported layout into ``model``.

    Tensors are converted and fitted by :func:`convert_state_dict`; keys absent on either side are
    reported rather than fatal, so a backbone-only file loads into a model with a head.
    """
    name = f"checkpoint {source}" if isinstance(source, str | Path) else "the state dict"
    state = read_weights(source) if isinstance(source, str | Path) else source
    weights, dropped = _convert(state, model, strict_shapes, name)
    if not weights.keys() & model.state_dict().keys():
        raise ConfigError(f"no tensor of {name} matches {_model_name(model)}; set model.name to its architecture")
    result = model.load_state_dict(weights, strict=False)
    report = LoadReport(missing=[k for k in result.missing_keys if k not in dropped],
                        unexpected=list(result.unexpected_keys), reinitialized=dropped)
    log.info("loaded %s into %s: %d tensors", name, _model_name(model), len(weights) - len(report.unexpected))
    for what, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                       ("re-initialised (shape differs)", report.reinitialized)):
        if keys:
            log.warning("%s: %d %s keys: %s", name, len(keys), what, ", ".join(keys[:8]) + (" ..." * (len(keys) > 8)))
    return report


def fetch_timm_weights(name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights for a model name vitrain shares with timm (``model.pretrained=true``; a tag picks
    other weights: ``vit_small_patch16_224.augreg_in21k``). Cached weights are read offline; weights neither cached
    nor reachable are a one-line error before any download (:func:`~vitrain.models.weights.ensure_timm_weights`)."""
    import timm

    ensure_timm_weights(name)
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # the hub answered, but the download failed
        raise VitrainError(
            f"could not download timm's pretrained weights for '{name}' ({type(e).__name__}: {first_sentence(e)}); "
            f"set model.pretrained=false and model.checkpoint=PATH to a local weights file instead"
        ) from e
