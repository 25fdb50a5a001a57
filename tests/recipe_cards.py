"""Recipe cards: every experiment in configs/experiment/ against the source it follows, knob by knob.

A card row is a key of the composed config (``optimizer.lr``) or a number resolved from it at the source's run
(``resolved.lr``: the learning rate at that run's global batch; see :func:`resolve`), the source's value, where
the source sets it, and, where vitrain deliberately differs, vitrain's value and why. Rows without a key record
a difference of behaviour that no config value shows. tests/test_recipes.py holds every row against the config,
so drift fails the suite, and checks that docs/finetuning.md shows each card as :func:`render` writes it.

Sources: facebookresearch/deit at 7e160fe (main.py, engine.py, samplers.py, augment.py, datasets.py, models.py,
models_v2.py, README_deit.md, README_revenge.md); NVIDIA/apex optimizers/fused_lamb.py; facebookresearch/mae
util/lr_decay.py; timm 1.0.31 (DeiT pins timm 0.3.2, whose scheduler code was not read here);
google-research/vision_transformer at c6de1e5 (README.md and, under vit_jax/, configs/common.py, configs/vit.py,
configs/models.py, train.py, utils.py, input_pipeline.py, checkpoint.py, models_vit.py); TensorFlow's
SampleDistortedBoundingBox op defaults (its API reference). vitrain's own recipes cite the vitrain document that
states their values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vitrain.config import TrainConfig
from vitrain.data import EpochSampler
from vitrain.models import create_model
from vitrain.optim import layer_ids, optimizer_and_schedule

IMAGENET_1K = 1_281_167  # ImageNet-1k training images
SAME = "same"


@dataclass(frozen=True)
class Knob:
    """One row: ``key`` (None: a behaviour no key shows), the source's value and where it is set; ``ours`` and
    ``why`` where vitrain deliberately differs."""

    key: str | None
    source: Any
    where: str
    ours: Any = SAME
    why: str = ""


@dataclass(frozen=True)
class Run:
    """The source's run that the ``resolved.*`` numbers are taken at."""

    global_batch: int  # images per optimizer step, all processes together
    world_size: int  # processes
    images: int  # training images


@dataclass(frozen=True)
class Card:
    overrides: tuple[str, ...]  # the command line that composes the recipe (its required keys filled in)
    source: str  # what the card is held against
    run: Run
    knobs: tuple[Knob, ...] = field(default_factory=tuple)


def resolve(cfg: TrainConfig, run: Run) -> dict[str, Any]:
    """The numbers a run of ``cfg`` reaches at ``run``: the peak learning rate of the ``optimizer.lr`` group
    (``lr``), the first step's (``first_lr``), the floor at the last step (``floor``), the optimizer steps of the
    whole run (``steps``) and the first (0-based) one at the peak rate (``peak_step``: the end of warmup), the
    optimizer's eps, the images of an epoch over all ranks (``epoch_images``), and with layer decay the top
    block's and final norm's rates. The schedule does not depend on the model, so a vit_nano carries it."""
    sampler = EpochSampler(run.images, repeats=cfg.data.aug_repeats, world_size=run.world_size)
    epoch_images = len(sampler)
    steps = epoch_images // run.global_batch if cfg.data.mixes else math.ceil(epoch_images / run.global_batch)
    model = create_model("vit_nano_patch4_16", num_classes=10)
    opt, schedule = optimizer_and_schedule(model, cfg.optimizer, cfg.scheduler, run.global_batch, steps,
                                           cfg.trainer.epochs)
    lrs = {g["name"]: g["initial_lr"] for g in opt.param_groups}
    peak, factor = lrs["head"], schedule.lr_lambdas[0]
    top = max(layer_ids(model).values())  # the final norm; the last block is top - 1
    total = cfg.trainer.epochs * steps
    peak_step = next(s for s in range(total + 1) if factor(s) >= 1 - 1e-12 or s == total)
    return {"lr": peak, "first_lr": peak * factor(0), "floor": peak * factor(total), "steps": total,
            "peak_step": peak_step, "eps": opt.defaults.get("eps"), "epoch_images": epoch_images,
            "top_block_lr": lrs.get(f"backbone_layer{top - 1}"),
            "final_norm_lr": lrs.get(f"backbone_layer{top}_no_decay")}


def value(cfg: TrainConfig, resolved: dict[str, Any], key: str) -> Any:
    """``key`` of the composed config, or ``resolved.<name>``."""
    if key.startswith("resolved."):
        return resolved[key.removeprefix("resolved.")]
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return list(node) if isinstance(node, (list, tuple)) else node


def fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v.is_integer():
            return f"{v:.1f}"
        if abs(v) < 0.01:  # 5e-4, 1e-6: as the sources write them
            mantissa, exponent = f"{v:.6e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)


def render(name: str, card: Card) -> str:
    """The card as docs/finetuning.md shows it."""
    run = card.run
    lines = [f"**`experiment={name}`** against {card.source}. `resolved.*`: at {run.global_batch:,} images a step "
             f"over {run.world_size} process{'es' if run.world_size > 1 else ''}, {run.images:,} training images.",
             "", "| knob | source | where | vitrain | why it differs, notes |", "| --- | --- | --- | --- | --- |"]
    for k in card.knobs:
        key = f"`{k.key}`" if k.key else "(behaviour)"
        ours = SAME if k.ours == SAME else fmt(k.ours)
        lines.append(f"| {key} | {fmt(k.source)} | {k.where} | {ours} | {k.why} |")
    return "\n".join(lines)


# --- DeiT (facebookresearch/deit main.py; README_deit.md's DeiT-S: 4 GPUs x 256 images) ---

_SCHEDULE_STEPPING = (
    Knob(None, "per epoch: timm's CosineLRScheduler (`t_in_epochs=True`) over all epochs, warmup replacing the "
         "first 5; `lr_scheduler.step(epoch)` after each epoch, so epoch e >= 1 runs at the rate of e - 1 (epochs "
         "0 and 1 both at `--warmup-lr`)", "main.py", "every optimizer step: warmup to the peak, then cosine over "
         "the remaining epochs",
         "a smooth warmup without the one-epoch lag; in warmup DeiT's rate trails by up to 40% of the peak, after "
         "it the two differ by at most 1.1% of the peak at 300 epochs, 0.4% at 800 (test_recipes.py)"),
)


DEIT = Card(
    ("experiment=deit_recipe",),
    "facebookresearch/deit `main.py` defaults and README_deit.md's DeiT-S run (`--model deit_small_patch16_224 "
    "--batch-size 256`, 4 GPUs)",
    Run(1024, 4, IMAGENET_1K),
    (
        Knob("model.name", "deit_small_patch16_224", "README_deit.md `--model`"),
        Knob("model.drop_path", 0.1, "main.py `--drop-path`"),
        Knob("model.drop_rate", 0.0, "main.py `--drop`"),
        Knob("trainer.epochs", 300, "main.py `--epochs`"),
        Knob("data.batch_size", 256, "README_deit.md `--batch-size` (x 4 GPUs)", 64,
             "per process; the lr follows the global batch (the source's run: data.batch_size=256 on 4 processes)"),
        Knob("optimizer.name", "adamw", "main.py `--opt`"),
        Knob("resolved.eps", 1e-8, "main.py `--opt-eps`"),
        Knob("optimizer.lr", 5e-4, "main.py `--lr`"),
        Knob("optimizer.scale_lr", True, "main.py `linear_scaled_lr` unless `--unscale-lr`"),
        Knob("optimizer.lr_base_batch", 512, "main.py `/ 512.0`"),
        Knob("resolved.lr", 1e-3, "main.py: 5e-4 x 256 x 4 / 512"),
        Knob("optimizer.weight_decay", 0.05, "main.py `--weight-decay`"),
        Knob("scheduler.name", "cosine", "main.py `--sched`"),
        Knob("scheduler.warmup_epochs", 5.0, "main.py `--warmup-epochs`"),
        Knob("scheduler.warmup_lr", 1e-6, "main.py `--warmup-lr`"),
        Knob("resolved.first_lr", 1e-6, "timm CosineLRScheduler `warmup_lr_init`"),
        Knob("scheduler.min_lr", 1e-5, "main.py `--min-lr`"),
        Knob("resolved.floor", 1e-5, "timm CosineLRScheduler `lr_min`"),
        *_SCHEDULE_STEPPING,
        Knob("data.aug_repeats", 3, "main.py `--repeated-aug` (samplers.py RASampler `num_repeats=3`)"),
        Knob("resolved.epoch_images", 1_281_024, "samplers.py `num_selected_samples`: floor(N // 256 * 256 / 4) "
             "per rank, x 4"),
        Knob(None, "RandomSampler, no repetition, without `--distributed`", "main.py", "repeated in one process too",
             "vitrain's batches do not depend on the number of processes: one process with the global batch sees "
             "the batches 4 ranks see"),
        Knob("data.train_crop", "rrc", "datasets.py `create_transform(is_training=True)`"),
        Knob("data.scale", [0.08, 1.0], "timm `create_transform` default"),
        Knob("data.interpolation", "bicubic", "main.py `--train-interpolation`"),
        Knob("data.crop_pct", 0.875, "main.py `--eval-crop-ratio`"),
        Knob("data.auto_augment", "rand-m9-mstd0.5-inc1", "main.py `--aa`"),
        Knob("data.color_jitter", 0.3, "main.py `--color-jitter`", 0.0,
             "timm's create_transform ignores it under `--aa`, and vitrain turns jitter off under a policy: "
             "neither jitters"),
        Knob("data.re_prob", 0.25, "main.py `--reprob`"),
        Knob("data.mixup", 0.8, "main.py `--mixup`"),
        Knob("data.cutmix", 1.0, "main.py `--cutmix`"),
        Knob("data.mixup_prob", 1.0, "main.py `--mixup-prob`"),
        Knob("data.mixup_switch_prob", 0.5, "main.py `--mixup-switch-prob`"),
        Knob("loss.name", "ce", "main.py `SoftTargetCrossEntropy` under mixup"),
        Knob("loss.label_smoothing", 0.1, "main.py `--smoothing` (into `Mixup(label_smoothing=)`)"),
        Knob("trainer.ema", True, "main.py `--model-ema` (on by default)"),
        Knob("trainer.ema_decay", 0.99996, "main.py `--model-ema-decay`"),
        Knob("trainer.grad_clip", None, "main.py `--clip-grad`"),
        Knob("distill.name", "none", "main.py `--distillation-type`"),
    ),
)

