"""Starting weights: what preprocessing they were trained with, and whether they can be had without waiting.

:func:`weights_preprocess` reads the mean, std, interpolation and eval crop of the weights a model starts from,
without building it or loading them: timm's ``pretrained_cfg`` of the name (its tag, if given), torchvision's
weights enum, the ``config.json`` of a timm hub folder, the ``preprocess`` of a vitrain checkpoint or export.
:func:`ensure_pretrained` runs before any download: weights in the local cache are used (offline too), and
weights that are neither cached nor reachable stop the run at once, in one line naming the ways to go on.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitrain import hub
from vitrain.errors import ConfigError, VitrainError
from vitrain.paths import HUB_FOLDER_FILES, local_path

log = logging.getLogger(__name__)

KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")  # what the weights say about their inputs
SIZE_KEYS = ("img_size", "test_img_size")  # and at which size they were trained (and, timm's, tested)
DEFAULT_SIZE = 224  # a model whose config names no input size (timm's and torchvision's default)
WAYS_ON = ("or set model.checkpoint=PATH (a weights file, or a timm hub folder: local-dir:FOLDER), "
           "or model.pretrained=false to start from random weights")  # the end of every such error: timm's weights
WAYS_ON_TORCHVISION = "or set model.checkpoint=PATH to a local weights file, or model.pretrained=false to start " \
                      "from random weights"


@dataclass
class WeightsPreprocess:
    """What the starting weights say about their inputs (``values``: some of :data:`KEYS`; empty when unknown)
    and where they come from, for the log."""

    origin: str
    values: dict[str, Any] = field(default_factory=dict)


def weights_preprocess(source: str, name: str, pretrained: bool, checkpoint: str | None) -> WeightsPreprocess:
    """The preprocessing of the weights that ``create_model`` loads for this model config: the checkpoint's when
    one is given (it is loaded last and replaces the pretrained weights), else the pretrained weights' of
    ``source``, else none (random initialisation)."""
    if checkpoint:
        return _checkpoint_preprocess(checkpoint)
    if not pretrained:
        return WeightsPreprocess("none (random initialisation)")
    if source == "torchvision":
        return _torchvision_preprocess(name)
    return _timm_preprocess(name)  # timm's models, and vitrain's (they take timm's weights of the same name)


def _timm_preprocess(name: str) -> WeightsPreprocess:
    from timm.data import resolve_data_config

    cfg = timm_pretrained_cfg(name)
    config = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    values = {"mean": list(config["mean"]), "std": list(config["std"]), "interpolation": config["interpolation"],
              "crop_pct": config["crop_pct"], "crop_mode": config.get("crop_mode") or "center",
              "img_size": config["input_size"][-1]}
    if cfg.test_input_size:
        values["test_img_size"] = cfg.test_input_size[-1]
    return WeightsPreprocess(f"timm's pretrained_cfg of {_tagged(name)}", values)


def timm_pretrained_cfg(name: str) -> Any:
    """timm's ``PretrainedCfg`` of ``name`` (``arch`` or ``arch.tag``; without a tag, timm's default weights),
    or a one-line ConfigError when timm has no weights of that name."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ConfigError(f"timm has no model '{arch}' to take pretrained weights from; "
                          f"set model.pretrained=false, or model.checkpoint=PATH to a local weights file")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(f"timm has no pretrained weights '{name}'; " + (
            f"set model.name={arch}.TAG with a TAG of {', '.join(tags)}" if tags else
            "set model.pretrained=false, or model.checkpoint=PATH to a local weights file"))
    return cfg


def input_size(source: str, name: str, pretrained: bool, checkpoint: str | None) -> int:
    """What ``model.img_size=null`` stands for: the size the starting weights were trained at (a checkpoint's,
    the pretrained weights' of the tag: timm's ``input_size``, torchvision's crop), else the model's own (the size
    timm's config of the name gives, or the one a vitrain name ends in), so a 384 checkpoint trains at 384."""
    size = weights_preprocess(source, name, pretrained, checkpoint).values.get("img_size")
    return int(size) if size else own_input_size(source, name)


