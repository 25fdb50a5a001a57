"""Hydra at the edge: where the YAML configs live, the typed schemas they are checked against, and turning a
composed config into plain Python objects.

Each config group's schema is a dataclass next to the code that reads it (``ModelConfig`` in
``vitrain/models/config.py``, ``DataConfig`` in ``vitrain/data/config.py``, ``OptimizerConfig`` and
``SchedulerConfig`` in ``vitrain/optim.py``, ``LossConfig`` in ``vitrain/losses.py``, ``DistillConfig`` in
``vitrain/distill.py``, ``TrainerConfig`` in ``vitrain/trainer.py``). :class:`TrainConfig` gathers them and
is registered with Hydra's ConfigStore as the base of ``train.yaml``, so every key has one type and one
default, and a YAML file holds only its choices. :func:`to_config` turns the composed config into these
objects, which checks every value (``__post_init__``) before anything is built or read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from vitrain.cli import fail, unknown_key
from vitrain.data.config import DataConfig
from vitrain.errors import ConfigError, VitrainError, first_line
from vitrain.models.config import ModelConfig
from vitrain.paths import check_checkpoint, check_output
from vitrain.pruning import SweepConfig
from vitrain.schema import FORMATS, WEIGHTS, check_rollout
from vitrain.schema.distill import DistillConfig
from vitrain.schema.loggers import LoggerConfig
from vitrain.schema.losses import LossConfig
from vitrain.schema.optim import OptimizerConfig, SchedulerConfig
from vitrain.schema.trainer import TrainerConfig, check_device_name, refuse_with_fsdp
from vitrain.world import torchrun_world

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_IMG_SIZE = 8192  # evaluate's img_size: beyond it, the position tables alone would not fit in memory
DEFAULT_WARMUP_EPOCHS = 2.0  # configs/scheduler/cosine.yaml's warmup (the default schedule)

_PACKAGED = Path(__file__).resolve().parent / "configs"  # inside an installed wheel
_SOURCE = Path(__file__).resolve().parent.parent / "configs"  # in a source checkout
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else _SOURCE


@dataclass
class TrainConfig:
    """``python -m vitrain.train``: one field per config group, and the seed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # set by hparams_search=optuna's sweeper, for pruning
    seed: int = 0  # seeds Python, NumPy and torch, and fixes the order of the training batches

    def __post_init__(self) -> None:
        """The checks across groups, and those that need the keys added from the shell (``+model.depth=6``: OmegaConf
        sets them on the group's object before this one is made)."""
        if not 0 <= self.seed <= 2**32 - 1:  # NumPy's seed range (seed_everything seeds NumPy with it)
            raise ConfigError(f"seed must be in [0, 2**32 - 1] (NumPy's range), got {self.seed}")
        self._check_warmup()
        step_images = self.data.batch_size * torchrun_world().size * self.trainer.accum_steps  # all ranks, one step
        self.scheduler.ratios(self.optimizer.lr * self.optimizer.lr_scale(step_images))  # warmup_lr, min_lr < peak
        if self.trainer.cache_features and (self.data.mixes or self.distill.name != "none" or self.model.lora.rank):
            raise ConfigError("trainer.cache_features trains the head on features computed once: it cannot mix images "
                              "(data.mixup, data.cutmix), distil or train LoRA adapters; turn those off, or set "
                              "trainer.cache_features=false")
        if self.model.lora.rank > 0 and self.trainer.freeze_backbone:  # it would freeze the adapters too
            raise ConfigError("model.lora.rank > 0 trains only the adapters and the head already; "
                              "set trainer.freeze_backbone=false")
        refuse_with_fsdp(self.trainer.strategy, self.trainer.compile, self.model.lora.rank > 0,
                         self.trainer.unfreeze_after_epochs is not None)
        # the checks that import torch and timm, once every value that needs neither has passed (docs/speed.md)
        from vitrain.optim import check_optimizer

        check_optimizer(self.optimizer)
        self.model.check_name()
        self.model.resolve_img_size()
        self.model.check_architecture()
        self._note_two_heads_without_teacher()
        resume = self.trainer.resume
        if resume and resume != "auto":  # find_resume_checkpoint's check of a path, before any data is read
            from vitrain.checkpoint import find_resume_checkpoint

            find_resume_checkpoint(resume, Path("."))


    def check_files(self) -> None:
        """The weights files the run starts from (``model.checkpoint``, ``distill.teacher.checkpoint``) exist and are
        files torch can load: checked when the run starts, before any data is read (a config that names a file to
        be written later, a recipe's, is still a valid config)."""
        for key, path in (("model.checkpoint", self.model.checkpoint),
                          ("distill.teacher.checkpoint", self.distill.teacher.checkpoint)):
            if path:
                check_checkpoint(path, key, folder_ok=True)

    def _note_two_heads_without_teacher(self) -> None:
        """A distilled DeiT (vitrain's ``*_distilled_*``: CLS and distillation heads) trained with distill=none: say
        how its two heads train, since DeiT's own code does it otherwise."""
        if self.distill.name == "none" and self.model.source == "vitrain" and "_distilled_" in self.model.name:
            log.info("%s has a class and a distillation head and distill=none: both heads learn the labels (the "
                     "loss is their mean) and evaluation averages them; DeiT's DistillationLoss with "
                     "distillation_type='none' trains the class head only, leaving head_dist at its initial "
                     "weights. For DeiT without distillation use the plain model (model=deit_small_plain)",
                     self.model.name)

    def _check_warmup(self) -> None:
        """A warmup as long as the run never reaches ``optimizer.lr``: refused when it was chosen (a recipe, the
        command line); the group's default 2 epochs in a shorter run (a 1-epoch smoke test) is only warned of."""
        warmup, epochs = self.scheduler.warmup_epochs, self.trainer.epochs
        if warmup < epochs:
            return
        if warmup != DEFAULT_WARMUP_EPOCHS:
            raise ConfigError(f"scheduler.warmup_epochs={warmup:g} must be shorter than trainer.epochs={epochs}; "
                              f"lower it (0: no warmup) or train longer")
        log.warning("the default warmup of scheduler.warmup_epochs=%g is as long as this %d-epoch run: the learning "
                    "rate never reaches optimizer.lr; set scheduler.warmup_epochs=0 (or less than %d)", warmup,
                    epochs, epochs)