# --- DeiT III (README_revenge.md's ImageNet-1k commands: 8 GPUs x 256 images) ---

_DEIT3_OPTIMIZER = (
    Knob("optimizer.name", "fusedlamb", "`--opt fusedlamb` (apex FusedLAMB)", "lamb",
         "timm's Lamb needs no apex; as FusedLAMB's defaults it clips the global gradient norm to 1.0 "
         "(`max_grad_norm=1.0`) and leaves the trust ratio off where weight decay is 0 (`use_nvlamb=False`, "
         "timm `always_adapt=False`)"),
    Knob("resolved.eps", 1e-8, "main.py `--opt-eps` (timm's Lamb and apex's FusedLAMB default to 1e-6)"),
    Knob("optimizer.scale_lr", False, "`--unscale-lr`"),
    Knob("optimizer.lr_base_batch", None, "`--unscale-lr`"),
    Knob("optimizer.weight_decay", 0.05, "`--weight-decay 0.05`"),
    Knob("scheduler.name", "cosine", "`--sched cosine`"),
    Knob("scheduler.warmup_epochs", 5.0, "`--warmup-epochs 5`"),
    Knob("scheduler.warmup_lr", 1e-6, "`--warmup-lr 1e-6`"),
    Knob("resolved.first_lr", 1e-6, "timm CosineLRScheduler `warmup_lr_init`"),
    Knob("scheduler.min_lr", 1e-5, "main.py `--min-lr` (not set by the command)"),
    Knob("resolved.floor", 1e-5, "timm CosineLRScheduler `lr_min`"),
    *_SCHEDULE_STEPPING,
)

_DEIT3_DATA_LOSS = (
    Knob("trainer.epochs", 800, "`--epochs 800`"),
    Knob("data.batch_size", 256, "`--batch 256` (x 8 GPUs)", 64,
         "per process; the lr does not follow the batch (the source's run: data.batch_size=256 on 8 processes)"),
    Knob("data.auto_augment", "3a", "`--ThreeAugment` (augment.py `new_data_aug_generator`)", SAME,
         "timm's `3a` policy; its equality with augment.py's transform is not checked here"),
    Knob("data.color_jitter", 0.3, "`--color-jitter 0.3`"),
    Knob("data.train_crop", "rrc", "augment.py `RandomResizedCropAndInterpolation`"),
    Knob("data.scale", [0.08, 1.0], "augment.py `scale=(0.08, 1.0)`"),
    Knob("data.interpolation", "bicubic", "augment.py `interpolation='bicubic'`"),
    Knob("data.crop_pct", 1.0, "`--eval-crop-ratio 1.0`"),
    Knob("data.re_prob", 0.0, "`--reprob 0.0`"),
    Knob("data.mixup", 0.8, "`--mixup .8`"),
    Knob("data.cutmix", 1.0, "`--cutmix 1.0`"),
    Knob("data.aug_repeats", 3, "`--repeated-aug`"),
    Knob("resolved.epoch_images", 1_281_024, "samplers.py `num_selected_samples` per rank, x 8"),
    Knob("loss.name", "bce", "`--bce-loss` (main.py `BCEWithLogitsLoss`)"),
    Knob("loss.label_smoothing", 0.0, "`--smoothing 0.0`"),
    Knob("loss.bce_target_thresh", 0.0, "engine.py `targets.gt(0.0)` with `--bce-loss`"),
    Knob("model.drop_rate", 0.0, "`--drop 0.0`"),
    Knob("trainer.ema", True, "main.py `--model-ema` (on by default; the commands do not turn it off)"),
    Knob("trainer.ema_decay", 0.99996, "main.py `--model-ema-decay`"),
    Knob("trainer.grad_clip", None, "main.py `--clip-grad`"),
)

