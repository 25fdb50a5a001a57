"""Any timm or torchvision model as a backbone, with its head replaced for the task.

``model=timm model.name=convnext_tiny`` and ``model=torchvision model.name=swin_t`` go through here.
The head's module path is recorded on the model as ``head_names`` so the optimizer can give the
new head its own learning rate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from vitrain.errors import ConfigError, VitrainError, first_sentence
from vitrain.models.heads import classifier_names
from vitrain.models.registry import unknown_name
from vitrain.models.weights import ensure_timm_weights, ensure_torchvision_weights, torchvision_weights

log = logging.getLogger(__name__)

_OPTIONAL = ("img_size", "drop_path_rate", "drop_rate", "dropout")


def _build_dropping_unsupported(build: Callable[..., nn.Module], name: str, **kwargs: Any) -> nn.Module:
    """Call ``build(name, **kwargs)``, leaving out the optional keyword arguments the model rejects
    (a CNN has no ``img_size``, torchvision's ResNet no stochastic depth)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    while True:
        try:
            return build(name, **kwargs)
        except TypeError as e:
            rejected = next((k for k in _OPTIONAL if k in kwargs and re.search(rf"\b{k}\b", str(e))), None)
            if rejected is None:
                raise
            log.info("%s does not take %s; left out", name, rejected)
            kwargs.pop(rejected)


def _pretrained_failed(source: str, name: str, error: Exception) -> VitrainError:
    """The server answered (:func:`~vitrain.models.weights.ensure_pretrained` checked), but the download failed."""
    reason = first_sentence(error) if str(error).strip() else "no details"
    return VitrainError(
        f"could not fetch {source} weights for '{name}' ({type(error).__name__}: {reason}); without network "
        f"set model.pretrained=false and model.checkpoint=PATH to a local weights file"
    )


def create_timm_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    drop_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with the classifier sized for the task (0 = pooled features); ``kwargs``
    go to the model's constructor."""
    import timm

    if not timm.is_model(name):
        raise unknown_name("timm model", name, timm.list_models(), "timm.list_models()")
    if pretrained:  # from the local cache when the hub is out of reach, or one line now (no retries)
        ensure_timm_weights(name)
    try:
        model = _build_dropping_unsupported(
            timm.create_model, name, pretrained=pretrained, num_classes=num_classes, img_size=img_size,
            drop_path_rate=drop_path_rate, drop_rate=drop_rate, **kwargs,
        )
    except (TypeError, ValueError, AssertionError):
        raise
    except Exception as e:  # the hub download: no network, no cache
        if pretrained:
            raise _pretrained_failed("timm", name, e) from e
        raise
    model.head_names = classifier_names(model)  # timm's pretrained_cfg["classifier"]
    return model


def _set_stochastic_depth(model: nn.Module, rate: float) -> None:
    """Rescale torchvision's StochasticDepth layers so the deepest drops with probability ``rate``.

    The builders fix their own rate (``swin_t`` 0.2, ...) and grow it linearly with depth; rescaling
    keeps that rule and makes ``model.drop_path`` mean the same as for timm's models.
    """
    from torchvision.ops import StochasticDepth

    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    top = max((m.p for m in layers), default=0.0)
    for m in layers:
        m.p = m.p / top * rate if top > 0 else rate


def _load_resampled_vit(model: nn.Module, weights: Any) -> None:
    """torchvision's ViT ``weights`` into ``model`` built at another image size: the position embedding
    resampled by torchvision's own ``interpolate_embeddings`` (bicubic, class token kept)."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    state = weights.get_state_dict(progress=False, check_hash=True)
    old = weights.meta["min_size"][0]
    state = interpolate_embeddings(model.image_size, model.patch_size, state)
    log.info("resampled torchvision's %s position embedding from %dx%d patches (%d px) to %dx%d (model.img_size=%d)",
             weights, old // model.patch_size, old // model.patch_size, old, model.image_size // model.patch_size,
             model.image_size // model.patch_size, model.image_size)
    model.load_state_dict(state)


def last_linear(model: nn.Module) -> str:
    """Module path of the last ``nn.Linear``: the classifier of every torchvision classification model."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no linear classifier to replace")
    return names[-1]


def create_torchvision_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    drop_rate: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """``torchvision.models.get_model`` (ImageNet weights when ``pretrained``: ``arch.WEIGHTS`` picks which, as
    timm's tags do; ``arch`` alone takes the model's DEFAULT) with a new head.

    Stochastic depth is rescaled on the models that have it (Swin, ConvNeXt, EfficientNet), dropout
    goes to those whose builder takes it; torchvision's ViT takes ``image_size``.
    """
    import torchvision

    arch = name.partition(".")[0]  # arch.WEIGHTS names torchvision's weights (vit_b_16.IMAGENET1K_SWAG_E2E_V1)
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        raise unknown_name("torchvision model", arch, available, "torchvision.models.list_models()")
    weights = torchvision_weights(name) if pretrained else None
    if pretrained:  # torch's download cache, or download.pytorch.org answers; else one line now
        ensure_torchvision_weights(name)
    kwargs["dropout"] = drop_rate or None
    resample = False
    if arch.startswith("vit_") and img_size:
        kwargs["image_size"] = img_size
        # the builder refuses weights of another size: build at img_size, then load them resampled
        resample = weights is not None and weights.meta["min_size"][0] != img_size
    try:
        model = _build_dropping_unsupported(torchvision.models.get_model, arch,
                                            weights=None if resample else weights, **kwargs)
        if resample:
            _load_resampled_vit(model, weights)
    except (TypeError, ValueError):
        raise
    except Exception as e:  # the download of the weights
        if pretrained:
            raise _pretrained_failed("torchvision", name, e) from e
        raise
    _set_stochastic_depth(model, drop_path_rate)
    path = last_linear(model)
    old: nn.Linear = model.get_submodule(path)
    new = nn.Linear(old.in_features, num_classes) if num_classes > 0 else nn.Identity()
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    model.head_names = (path,)
    return model
