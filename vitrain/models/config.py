"""``ModelConfig``: the schema of the ``model`` config group (``configs/model/*.yaml``).

Each key has its type and default here; a YAML file holds only its choices. Keys beyond these
(``+model.depth=6`` from the shell) go to the model's constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from vitrain.errors import ConfigError

SOURCES = ("vitrain", "timm", "torchvision")


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
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout is a rate: set it in [0, 1), got {self.dropout}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"model.lora.targets must list module name suffixes such as qkv, got {self.targets}")


@dataclass
class ModelConfig:
    """Which model to build, at which resolution, from which weights."""

    source: str = "vitrain"  # vitrain | timm | torchvision
    name: str = "vit_nano_patch4_16"  # a vitrain model (vitrain.models.list_models()), or a timm/torchvision name
    img_size: int = 16  # input resolution; the data pipeline resizes images to it
    pretrained: bool = False  # start from ImageNet weights fetched from the hub (needs network)
    checkpoint: str | None = None  # start from a local weights file instead (.pth/.pt/.bin/.safetensors)
    reset_head: bool = False  # re-initialise the classifier after loading (new classes, same count)
    drop_path: float = 0.0  # stochastic depth rate of the deepest block (grows linearly from 0)
    drop_rate: float = 0.0  # dropout rate
    window_size: int | None = None  # Swin: attention window in patches; null: the model's own
    grad_checkpointing: bool = False  # recompute block activations in the backward pass: less memory, ~30% more compute
    lora: LoraSpec = field(default_factory=LoraSpec)  # LoRA adapters (rank > 0): rank, alpha, dropout, targets

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"unknown model source '{self.source}' (model.source); "
                              f"choose one of {', '.join(SOURCES)}")
        if self.img_size <= 0:
            raise ConfigError(f"model.img_size must be positive, got {self.img_size}")
        for key in ("drop_path", "drop_rate"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"model.{key} is a rate: set it in [0, 1), got {getattr(self, key)}")
        if self.window_size is not None and self.window_size <= 0:
            raise ConfigError(f"model.window_size must be positive (or null), got {self.window_size}")

    def constructor_kwargs(self) -> dict[str, Any]:
        """What goes to the model's constructor beyond name, classes and size: the rates, Swin's window,
        and any key added from the shell (``+model.depth=6``), which OmegaConf sets as an attribute."""
        known = {f.name for f in fields(self)}
        extra = {k: v for k, v in vars(self).items() if k not in known}
        kwargs = {"drop_rate": self.drop_rate, "drop_path_rate": self.drop_path, **extra}
        if self.window_size is not None:
            kwargs["window_size"] = self.window_size
        return kwargs

    def spec(self, num_classes: int) -> dict[str, Any]:
        """The plain model spec stored in checkpoints: ``create_model(**spec)`` rebuilds the architecture
        (without weights) whatever the YAML layout of the day."""
        return {"name": self.name, "source": self.source, "num_classes": num_classes, "img_size": self.img_size,
                **self.constructor_kwargs()}