DEIT3 = Card(
    ("experiment=deit3_recipe",),
    "facebookresearch/deit README_revenge.md's ImageNet-1k ViT-S command and `main.py`'s defaults",
    Run(2048, 8, IMAGENET_1K),
    (
        Knob("model.name", "deit3_small_patch16_224", "`--model deit_small_patch16_LS` (models_v2.py)"),
        Knob("model.drop_path", 0.05, "`--drop-path 0.05`"),
        Knob("model.img_size", 224, "`--input-size 224`"),
        Knob("optimizer.lr", 4e-3, "`--lr 4e-3`"),
        Knob("resolved.lr", 4e-3, "`--unscale-lr`: 4e-3 at any batch"),
        *_DEIT3_OPTIMIZER,
        *_DEIT3_DATA_LOSS,
    ),
)

DEIT3_BASE = Card(
    ("experiment=deit3_recipe_base",),
    "facebookresearch/deit README_revenge.md's ImageNet-1k ViT-B command and `main.py`'s defaults",
    Run(2048, 8, IMAGENET_1K),
    (
        Knob("model.name", "deit3_base_patch16_224", "`--model deit_base_patch16_LS` (models_v2.py)"),
        Knob("model.drop_path", 0.2, "`--drop-path 0.2`"),
        Knob("model.img_size", 192, "`--input-size 192`"),
        Knob("optimizer.lr", 3e-3, "`--lr 3e-3`"),
        Knob("resolved.lr", 3e-3, "`--unscale-lr`: 3e-3 at any batch"),
        *_DEIT3_OPTIMIZER,
        *_DEIT3_DATA_LOSS,
        Knob(None, "then fine-tuned at 224: `--input-size 224 --epochs 20 --opt adamw --lr 1e-5`",
             "README_revenge.md, 'finetuning for ViT-B, L and H at resolution 224x224'", "pretraining only",
             "the fine-tuning stage is not a recipe here"),
    ),
)

# --- Fine-tuning ---

FINETUNE_IMAGEFOLDER = Card(
    ("experiment=finetune_imagefolder", "data.root=/tmp/photos"),
    "timm's ImageNet transforms and MAE/BEiT layer-wise decay (facebookresearch/mae util/lr_decay.py); the other "
    "values are vitrain's (docs/finetuning.md)",
    Run(32, 1, 900),
    (
        Knob("model.pretrained", True, "vitrain: timm's ImageNet weights"),
        Knob("data.name", "imagefolder", "vitrain: `DIR/train/<class>/*`, `DIR/val/<class>/*`"),
        Knob("data.train_crop", "rrc", "timm `create_transform(is_training=True)`"),
        Knob("data.scale", [0.08, 1.0], "timm `create_transform` default"),
        Knob("data.crop_pct", None, "timm `resolve_data_config`: the weights' `pretrained_cfg` (null: resolved "
             "from the weights, vitrain/build.py `resolve_preprocess`)"),
        Knob("data.mean", None, "the weights' own (null: as `data.crop_pct`)"),
        Knob("data.std", None, "the weights' own (null: as `data.crop_pct`)"),
        Knob("data.val_fraction", 0.1, "vitrain: model selection off the test set"),
        Knob("optimizer.lr", 1e-3, "vitrain: the new head"),
        Knob("optimizer.backbone_lr", 1e-4, "vitrain: the backbone's top layer (the final norm)"),
        Knob("optimizer.layer_decay", 0.75, "BEiT (Bao et al., 2021) Table 12: 0.65-0.75 for ViT-B (the paper is "
             "not checked here)"),
        Knob("resolved.final_norm_lr", 1e-4, "mae util/lr_decay.py `get_layer_id_for_vit`: the final norm at "
             "`num_layers`, scale 1", SAME,
             "timm's `param_groups_layer_decay` gives it the top block's scale (7.5e-5); vitrain follows BEiT/MAE"),
        Knob("resolved.top_block_lr", 7.5e-5, "mae util/lr_decay.py: `layer_decay ** 1`"),
        Knob("optimizer.weight_decay", 0.05, "vitrain"),
        Knob("scheduler.warmup_epochs", 1.0, "vitrain"),
        Knob("resolved.floor", 1e-5, "vitrain: scheduler=cosine's `min_lr_ratio` 0.01"),
        Knob("loss.label_smoothing", 0.1, "vitrain"),
        Knob("model.drop_path", 0.1, "vitrain"),
        Knob("data.batch_size", 32, "vitrain"),
        Knob("trainer.epochs", 10, "vitrain"),
    ),
)