@dataclass
class EvaluateConfig:
    """``python -m vitrain.evaluate``."""

    checkpoint: str = MISSING  # a vitrain training checkpoint: <run>/checkpoints/best.pt or last.pt
    data: DataConfig | None = None  # another data set with the same classes; null: the checkpoint's own
    batch_size: int = 256  # images per forward pass
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    output: str | None = None  # the JSON to write; null: eval_<checkpoint name>[_<data set>][_<size>].json beside it
    img_size: Any = None  # null: the size it trained at | test: its weights' test size (timm's test_input_size) |
    #   N: that size (position tables resampled); a size other than the training one is named in the output file

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        check_device_name(self.device, "device")
        if not (self.img_size in (None, "test") or type(self.img_size) is int and 0 < self.img_size <= MAX_IMG_SIZE):
            raise ConfigError(f"img_size must be null (the training size), test, or a positive whole number of pixels "
                              f"up to {MAX_IMG_SIZE}, got {self.img_size}")
        check_checkpoint(self.checkpoint)
        check_output(self.output, "output")


@dataclass
class PredictConfig:
    """``python -m vitrain.predict``."""

    checkpoint: str = MISSING  # a vitrain training checkpoint (<run>/checkpoints/best.pt), or an exported .onnx
    inputs: str = MISSING  # an image file, or a folder searched for images
    topk: int = 5  # how many classes to list per image
    ema: bool = False  # use the checkpoint's EMA weights (when it has them)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    output: str | None = None  # the file to write; null: <run>/predictions/<inputs name>.<checkpoint name>.<format>
    format: str = "json"  # json (the checkpoint, preprocessing, class names and predictions) | csv (a row per image)

    def __post_init__(self) -> None:
        if self.format not in ("json", "csv"):
            raise ConfigError(f"unknown format '{self.format}'; choose json or csv")
        if self.topk < 1:
            raise ConfigError(f"topk must be at least 1, got {self.topk}")
        check_device_name(self.device, "device")
        check_checkpoint(self.checkpoint)
        check_output(self.output, "output")


