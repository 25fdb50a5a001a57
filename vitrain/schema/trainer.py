"""The ``trainer`` group's schema (:class:`TrainerConfig`, with ``trainer.fsdp``), and the checks of the strategy
that need no torch; the loop is :mod:`vitrain.trainer`, the sharding :mod:`vitrain.parallel`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vitrain.errors import ConfigError
from vitrain.world import BACKENDS

PRECISIONS = ("fp32", "bf16", "fp16")
# what torch.device takes: a device type, and an index
DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|mtia|meta|xla|privateuseone)(:\d+)?")

STRATEGIES = ("auto", "ddp", "fsdp2")


@dataclass
class FsdpConfig:
    """``trainer.fsdp``: how FSDP2 shards (``trainer.strategy=fsdp2``)."""

    reshard_after_forward: bool = True  # free each block's gathered parameters after its forward (ZeRO-3);
    #   false keeps them until the backward (ZeRO-2: more memory, one all-gather less per block)
    cpu_offload: bool = False  # keep the sharded parameters, gradients and optimizer states in CPU memory


def check_strategy(strategy: str, backend: str = "auto", precision: str = "auto",
                   reads_whole_model: bool = False) -> None:
    """``trainer.strategy`` and ``trainer.dist_backend``, and what does not go with FSDP2: fp16 (its gradient scaler
    does not see the shards), and the figures that read the whole model on rank 0 alone (histograms, images)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown trainer.dist_backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown trainer.strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    if uses_fsdp(strategy) and precision == "fp16":
        raise ConfigError("trainer.strategy=fsdp2 keeps bf16 or fp32 parameters, not fp16; set trainer.precision=bf16")
    if uses_fsdp(strategy) and reads_whole_model:
        raise ConfigError("trainer.histograms_every and trainer.log_images read the whole model on rank 0 alone, "
                          "which trainer.strategy=fsdp2 shards; set them to 0 and false")


def uses_fsdp(strategy: str) -> bool:
    """FSDP2 is on: asked for, in a process group of any size."""
    return strategy == "fsdp2"


def refuse_with_fsdp(strategy: str, compile_step: bool, lora: bool, unfreeze: bool) -> None:
    """What does not run under FSDP2 yet, refused in one line before any data is read."""
    if not uses_fsdp(strategy):
        return
    for asked, what, fix in ((compile_step, "trainer.compile=true", "trainer.compile=false"),
                             (lora, "LoRA adapters (model.lora.rank > 0)", "model.lora.rank=0"),
                             (unfreeze, "trainer.unfreeze_after_epochs", "trainer.unfreeze_after_epochs=null")):
        if asked:
            raise ConfigError(f"{what} does not run under trainer.strategy=fsdp2 yet; set {fix}, or "
                              f"trainer.strategy=ddp")


@dataclass
class TrainerConfig:
    """The ``trainer`` group: how long, where, in which precision, and how a run is logged, saved and resumed."""

    epochs: int = 50  # passes over the training set
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N; under torchrun, auto/cuda: cuda:LOCAL_RANK
    dist_backend: str = "auto"  # under torchrun: auto (nccl on CUDA, gloo on the CPU) | nccl | gloo
    strategy: str = "auto"  # under torchrun/srun: auto = ddp (a whole copy per rank) | fsdp2 (parameters, gradients
    #   and optimizer states sharded over the ranks: models larger than one GPU; docs/distributed.md)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)  # strategy=fsdp2: reshard_after_forward, cpu_offload
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the training step's forward and loss
    channels_last: Any = "auto"  # auto (CNN models and teachers on CUDA) | true | false
    grad_clip: float | None = 1.0  # clip the global gradient norm to this; null disables
    accum_steps: int = 1  # batches whose gradients are summed before each optimizer step
    ema: bool = False  # keep an exponential moving average of the weights (evaluated and saved beside them)
    ema_decay: float = 0.9998  # EMA decay per optimizer step
    freeze_backbone: bool = False  # train only the classifier head (linear probing)
    unfreeze_after_epochs: int | None = None  # with freeze_backbone: unfreeze the backbone after this many epochs
    log_every: int = 10  # optimizer steps between logs of train loss, top-1, gradient norm, learning rates
    image_grid: int = 16  # at the start, log this many augmented training images as one grid; 0: none
    histograms_every: int = 0  # log weight and gradient histograms every N epochs; 0: never
    log_images: bool = False  # at the end, log attention/rollout/position/Grad-CAM figures to TensorBoard
    progress: bool = True  # show a tqdm progress bar
    resume: str | None = None  # null: start fresh | auto: this run folder's last.pt (hydra.run.dir=<run>) | a path
    checkpoint_every_steps: int | None = None  # also write last.pt every N optimizer steps; null: at epoch ends
    keep_last: int = 1  # with > 1, also keep the N newest numbered checkpoints (checkpoints/step_*.pt)
    async_save: bool = True  # write checkpoints in a background thread (training waits only for a CPU copy)
    cache_features: bool = False  # the frozen backbone runs once over the data (features cached on disk) and only
    #   the head trains, on its features: a linear probe in seconds (vitrain/features.py)
    feature_views: int = 1  # with cache_features: passes over the training images, each a draw of their augmentation
    skip_nonfinite: bool = False  # skip batches whose loss is NaN/inf (counted) instead of stopping
    max_skipped_fraction: float = 0.05  # with skip_nonfinite: stop when more of an epoch's batches (at least 1) are
    #   skipped
    debug: bool = False  # show full tracebacks instead of one-line errors

    def __post_init__(self) -> None:
        for key, least in (("epochs", 1), ("accum_steps", 1), ("log_every", 1), ("keep_last", 1), ("image_grid", 0),
                           ("histograms_every", 0), ("feature_views", 1)):
            if getattr(self, key) < least:
                raise ConfigError(f"trainer.{key} must be {'positive (at least 1)' if least else '>= 0 (0: off)'}, "
                                  f"got {getattr(self, key)}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise ConfigError(f"unknown trainer.precision '{self.precision}'; choose auto, fp32, bf16 or fp16")
        if self.channels_last not in ("auto", True, False):
            raise ConfigError(f"trainer.channels_last must be auto, true or false, got {self.channels_last}")
        check_strategy(self.strategy, self.dist_backend, self.precision, bool(self.histograms_every or self.log_images))
        check_device_name(self.device)  # CUDA where there is none: when the run picks its device, before any data
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"trainer.grad_clip must be positive (or null to disable), got {self.grad_clip}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"trainer.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ConfigError(f"trainer.checkpoint_every_steps must be at least 1 (or null), "
                              f"got {self.checkpoint_every_steps}")
        if self.cache_features and self.unfreeze_after_epochs is not None:
            raise ConfigError("trainer.cache_features trains the head alone; it cannot unfreeze the backbone "
                              "(set trainer.unfreeze_after_epochs=null, or trainer.cache_features=false)")
        if not 0 <= self.max_skipped_fraction < 1:
            raise ConfigError(f"trainer.max_skipped_fraction must be in [0, 1), got {self.max_skipped_fraction}")
        if self.unfreeze_after_epochs is not None and self.unfreeze_after_epochs < 0:
            raise ConfigError(f"trainer.unfreeze_after_epochs must be >= 0 (or null), got {self.unfreeze_after_epochs}")


def check_device_name(device: str, key: str = "trainer.device") -> None:
    """A device name torch knows (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...), checked without torch."""
    if device != "auto" and not DEVICE.fullmatch(device):
        raise ConfigError(f"{key}={device} is not a device PyTorch knows; use auto, cpu, cuda or cuda:N (or mps)")