# --- The ViT paper's fine-tuning (google-research/vision_transformer `vit.py:b16,cifar10`, one device) ---

_VIT = "google-research/vision_transformer"

FINETUNE_CIFAR10 = Card(
    ("experiment=finetune_cifar10",),
    f"{_VIT} at c6de1e5, `python -m vit_jax.main --config=vit_jax/configs/vit.py:b16,cifar10` (README.md, "
    "'Fine-tuning a model'); files under vit_jax/",
    Run(512, 1, 49_000),
    (
        Knob("model.name", "ViT-B_16 of gs://vit_models/imagenet21k", "README.md `--config.pretrained_dir`; "
             "configs/models.py `get_b16_config`", "vit_base_patch16_224.orig_in21k",
             "timm's port of those weights (hf_hub_id timm/vit_base_patch16_224.orig_in21k, no head); its equality "
             "with the .npz is not checked here"),
        Knob("model.pretrained", True, "train.py `checkpoint.load_pretrained`"),
        Knob("model.img_size", 384, "configs/common.py `DATASET_PRESETS['cifar10']` `'crop': 384`", SAME,
             "set explicitly: null would follow the weights' 224"),
        Knob(None, "the 14x14 position grid zoomed to 24x24 by `scipy.ndimage.zoom(order=1)` (linear)",
             "checkpoint.py `interpolate_posembed`", "timm's `resample_abs_pos_embed` (bicubic, antialiased)",
             "vitrain resamples every position table one way (vitrain/models/convert.py); the two differ slightly"),
        Knob(None, "a zero-initialised head: kernel and bias 0", "models_vit.py `kernel_init=nn.initializers.zeros`; "
             "checkpoint.py `load_pretrained` keeps the initial head", "truncated normal (std 0.02), bias 0",
             "not expressible: no config key zero-initialises a head (vitrain/models/heads.py `init_linear`)"),
        Knob("model.drop_rate", 0.0, "configs/models.py `get_b16_config` `dropout_rate = 0.0`"),
        Knob("model.drop_path", 0.0, "models_vit.py: no stochastic depth"),
        Knob("data.name", "cifar10", "configs/vit.py `b16,cifar10`"),
        Knob("data.val_fraction", 0.02, "configs/common.py `'train': 'train[:98%]'`", SAME,
             "the source trains on the first 49,000 images and leaves 1,000 unused; vitrain holds out a stratified, "
             "seeded 2% and chooses best.pt on it"),
        Knob("data.train_crop", "rrc", "input_pipeline.py `tf.image.sample_distorted_bounding_box`, then "
             "`tf.image.resize`"),
        Knob("data.scale", [0.05, 1.0], "input_pipeline.py `area_range=(0.05, 1.0)`"),
        Knob("data.ratio", [0.75, 1.33], "TensorFlow's default `aspect_ratio_range` (input_pipeline.py sets none)"),
        Knob(None, "up to 100 draws, then the whole image; aspect ratio drawn by TensorFlow's op",
             "TensorFlow SampleDistortedBoundingBox `max_attempts` 100", "torchvision's RandomResizedCrop draw "
             "(log-uniform ratio; the device path draws alike)", "the two crop distributions are not compared here"),
        Knob("data.interpolation", "bilinear", "input_pipeline.py `tf.image.resize` (default method)"),
        Knob("data.hflip", True, "input_pipeline.py `tf.image.flip_left_right` with probability 0.5"),
        Knob("data.crop_pct", 1.0, "input_pipeline.py eval: `tf.image.resize(im, [image_size, image_size])`"),
        Knob("data.crop_mode", "squash", "input_pipeline.py eval: `tf.image.resize` to both sides, the aspect not "
             "kept"),
        Knob("data.mean", [0.5, 0.5, 0.5], "input_pipeline.py `(im - 127.5) / 127.5`"),
        Knob("data.std", [0.5, 0.5, 0.5], "input_pipeline.py `(im - 127.5) / 127.5`"),
        Knob("data.mixup", 0.0, "input_pipeline.py: no mixing"),
        Knob("loss.label_smoothing", 0.0, "train.py `cross_entropy_loss` on `tf.one_hot` labels"),
        Knob("data.batch_size", 64, "configs/common.py `batch = 512` / `accum_steps = 8` (one device)"),
        Knob("trainer.accum_steps", 8, "configs/common.py `accum_steps = 8` (utils.py `accumulate_gradient`)"),
        Knob("optimizer.name", "sgd", "train.py `optax.sgd`"),
        Knob("optimizer.momentum", 0.9, "train.py `momentum=0.9`"),
        Knob("optimizer.nesterov", False, "optax.sgd's default (train.py sets none)"),
        Knob(None, "momentum kept in bfloat16", "train.py `accumulator_dtype='bfloat16'`", "float32 (torch.optim.SGD)",
             "not expressible: no config key sets the momentum's dtype"),
        Knob("optimizer.lr", 0.01, "configs/vit.py `if model == 'b16' and dataset == 'cifar10': config.base_lr = "
             "0.01` (configs/common.py `base_lr = 0.03` for the others)"),
        Knob("optimizer.backbone_lr", None, "train.py: one `optax.sgd` over all parameters"),
        Knob("optimizer.lr_base_batch", 512, "configs/common.py `batch = 512`; README.md: a smaller `--config.batch` "
             "with a smaller `--config.base_lr`", SAME, "vitrain reads that as linear: lr x global batch / 512"),
        Knob("resolved.lr", 0.01, "at 512 images a step"),
        Knob("optimizer.weight_decay", 0.0, "train.py `optax.chain(clip_by_global_norm, sgd)`: no decay term"),
        Knob("trainer.grad_clip", 1.0, "configs/common.py `grad_norm_clip = 1.0` (train.py "
             "`optax.clip_by_global_norm`)"),
        Knob("scheduler.name", "cosine", "configs/common.py `decay_type = 'cosine'`"),
        Knob("scheduler.warmup_epochs", "500 steps", "configs/common.py `warmup_steps = 500`", 5.2,
             "vitrain counts warmup in epochs (fractions allowed): ceil(5.2 x 96 steps an epoch) = 500 steps"),
        Knob("resolved.peak_step", 500, "utils.py `lr * jnp.minimum(1., step / warmup_steps)`"),
        Knob("scheduler.warmup_lr", 0.0, "utils.py: `step / warmup_steps` is 0 at step 0"),
        Knob("resolved.first_lr", 0.0, "utils.py `create_learning_rate_schedule` at step 0"),
        Knob("resolved.floor", 0.0, "utils.py `lr * 0.5 * (1. + jnp.cos(jnp.pi * progress))` (`linear_end` is for "
             "linear decay only)"),
        Knob("trainer.epochs", "10,000 steps", "configs/common.py `DATASET_PRESETS['cifar10']` `total_steps`", 104,
             "vitrain trains whole epochs: 10,000 / 96 steps an epoch (ceil(49,000 / 512)) = 104.2, rounded to 104"),
        Knob("resolved.steps", 10_000, "configs/common.py `total_steps`", 9_984,
             "104 x 96: 16 steps (0.16%) fewer; the rate stays within 0.16% of the peak of the source's at every "
             "step (test_recipes.py)"),
        Knob(None, "an endless stream (`data.repeat(None)`), shuffled in a 50,000 buffer, every batch 512 "
             "(`drop_remainder=True`)", "input_pipeline.py `get_data`", "104 reshuffled epochs; an epoch's last "
             "step has 360 images (49,000 - 95 x 512)", "vitrain trains in epochs"),
        Knob(None, "test accuracy every 100 steps and at the last", "train.py `eval_every` (configs/common.py 100)",
             "the 1,000 held-out images each epoch; the test set once at the end, with best.pt",
             "the test set stays out of model selection"),
        Knob("trainer.ema", False, "train.py: no weight averaging"),
    ),
)