@dataclass
class VisualizeConfig:
    """``python -m vitrain.visualize``."""

    checkpoint: str = MISSING  # a vitrain training checkpoint: <run>/checkpoints/best.pt or last.pt
    image: str = MISSING  # one image file, preprocessed with the checkpoint's evaluation transform
    out_dir: str | None = None  # where the PNGs go; null: <run>/visualize beside the checkpoints folder
    ema: bool = False  # use the checkpoint's EMA weights (when it has them)
    head_fusion: str = "mean"  # how rollout merges the heads of a layer: mean | max | min
    discard_ratio: float = 0.0  # rollout: share of the smallest attention weights in each row set to 0, in [0, 1)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    dpi: int = 150  # resolution of the PNG files

    def __post_init__(self) -> None:
        check_rollout(self.head_fusion, self.discard_ratio)
        check_device_name(self.device, "device")
        if self.dpi < 1:
            raise ConfigError(f"dpi must be positive, got {self.dpi}")
        check_checkpoint(self.checkpoint)
        check_output(self.out_dir, "out_dir", folder=True)


@dataclass
class ExportConfig:
    """``python -m vitrain.export``."""

    checkpoint: str = MISSING  # a vitrain training checkpoint: <run>/checkpoints/best.pt or last.pt
    format: str = "onnx"  # onnx | torch.export | timm (a timm hub folder) | safetensors (the weights alone)
    output: str | None = None  # the file (timm: folder) to write; null: beside the checkpoint, named after it
    weights: str = "auto"  # auto (the EMA weights when the checkpoint has them) | ema | raw
    opset: int = 18  # the ONNX opset (format=onnx)
    atol: float = 1e-4  # the largest |exported - PyTorch| logit that the check after the export accepts

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format '{self.format}' (format); choose one of {', '.join(FORMATS)}")
        if self.weights not in WEIGHTS:
            raise ConfigError(f"weights={self.weights}: choose one of {', '.join(WEIGHTS)}")
        if self.opset < 14:  # scaled_dot_product_attention needs 14
            raise ConfigError(f"opset must be >= 14, got {self.opset}")
        if not self.atol > 0:
            raise ConfigError(f"atol must be positive, got {self.atol}")
        check_checkpoint(self.checkpoint)
        check_output(self.output, "output", folder=self.format == "timm")


def register_schemas() -> None:
    """Register the entry points' schemas with Hydra's ConfigStore (``<entry>_schema``), the base of their YAML."""
    store = ConfigStore.instance()
    for name, node in (("train", TrainConfig), ("evaluate", EvaluateConfig), ("predict", PredictConfig),
                       ("visualize", VisualizeConfig), ("export", ExportConfig)):
        store.store(name=f"{name}_schema", node=node)


register_schemas()


def _required(key: str) -> Any:
    """``${required:KEY}`` in a recipe: KEY must be given on the command line. (A YAML ``???`` cannot say so
    here: merged over a schema's default, OmegaConf keeps the default.)"""
    raise ConfigError(f"{key} has no value; set it on the command line ({key}=...)")


if not OmegaConf.has_resolver("required"):
    OmegaConf.register_new_resolver("required", _required)


def to_config(cfg: DictConfig | T, schema: type[T] = TrainConfig) -> T:
    """The composed config as plain objects of ``schema`` (a :class:`TrainConfig` by default), every value
    checked; an object already of that type is returned as it is. Hydra's own keys are left out."""
    if isinstance(cfg, schema):
        return cfg
    if OmegaConf.get_type(cfg) is not schema:  # composed without the schema as its base (an older config)
        node = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
        base = OmegaConf.structured(schema)
        _add_extra_keys(base, node)  # keys added from the shell (+model.depth=2) stay, as in a composed config
        cfg = OmegaConf.merge(base, node)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # ${required:...}: the resolver's own one-line error, if that is the cause
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, VitrainError):
            cause = cause.__cause__ or cause.__context__
        if cause is None and isinstance(e, MissingMandatoryValue):  # a ??? left: the entry point's one line
            raise
        if cause is None:  # an interpolation that cannot be resolved (${oc.env:NAME} of a variable not set, ...)
            raise ConfigError(f"{e.full_key or 'the config'}: {first_line(e)}; set it, or give the value itself "
                              f"({e.full_key or 'key'}=...)") from None
        raise cause from None
    _refuse_unknown_keys(obj)
    return obj