def own_input_size(source: str, name: str) -> int:
    """The input size a model is built for without weights: timm's pretrained config of the name (its tag's, or
    the default weights'), torchvision's weights' crop, the size that ends a vitrain name; 224 where none says."""
    if source == "torchvision":
        weights = torchvision_weights(name)
        return weights.transforms().crop_size[0] if weights is not None else DEFAULT_SIZE
    arch = name.partition(".")[0]
    if source == "vitrain":
        found = re.search(r"_(\d+)$", arch)
        return int(found.group(1)) if found else DEFAULT_SIZE
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    return cfg.input_size[-1] if cfg is not None and cfg.input_size else DEFAULT_SIZE


def _tagged(name: str) -> str:
    """``name`` with the tag timm takes by default when it has none (vit_small_patch16_224.augreg_in21k_ft_in1k)."""
    tag = timm_pretrained_cfg(name).tag
    return f"{name}.{tag}" if tag and "." not in name else name


def torchvision_weights(name: str) -> Any:
    """torchvision's weights enum member that ``name`` picks: ``arch.WEIGHTS`` (vit_b_16.IMAGENET1K_SWAG_E2E_V1),
    or the model's ``DEFAULT`` for a plain ``arch``; a name the model lacks is a one-line ConfigError listing its
    weights, and a model without weights (``None``) gives None."""
    import torchvision

    arch, _, tag = name.partition(".")
    try:
        choices = torchvision.models.get_model_weights(arch)
    except (KeyError, ValueError):  # a model torchvision has no weights for
        choices = None
    names = [w.name for w in choices] if choices is not None else []
    if not tag:
        return choices.DEFAULT if names else None
    if tag not in names and tag != "DEFAULT":
        listing = f"set model.name={arch}.W with W one of {', '.join(names)}" if names else \
            "torchvision has no weights for it: set model.pretrained=false"
        raise ConfigError(f"torchvision's {arch} has no weights '{tag}'; {listing}")
    return choices[tag]


def _torchvision_preprocess(name: str) -> WeightsPreprocess:
    weights = torchvision_weights(name)
    if weights is None:
        raise ConfigError(f"torchvision has no pretrained weights for '{name}'; set model.pretrained=false, or "
                          f"model.checkpoint=PATH to a local weights file")
    transform = weights.transforms()
    crop, resize = transform.crop_size[0], transform.resize_size[0]
    values = {"mean": list(transform.mean), "std": list(transform.std),
              "interpolation": transform.interpolation.value, "crop_pct": crop_pct_of(crop, resize),
              "crop_mode": "center", "img_size": crop}  # ImageClassification: shorter side to resize, centre crop
    return WeightsPreprocess(f"torchvision's {weights} transforms()", values)