# --- vitrain's own recipes ---

FINETUNE_CIFAR10_QUICK = Card(
    ("experiment=finetune_cifar10_quick",),
    "vitrain's own quick fine-tuning recipe, as its header and docs/finetuning.md state it (no upstream file)",
    Run(32, 1, 50_000),
    (
        Knob("model.name", "vit_small_patch16_224", "vitrain: timm's ImageNet ViT-S/16"),
        Knob("model.pretrained", True, "vitrain"),
        Knob("model.img_size", 224, "vitrain: CIFAR-10 resized to 224 (the weights' own size)"),
        Knob("model.drop_path", 0.0, "vitrain: no stochastic depth"),
        Knob("data.name", "cifar10", "vitrain"),
        Knob("data.train_crop", "pad", "vitrain: random crops of the zero-padded image"),
        Knob("data.crop_padding", 4, "vitrain: 4 pixels"),
        Knob("data.hflip", True, "vitrain: flips"),
        Knob("data.crop_pct", 1.0, "vitrain: eval on the whole image"),
        Knob("optimizer.name", "adamw", "vitrain"),
        Knob("optimizer.backbone_lr", 1e-5, "vitrain: backbone lr 1e-5"),
        Knob("optimizer.lr", 1e-3, "vitrain: head lr 1e-3"),
        Knob("optimizer.weight_decay", 0.01, "vitrain: wd 0.01"),
        Knob("scheduler.name", "cosine", "vitrain: cosine"),
        Knob("resolved.first_lr", 1e-3, "vitrain: no warmup"),
        Knob("resolved.floor", 0.0, "vitrain: annealed to zero"),
        Knob("data.batch_size", 32, "vitrain: batch 32"),
        Knob("trainer.epochs", 10, "vitrain: 10 epochs"),
    ),
)

