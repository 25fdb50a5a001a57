"""``ModelConfig``: the schema of the ``model`` config group (``configs/model/*.yaml``).

Each key has its type and default here; a YAML file holds only its choices. Keys beyond these
(``+model.depth=6`` from the shell) go to the model's constructor. Values are checked when the config becomes
this object, before any data set is opened; the model's name, its constructor's arguments and its patch size are
looked up without building it.
"""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from vitrain.errors import ConfigError, first_line

SOURCES = ("vitrain", "timm", "torchvision")
SET_FROM_CONFIG = {"num_classes": "the data set's classes", "img_size": "model.img_size",  # constructor arguments
                   "drop_rate": "model.drop_rate", "drop_path_rate": "model.drop_path",  # that vitrain gives,
                   "window_size": "model.window_size"}  # never +model.KEY


@dataclass
class LoraSpec:
    """The ``model.lora`` keys: LoRA adapters (Hugging Face peft) on the attention and MLP linears; only the
    adapters and the classifier head(s) train (:mod:`vitrain.lora`)."""

    rank: int = 0  # rank r of each adapter; 0: no LoRA (every weight trains)
    alpha: float = 16  # the adapters' update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input, in [0, 1)
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])  # Linear name suffixes

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"model.lora.rank must be >= 0 (0: no LoRA), got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout is a rate: set it in [0, 1), got {self.dropout}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"model.lora.targets must list module name suffixes such as qkv, got {self.targets}")


@dataclass
class ModelConfig:
    """Which model to build, at which resolution, from which weights."""

    extra_keys: ClassVar[str] = "an argument of the model's constructor"  # +model.depth=6 (not a config key)
    source: str = "vitrain"  # vitrain | timm | torchvision
    name: str = "vit_nano_patch4_16"  # a vitrain model (vitrain.models.list_models()), or a timm/torchvision name;
    #   a timm tag picks the pretrained weights, and with them the preprocessing (vit_small_patch16_224.augreg_in21k)
    img_size: int | None = None  # input resolution; the data pipeline resizes images to it; null: the starting
    #   weights' own (a checkpoint's, the pretrained tag's: vit_small_patch16_384.augreg_in21k_ft_in1k is 384),
    #   else the model's (the size its name ends in, timm's config); a size set here resamples the position tables
    pretrained: bool = False  # start from ImageNet weights: the hub's, or its local cache's offline (HF_HUB_OFFLINE=1);
    #   data.mean, std, interpolation and crop_pct then follow the weights unless set
    checkpoint: str | None = None  # start from a local weights file instead (.pth/.pt/.bin/.safetensors), or a
    #   timm hub folder (local-dir:FOLDER: config.json and model.safetensors)
    reset_head: bool = False  # re-initialise the classifier after loading (new classes, same count)
    drop_path: float = 0.0  # stochastic depth rate of the deepest block (grows linearly from 0; DeiT III: every block)
    drop_rate: float = 0.0  # dropout rate
    window_size: int | None = None  # Swin: attention window in patches; null: the model's own
    grad_checkpointing: bool = False  # recompute block activations in the backward pass: less memory, ~30% more compute
    lora: LoraSpec = field(default_factory=LoraSpec)  # LoRA adapters (rank > 0): rank, alpha, dropout, targets

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"unknown model source '{self.source}' (model.source); "
                              f"choose one of {', '.join(SOURCES)}")
        if self.img_size is not None and self.img_size <= 0:
            raise ConfigError(f"model.img_size must be positive, got {self.img_size}")
        for key in ("drop_path", "drop_rate"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"model.{key} is a rate: set it in [0, 1), got {getattr(self, key)}")
        if self.window_size is not None and self.window_size <= 0:
            raise ConfigError(f"model.window_size must be positive (or null), got {self.window_size}")

    def check_name(self) -> None:
        """The model's name among its source's (vitrain's registry, timm's, torchvision's): imports torch, so
        ``TrainConfig`` runs it after the checks that need none."""
        check_model_name(self.source, self.name)

    def resolve_img_size(self) -> None:
        """``img_size=null``: the size the starting weights were trained at, else the model's own
        (:func:`vitrain.models.weights.input_size`). TrainConfig calls it once, before its checks, so that every
        piece of the run sees one size (not here: the schema's default object must keep null)."""
        if self.img_size is None:
            from vitrain.models.weights import input_size

            self.img_size = input_size(self.source, self.name, self.pretrained, self.checkpoint)

    def constructor_kwargs(self) -> dict[str, Any]:
        """What goes to the model's constructor beyond name, classes and size: the rates, Swin's window,
        and any key added from the shell (``+model.depth=6``), which OmegaConf sets as an attribute."""
        known = {f.name for f in fields(self)}
        extra = {k: v for k, v in vars(self).items() if k not in known}
        kwargs = {"drop_rate": self.drop_rate, "drop_path_rate": self.drop_path, **extra}
        if self.window_size is not None:
            kwargs["window_size"] = self.window_size
        return kwargs

    def check_architecture(self) -> None:
        """Without building the model: each key added from the shell is an argument of its constructor (vitrain's
        models; timm's and torchvision's builders pass any on), and ``img_size`` is a multiple of the patch size
        (vitrain's ViTs and Swins refuse another). Called once the extra keys are set (TrainConfig)."""
        known = {f.name for f in fields(self)}
        extra = {k: v for k, v in vars(self).items() if k not in known}
        for key in extra:
            self._check_extra_key(key, known)
        found = re.search(r"patch(\d+)", self.name)  # every vitrain model names its patch size, as timm's do
        patch = extra.get("patch_size", int(found.group(1)) if found else None)
        if self.source == "vitrain" and isinstance(patch, int) and patch > 0 and self.img_size % patch:
            raise ConfigError(f"image size {self.img_size}x{self.img_size} is not divisible by the patch size {patch}; "
                              f"set model.img_size to a multiple of it")
        if self.source == "vitrain":  # built on the meta device (no memory, no weights): Swin's windows, the rest
            self._build_on_meta()

    def _build_on_meta(self) -> None:
        """Build the vitrain model without its tensors, so that what only the constructor knows (a Swin stage that
        is not whole windows) is refused before any data is read."""
        import torch

        from vitrain.models.registry import build_registered

        try:
            with torch.device("meta"):
                build_registered(self.name.partition(".")[0], num_classes=2, img_size=self.img_size,  # no weights tag
                                 **self.constructor_kwargs())
        except ConfigError:
            raise
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise ConfigError(f"model {self.name} cannot be built with img_size={self.img_size} and "
                              f"{self.constructor_kwargs()}: {first_line(e)}") from e

    def _check_extra_key(self, key: str, known: set[str]) -> None:
        """``+model.KEY``: not one that vitrain sets itself, and an argument of the constructor where that is known."""
        if key in SET_FROM_CONFIG:
            raise ConfigError(f"unknown key model.{key}: vitrain sets it from {SET_FROM_CONFIG[key]}")
        takes = constructor_arguments(self.source, self.name.partition(".")[0])  # without a weights tag
        if takes is None or key in takes:
            return
        close = difflib.get_close_matches(key, sorted(known | set(takes) - set(SET_FROM_CONFIG)), n=3)
        hint = (f"did you mean {', '.join(f'model.{k}' for k in close)}?" if close else
                f"it takes {', '.join(k for k in takes if k not in SET_FROM_CONFIG)}")
        raise ConfigError(f"unknown key model.{key}: not an argument of {self.name}; {hint}")

    def spec(self, num_classes: int) -> dict[str, Any]:
        """The plain model spec stored in checkpoints: ``create_model(**spec)`` rebuilds the architecture
        (without weights) whatever the YAML layout of the day."""
        return {"name": self.name, "source": self.source, "num_classes": num_classes, "img_size": self.img_size,
                **self.constructor_kwargs()}