def crop_pct_of(crop: int, resize: int) -> float:
    """The ``crop_pct`` whose ``floor(crop / crop_pct)`` is ``resize`` (timm's rule): crop / resize, moved down by
    a rounding step where float division lands just below the integer (resize 256, crop 224: 0.875)."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def _checkpoint_preprocess(checkpoint: str) -> WeightsPreprocess:
    """A timm hub folder's ``config.json``, a vitrain checkpoint's or safetensors export's ``preprocess``; any other
    file says nothing about its inputs."""
    path = local_path(checkpoint)
    values: dict[str, Any] = {}
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        values = dict(config.get("pretrained_cfg", config))  # timm's layout; older folders: one flat dict
        if "input_size" in values:
            values["img_size"] = values["input_size"][-1]
        if values.get("test_input_size"):
            values["test_img_size"] = values["test_input_size"][-1]
    elif path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            values = json.loads((f.metadata() or {}).get("preprocess", "{}"))
    elif path.is_file():
        values = _saved_preprocess(path)
    values = {k: (list(v) if isinstance(v, list | tuple) else v) for k, v in values.items()
              if k in KEYS + SIZE_KEYS and v is not None}
    return WeightsPreprocess(f"model.checkpoint={checkpoint}" + ("" if values else " (it does not say its "
                                                                 "preprocessing)"), values)


def _saved_preprocess(path: Path) -> dict[str, Any]:
    """The ``preprocess`` of a vitrain training checkpoint (memory-mapped: the tensors are not read), or {} for
    another file; a file that cannot be read is left to the loader, whose error says why. Read once per version of
    the file: a run asks for it several times (its size, its preprocessing, its checkpoints' metadata)."""
    stat = path.stat()
    return dict(_read_saved_preprocess(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _read_saved_preprocess(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    import torch

    from vitrain.checkpoint import upgrade

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    return upgrade(state).get("preprocess", {}) if isinstance(state, dict) and "vitrain_version" in state else {}


def ensure_pretrained(source: str, name: str) -> None:
    """Before ``model.pretrained=true`` downloads anything: the weights are in the local cache, or their server
    answers (:mod:`vitrain.hub`); else a one-line VitrainError at once, naming the ways to go on."""
    if source == "torchvision":
        ensure_torchvision_weights(name)
    else:
        ensure_timm_weights(name)


def ensure_timm_weights(name: str) -> None:
    """timm's weights for ``name`` can be had: the hub answers, or (offline, now for this whole process) they are
    in the Hugging Face cache, which timm then reads without retrying."""
    cfg = timm_pretrained_cfg(name)
    if not cfg.hf_hub_id:  # weights at a plain URL (a few old models): torch's download cache
        _ensure_url(f"timm's pretrained weights for '{name}'", cfg.url, WAYS_ON)
        return
    offline = hub.offline_by_env()
    if hub.hub_online() or _in_hf_cache(cfg.hf_hub_id, cfg.hf_hub_filename):
        return
    from huggingface_hub import constants

    why = ("HF_HUB_OFFLINE=1 forbids downloading" if offline else
           f"the hub ({hub.endpoint()}) did not answer within {hub.CHECK_SECONDS:g} s")
    raise VitrainError(
        f"timm's pretrained weights for '{name}' are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
        f"{why}; fetch them once with network (hf download {cfg.hf_hub_id}, or a run online), then HF_HUB_OFFLINE=1 "
        f"reads the cache (HF_HUB_CACHE moves it); {WAYS_ON}")


def _in_hf_cache(repo_id: str, filename: str | None) -> bool:
    """Whether the hub's local cache holds the file timm would load for ``repo_id``: ``filename``, or by default
    model.safetensors, then pytorch_model.bin (timm's ``load_state_dict_from_hf``)."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = repo_id.partition("@")
    return any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
               for f in ([filename] if filename else HUB_FOLDER_FILES))


def ensure_torchvision_weights(name: str) -> None:
    """torchvision's weights for ``name`` (``arch.WEIGHTS``, or the default) are in torch's download cache, or
    their server answers."""
    weights = torchvision_weights(name)
    if weights is None:
        raise ConfigError(f"torchvision has no pretrained weights for '{name}'; set model.pretrained=false")
    url = weights.url
    _ensure_url(f"torchvision's pretrained weights for '{name}'", url, WAYS_ON_TORCHVISION)


def _ensure_url(what: str, url: str | None, ways_on: str) -> None:
    """A file that torch.hub downloads from ``url`` is in its cache (hub dir/checkpoints), or the host answers."""
    import torch

    if not url:
        return  # timm says it has no weights, in its own words
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file() or hub.reachable(url):
        return
    host = url.split("/")[2]
    raise VitrainError(f"{what} are not in torch's download cache ({cached}) and {host} did not answer within "
                       f"{hub.CHECK_SECONDS:g} s; fetch them once with network (or copy the file there), {ways_on}")