def _refuse_unknown_keys(obj: Any, prefix: str = "") -> None:
    """A key the schema lacks, added from the shell with ``+`` (``+trainer.epoch=3``, which OmegaConf sets as an
    attribute), is refused by name; a schema with ``extra_keys`` (``ModelConfig``) checks its own."""
    known = [f.name for f in dataclasses.fields(obj)]
    unknown = [k for k in vars(obj) if k not in known]
    if unknown and not hasattr(obj, "extra_keys"):
        raise ConfigError(unknown_key(prefix + unknown[0], known))
    for name in known:
        if dataclasses.is_dataclass(getattr(obj, name)):
            _refuse_unknown_keys(getattr(obj, name), f"{prefix}{name}.")


def _add_extra_keys(base: DictConfig, node: DictConfig) -> None:
    """Give the typed ``base`` the keys of ``node`` its schema lacks (a merge alone refuses them)."""
    for key, value in node.items():
        if key not in base:
            with open_dict(base):
                base[key] = value
        elif isinstance(value, DictConfig) and isinstance(base[key], DictConfig):
            _add_extra_keys(base[key], value)


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose the real training config with command-line style overrides, without running Hydra's app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def ensure_writable(path: str | Path, key: str) -> None:
    """Create ``path`` and write a probe file in it, or raise a one-line error naming ``key``."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise VitrainError(f"cannot write to {path} ({e.strerror}); set {key} to a writable folder") from e


class CheckOutputFolder(Callback):
    """Hydra callback: the run (or sweep) folder must be writable before the job starts. A run folder it makes is
    noted, so that a run refused at start takes it away again (:func:`vitrain.runfolder.discard_unused`)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from vitrain import runfolder

        runfolder.note_new(config.hydra.run.dir)
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(path: str, key: str) -> None:
        try:
            ensure_writable(path, key)
        except VitrainError as e:  # Hydra would print a traceback: one line, and stop
            fail(str(e))


class LockRunFolder(Callback):
    """Hydra callback: take the run folder's lock (:mod:`vitrain.runfolder`) before Hydra writes ``.hydra/`` and
    the log into it, so that a second run into a folder in use is refused before it touches anything there.
    Under torchrun, rank 0 holds it. Given back at the end of the run, or by the kernel when the process dies."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from vitrain import runfolder

        if torchrun_world().rank == 0:
            try:
                runfolder.acquire(config.hydra.run.dir)
            except VitrainError as e:
                fail(str(e))

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        from vitrain import runfolder

        runfolder.release(config.hydra.run.dir)


class TorchrunRunFolder(Callback):
    """Hydra callback for a run started by torchrun, before Hydra makes the run folder: join the process
    group, give every rank rank 0's run folder (the default one is named after the start time, which
    can differ between the processes), and leave ``.hydra/`` and the log file to rank 0; the other ranks
    log only warnings and errors, to the console."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        if torchrun_world().size == 1:
            return
        from vitrain.distributed import broadcast_object, init_distributed

        try:
            world, _ = init_distributed(config.trainer.device, config.trainer.dist_backend)
        except VitrainError as e:
            fail(str(e))
        with read_write(config):
            config.hydra.run.dir = broadcast_object(str(config.hydra.run.dir))
            if not world.is_main:
                config.hydra.output_subdir = None
                config.hydra.job_logging = console_logging(f"[rank {world.rank}]")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if torchrun_world().size > 1:  # every rank would run its own sweep, in its own folder
            fail("a multirun (-m) cannot run under torchrun; start one torchrun per run of the sweep", rank=0)


def console_logging(prefix: str, level: str = "WARNING") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` that writes records of ``level`` and above to stderr, no file."""
    line = f"{prefix}[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"plain": {"format": line}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain",
                                     "stream": "ext://sys.stderr"}},
            "root": {"level": level, "handlers": ["console"]}}