def check_model_name(source: str, name: str) -> None:
    """``name`` is a model of ``source``, or the one-line error that building it would give, with close matches."""
    from vitrain.models.registry import list_models, unknown_name

    arch, _, tag = name.partition(".")  # a timm tag names the pretrained weights (vit_small_patch16_224.augreg_in21k)
    if source == "vitrain" and arch not in list_models():
        raise unknown_name("model", name, list_models(), "vitrain.models.list_models()", cutoff=0.5)
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise unknown_name("timm model", name, timm.list_models(), "timm.list_models()")
    if tag and source in ("vitrain", "timm"):  # torchvision's names its weights: below
        from vitrain.models.weights import timm_pretrained_cfg

        timm_pretrained_cfg(name)  # timm has weights of that tag, or a one-line error listing its tags
    if source == "torchvision":
        import torchvision

        from vitrain.models.weights import torchvision_weights

        available = torchvision.models.list_models(module=torchvision.models)
        if arch not in available:
            raise unknown_name("torchvision model", arch, available, "torchvision.models.list_models()")
        torchvision_weights(name)  # a weights name the model has (vit_b_16.IMAGENET1K_SWAG_E2E_V1), or one line


def constructor_arguments(source: str, name: str) -> list[str] | None:
    """The keyword arguments of the constructor of vitrain's model ``name`` (the class its registered function
    returns, following ``**kwargs`` up to the base class that takes them), or None where that is not known
    without building it: timm's and torchvision's builders pass ``**kwargs`` through layers of their own."""
    if source != "vitrain":
        return None
    from torch import nn

    from vitrain.models.registry import model_builder

    cls = typing.get_type_hints(model_builder(name)).get("return")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        if "__init__" in vars(klass):
            params = list(inspect.signature(klass.__init__).parameters.values())[1:]  # after self
            names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
    return names