LINEAR_PROBE = Card(
    ("experiment=linear_probe",),
    "vitrain's linear probe (docs/finetuning.md)",
    Run(32, 1, 1437),
    (
        Knob("model.pretrained", True, "vitrain"),
        Knob("trainer.freeze_backbone", True, "docs/finetuning.md: only the head trains"),
        Knob("model.drop_path", 0.0, "vitrain: the frozen backbone runs as in inference"),
        Knob("optimizer.lr", 1e-3, "vitrain"),
        Knob("optimizer.weight_decay", 0.0, "vitrain"),
        Knob("resolved.first_lr", 1e-3, "no warmup"),
        Knob("trainer.epochs", 10, "vitrain"),
    ),
)

PROBE_IMAGEFOLDER = Card(
    ("experiment=probe_imagefolder", "data.root=/tmp/photos"),
    "vitrain's linear probe on cached features (the recipe file's header; no upstream recipe)",
    Run(64, 1, 500),
    (
        Knob("model.name", "vit_small_patch16_224", "the header: an ImageNet ViT-S/16"),
        Knob("model.pretrained", True, "the header: an ImageNet ViT-S/16"),
        Knob("model.img_size", 224, "the header: at 224 (the weights' own size)"),
        Knob("trainer.freeze_backbone", True, "the header: frozen"),
        Knob("trainer.cache_features", True, "the header: features cached beside the data"),
        Knob("trainer.feature_views", 2, "the header: 2 augmented views of each training photo"),
        Knob("optimizer.lr", 1e-3, "vitrain: the head"),
        Knob("optimizer.weight_decay", 0.0, "vitrain: no weight decay on a linear classifier"),
        Knob("resolved.first_lr", 1e-3, "no warmup"),
        Knob("trainer.epochs", 30, "vitrain"),
    ),
)

# --- The digits experiments (docs/finetuning.md "Transfer on digits", docs/distillation.md) ---

DIGITS_PRETRAIN = Card(
    ("experiment=digits_pretrain",),
    "docs/finetuning.md, Transfer on digits: step 1",
    Run(32, 1, 719),
    (
        Knob("model.name", "vit_nano_patch4_16", "docs/finetuning.md"),
        Knob("model.pretrained", False, "docs/finetuning.md: from scratch"),
        Knob("data.name", "digits", "docs/finetuning.md: scikit-learn's handwritten digits"),
        Knob("data.classes", [0, 1, 2, 3, 4], "docs/finetuning.md: the digits 0-4"),
        Knob("trainer.epochs", 50, "docs/finetuning.md: 50 epochs"),
        Knob("resolved.lr", 1e-3, "README.md: AdamW lr 1e-3"),
    ),
)

