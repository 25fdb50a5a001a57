"""LoRA: parameter-efficient fine-tuning with low-rank adapters, through Hugging Face ``peft`` (an optional extra).

``model.lora.rank=R`` puts an adapter ``W x + (alpha / R) B A x`` (``A``: R x in, ``B``: out x R, ``B`` starting
at zero) beside every Linear whose name ends with one of ``model.lora.targets`` (default: the attention's fused
``qkv`` and ``proj``, the MLP's ``fc1`` and ``fc2``, as named by vitrain's and timm's ViT, DeiT and Swin), and
freezes everything else except the classifier head(s). The adapters go into the model in place
(``peft.inject_adapter_in_model``), so the model keeps its class, its head names and the names of its other
parameters; a target layer's weight moves to ``<layer>.base_layer.weight``.

:func:`merge_lora` folds the adapters into the weights and gives back the plain model (its state dict loads
into ``create_model(...)``, and into timm's model of a timm-named ViT). :func:`save_adapters` writes peft's
adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``, with the head weights as peft's
``modules_to_save``), which :func:`load_adapters` and ``peft.PeftModel.from_pretrained`` read back.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import ModuleType

from torch import nn

from vitrain.errors import ConfigError
from vitrain.models.config import LoraSpec
from vitrain.models.heads import classifier_names, in_module

ADAPTER = "default"  # peft's adapter name: one adapter per model
PEFT_PREFIX = "base_model.model."  # how peft's files name a module of the model it wraps
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def _peft(setting: str) -> ModuleType:
    """The ``peft`` package, or a one-line error naming ``setting`` and the command that installs it."""
    try:
        import peft
    except ImportError as e:
        raise ConfigError(f'{setting} needs peft: pip install -e ".[peft]" (or pip install peft)') from e
    return peft


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the Linear layers of ``model`` whose name is one of ``targets`` or ends with ``.<target>``,
    outside the classifier head(s), in module order."""
    heads = classifier_names(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not in_module(name, heads)
            and any(name == t or name.endswith("." + t) for t in targets)]


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` belongs to a LoRA adapter (``...lora_A.default.weight``)."""
    return any(part.startswith("lora_") for part in name.split("."))


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters injected by :func:`apply_lora` or :func:`load_adapters`."""
    return bool(getattr(model, "peft_config", None))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters) of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def train_adapters_and_heads(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA adapters and the classifier head(s)."""
    heads = classifier_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name) or in_module(name, heads))


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject rank ``spec.rank`` adapters into the target Linears of ``model`` (in place, returned), and
    leave only the adapters and the classifier head(s) trainable."""
    peft = _peft(f"model.lora.rank={spec.rank}")
    if spec.rank <= 0:
        raise ConfigError(f"model.lora.rank must be positive to add adapters, got {spec.rank}")
    names = lora_targets(model, list(spec.targets))
    if not names:
        raise ConfigError(f"model.lora.targets={list(spec.targets)} matches no Linear layer of "
                          f"{getattr(model, 'model_name', type(model).__name__)} outside its head; name others")
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names)
    model = inject(model, config)
    train_adapters_and_heads(model)
    return model


def inject(model: nn.Module, config: object) -> nn.Module:
    """Inject adapters as the ``peft.LoraConfig`` ``config`` says (in place, returned)."""
    if has_lora(model):
        raise ConfigError("the model has LoRA adapters already; merge them (vitrain.lora.merge_lora) first")
    return _peft("LoRA adapters").inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def merge_lora(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with its adapters merged into the weights (``W + alpha / r * B A``) and the peft layers
    replaced by the plain Linears: a model with exactly the state dict keys of one built without LoRA.
    A copy unless ``inplace``; every parameter of the result requires grad, as in a fresh model."""
    if not has_lora(model):
        return model if inplace else copy.deepcopy(model)
    from peft.tuners.tuners_utils import BaseTunerLayer  # has_lora: peft is there

    merged = model if inplace else copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent), child, module.get_base_layer())
    del merged.peft_config
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def save_adapters(model: nn.Module, folder: str | Path) -> Path:
    """Write the adapters and the classifier head(s) of ``model`` in peft's format to ``folder``:
    ``adapter_config.json`` (the head(s) as ``modules_to_save``) and ``adapter_model.safetensors``. They
    apply to the weights the model started from (``model.checkpoint`` or ``model.pretrained``)."""
    if not has_lora(model):
        raise ConfigError("the model has no LoRA adapters to save (model.lora.rank=0)")
    peft = _peft("saving LoRA adapters")
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[ADAPTER])
    heads = list(classifier_names(model))
    config.modules_to_save = heads
    tensors = {PEFT_PREFIX + k: v for k, v in peft.get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}
    for head in heads:
        tensors.update({f"{PEFT_PREFIX}{head}.{k}": v for k, v in model.get_submodule(head).state_dict().items()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    return folder


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject the adapters that :func:`save_adapters` wrote to ``folder`` into ``model`` (the same weights
    they were trained on; in place, returned) and load them and the saved head(s); only these train."""
    peft = _peft("loading LoRA adapters")
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{folder} is no adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = peft.LoraConfig.from_pretrained(str(folder))
    heads = list(config.modules_to_save or [])
    config.modules_to_save = None  # the heads stay plain modules, loaded below
    model = inject(model, config)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    head_state = {k: v for k, v in tensors.items() if in_module(k, heads)}
    adapters = {k: v for k, v in tensors.items() if k not in head_state}
    result = peft.set_peft_model_state_dict(model, adapters, adapter_name=ADAPTER)
    missing = [k for k in model.state_dict() if is_adapter(k) and k in result.missing_keys]
    unexpected = list(result.unexpected_keys) + model.load_state_dict(head_state, strict=False).unexpected_keys
    if missing or unexpected:
        raise ConfigError(f"the adapters in {folder} do not fit this model: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    train_adapters_and_heads(model)
    return model