DIGITS_FINETUNE = Card(
    ("experiment=digits_finetune", "model.checkpoint=/tmp/pre.pt"),
    "docs/finetuning.md, Transfer on digits: step 2",
    Run(32, 1, 718),
    (
        Knob("model.name", "vit_nano_patch4_16", "docs/finetuning.md: the digits_pretrain model"),
        Knob("data.name", "digits", "docs/finetuning.md"),
        Knob("data.classes", [5, 6, 7, 8, 9], "docs/finetuning.md: the digits 5-9, relabelled 0-4"),
        Knob("model.reset_head", True, "docs/finetuning.md: a fresh head"),
        Knob("optimizer.lr", 1e-3, "docs/finetuning.md: head 1e-3"),
        Knob("optimizer.backbone_lr", 3e-4, "docs/finetuning.md: backbone 3e-4"),
        Knob("optimizer.weight_decay", 0.05, "docs/finetuning.md: weight decay 0.05"),
        Knob("resolved.first_lr", 1e-3, "docs/finetuning.md: cosine without warmup"),
        Knob("data.batch_size", 32, "docs/finetuning.md: batch 32"),
        Knob("trainer.epochs", 3, "docs/finetuning.md: 69 steps (3 ep)"),
    ),
)

DIGITS_SCRATCH = Card(
    ("experiment=digits_scratch",),
    "docs/finetuning.md, Transfer on digits: the baseline",
    Run(32, 1, 718),
    (
        Knob("model.name", "vit_nano_patch4_16", "docs/finetuning.md: the same model"),
        Knob("model.pretrained", False, "docs/finetuning.md: from scratch"),
        Knob("model.checkpoint", None, "docs/finetuning.md: from scratch"),
        Knob("data.name", "digits", "docs/finetuning.md"),
        Knob("data.classes", [5, 6, 7, 8, 9], "docs/finetuning.md"),
        Knob("optimizer.lr", 1e-3, "docs/finetuning.md: from scratch, 1e-3"),
        Knob("optimizer.backbone_lr", None, "docs/finetuning.md: one rate"),
        Knob("resolved.first_lr", 1e-3, "docs/finetuning.md: cosine without warmup"),
        Knob("trainer.epochs", 3, "docs/finetuning.md: the same budget as digits_finetune"),
    ),
)

DIGITS_TEACHER = Card(
    ("experiment=digits_teacher",),
    "docs/distillation.md, DeiT distillation on digits: the teacher",
    Run(32, 1, 1437),
    (
        Knob("model.source", "timm", "docs/distillation.md: timm's ResNet-18"),
        Knob("model.name", "resnet18", "docs/distillation.md"),
        Knob("model.img_size", 32, "docs/distillation.md: digits upsampled to 32x32"),
        Knob("data.name", "digits", "docs/distillation.md"),
        Knob("trainer.epochs", 15, "docs/distillation.md: 15 epochs"),
    ),
)

DIGITS_DISTILL = Card(
    ("experiment=digits_distill", "distill.teacher.checkpoint=/tmp/teacher.pt"),
    "docs/distillation.md, DeiT distillation on digits: the students",
    Run(32, 1, 1437),
    (
        Knob("model.name", "deit_nano_distilled_patch4_16", "docs/distillation.md"),
        Knob("data.name", "digits", "docs/distillation.md"),
        Knob("distill.name", "hard", "docs/distillation.md (soft and none: the other arms)"),
        Knob("distill.teacher.name", "resnet18", "docs/distillation.md"),
        Knob("distill.teacher.img_size", 32, "docs/distillation.md: the batch resized to 32x32"),
        Knob("distill.alpha", 0.5, "docs/distillation.md: alpha 0.5"),
        Knob("distill.tau", 1.0, "docs/distillation.md: tau 1"),
        Knob("trainer.epochs", 40, "docs/distillation.md: 40 epochs"),
    ),
)

CARDS: dict[str, Card] = {
    "deit_recipe": DEIT, "deit3_recipe": DEIT3, "deit3_recipe_base": DEIT3_BASE,
    "finetune_imagefolder": FINETUNE_IMAGEFOLDER, "finetune_cifar10": FINETUNE_CIFAR10,
    "finetune_cifar10_quick": FINETUNE_CIFAR10_QUICK, "linear_probe": LINEAR_PROBE,
    "probe_imagefolder": PROBE_IMAGEFOLDER,
    "digits_pretrain": DIGITS_PRETRAIN, "digits_finetune": DIGITS_FINETUNE, "digits_scratch": DIGITS_SCRATCH,
    "digits_teacher": DIGITS_TEACHER, "digits_distill": DIGITS_DISTILL,
}
