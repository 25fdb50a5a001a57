"""``DataConfig``: the schema of the ``data`` config group (``configs/data/*.yaml``).

Each key has its type and default here; a YAML file holds only its choices. Values are checked when the
config becomes this object, before any data set is opened.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vitrain.errors import ConfigError

MAX_IMAGE_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS, its decompression-bomb guard
CROP_MODES = ("center", "squash", "border")  # timm's eval crops (transforms_imagenet_eval)
AUTO_AUGMENT = ("original", "originalr", "v0", "v0r", "3a")  # timm's AutoAugment policies (3a: DeiT III)
TRIVIAL_AUGMENT = ("trivialaugment", "ta_wide")
POLICY_FAMILIES = ("rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w3 (AugMix), original, originalr, v0, v0r "
                   "(AutoAugment), 3a (DeiT III's 3-Augment), trivialaugment (TrivialAugment Wide)")


def check_policy(policy: str) -> None:
    """``data.auto_augment`` names a family timm or torchvision builds, or a one-line ConfigError listing them."""
    if not (policy.startswith(("rand", "augmix")) or policy in AUTO_AUGMENT or policy in TRIVIAL_AUGMENT):
        raise ConfigError(f"data.auto_augment='{policy}' is not an augmentation policy; use one of {POLICY_FAMILIES}")


DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "filelist", "webdataset", "hf")
DECODERS = ("cpu", "device")
PIPELINES = ("auto", "gpu", "cpu")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
TRAIN_CROPS = ("pad", "rrc")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PREPROCESS_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")  # what the starting weights may decide
FALLBACK = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center"}  # the last resort


@dataclass
class Preprocess:
    """The ``data.scratch`` keys: a data set's own normalization and eval resize (its YAML's), for training without
    pretrained weights; null keys fall back to ImageNet's mean and std, bilinear, no crop, center."""

    mean: list[float] | None = None  # per-channel normalization mean
    std: list[float] | None = None  # per-channel normalization std
    interpolation: str | None = None  # resize filter: bilinear | bicubic | nearest
    crop_pct: float | None = None  # eval: resize to img_size / crop_pct, then center crop img_size
    crop_mode: str | None = None  # eval crop: center | squash | border (as timm's)


@dataclass
class DataConfig:
    """Which images, how they are split, augmented, mixed and batched."""

    name: str = "digits"  # data set: digits | cifar10 | cifar100 | imagefolder | filelist | webdataset | hf
    root: str | None = None  # the folder holding the data (CIFAR archives; imagefolder's train/ and val/, or one
    #   folder of class subfolders split by val_fraction)
    train_list: str | None = None  # filelist: a CSV of path,label rows (paths relative to the CSV's folder)
    val_list: str | None = None  # filelist: the validation CSV; null: hold out val_fraction of train_list
    shards: str | None = None  # webdataset: train shards, a path, brace pattern (a-{000..009}.tar), URL or pipe:
    val_shards: str | None = None  # webdataset: the validation shards
    shuffle_buffer: int = 1000  # webdataset: samples shuffled in a buffer per loader worker (0: shard order only)
    epoch_size: int | None = None  # webdataset: samples in the train shards, for streams without a manifest
    manifest: str | None = None  # webdataset: the shards' manifest.json (counts of the train and val shards,
    #   classes; scripts/make_shards.py writes it), a path or URL (pipe:, http(s)://, s3://, gs://); null: beside them
    storage_options: dict[str, Any] = field(default_factory=dict)  # webdataset: fsspec options for s3:// and gs://
    #   (s3fs, gcsfs: endpoint_url, key, secret, anon, ...); the S3 endpoint also comes from AWS_ENDPOINT_URL
    retry_seconds: float = 120.0  # webdataset: how long a server that does not answer (refused, reset, timeout,
    #   HTTP 429/5xx, throttling) is retried, going on at the byte reached, before the run stops (last.pt is kept)
    skip_corrupt: bool = False  # webdataset, imagefolder, filelist, hf: skip unreadable samples instead of stopping
    #   (each replaced by another of its batch, counted in TensorBoard's data/skipped_corrupt); not data.cache or
    #   data.decode=device, which stop at an unreadable file
    max_image_pixels: int | None = MAX_IMAGE_PIXELS  # refuse larger images as decompression bombs (PIL's default
    #   limit, 89,478,485); raise it for genuine huge images, null: no limit
    path: str | None = None  # hf: a save_to_disk folder, parquet file(s), an image folder, or a hub id
    train_split: str = "train"  # hf: the split to train on
    val_split: str | None = None  # hf: the split to validate on; null: validation or test if there is one
    image_column: str = "image"  # hf: the column holding the images
    label_column: str = "label"  # hf: the column holding the integer labels (a ClassLabel names the classes)
    cache: bool = False  # imagefolder/filelist: decode every image once into a uint8 array file, reused by
    #   later runs, and augment whole batches on the device
    cache_dir: str | None = None  # where the cache goes; null: <root>/.vitrain-cache, or ~/.cache/vitrain
    decode: str = "cpu"  # imagefolder/filelist: cpu (PIL in loader workers) | device (batched JPEG decoding
    #   on the training device: nvJPEG on CUDA)
    download: bool = True  # CIFAR: fetch the archive into root when it is missing (needs network)
    test_fraction: float = 0.2  # digits: share of the images held out for testing (stratified)
    split_seed: int = 0  # seed of the digits train/test split and of train_fraction's choice, whatever the seed
    # mean, std, interpolation, crop_pct: null (auto) takes the starting weights' own values (model.pretrained, or a
    #   model.checkpoint that says them), else data.scratch's (the data set's), else ImageNet's, bilinear, no crop;
    #   a value set here (command line, experiment) always wins. vitrain.build.resolve_preprocess decides, and logs it
    mean: list[float] | None = None  # per-channel normalization mean; null: auto
    std: list[float] | None = None  # per-channel normalization std; null: auto
    scratch: Preprocess = field(default_factory=Preprocess)  # the data set's own mean, std, interpolation and
    #   crop_pct: used for the auto keys when the weights say nothing (training from scratch)
    val_fraction: float = 0.0  # hold out this share of the training images (stratified, seeded) for model
    #   selection; the data set's own eval split then becomes the test set, scored once at the end
    train_crop: str = "pad"  # pad: resize + random crop of the zero-padded image (CIFAR) | rrc: RandomResizedCrop
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # rrc: range of the crop's share of the area
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # rrc: range of the crop's aspect ratio
    crop_pct: float | None = None  # eval: resize to img_size / crop_pct, then center crop img_size (ImageNet: 0.875);
    #   null: auto
    crop_mode: str | None = None  # eval crop, as timm's: center (shorter side to img_size / crop_pct, centre crop) |
    #   squash (both sides to img_size / crop_pct, centre crop) | border (longer side, padded with the mean) |
    #   auto (= null): the weights' own (timm's pretrained_cfg crop_mode), else center
    crop_padding: int = 4  # pad: random crop after zero padding by this many pixels; 0 disables
    hflip: bool = True  # random horizontal flips
    interpolation: str | None = None  # resize filter: bilinear | bicubic | nearest; null: auto
    auto_augment: str | None = None  # rand-m9-mstd0.5-inc1 (DeiT) | augmix-m5-w3 | original | v0 | 3a | trivialaugment
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter (timm --color-jitter); off with auto_augment
    re_prob: float = 0.0  # probability of erasing a random rectangle with noise after normalization (DeiT: 0.25)
    classes: list[int] | None = None  # keep only these class indices, relabelled 0..k-1; null keeps all
    train_fraction: float = 1.0  # keep this share of the training images, the same in every class (seeded)
    aug_repeats: int = 1  # repeated augmentation (DeiT: 3): each image shown this often per epoch, over the ranks
    batch_size: int = 32  # images per step and process
    num_workers: Any = "auto"  # loader processes decoding and augmenting images; auto: the cores this process
    #   may use (shared between torchrun's local processes), at most 16
    pipeline: str = "auto"  # auto (gpu with CUDA for in-memory data) | gpu: batches augmented on the device | cpu
    mixup: float = 0.0  # mixup alpha; > 0 turns mixup on (soft targets, label smoothing folded in)
    cutmix: float = 0.0  # cutmix alpha; > 0 turns cutmix on
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ConfigError(f"unknown data set '{self.name}' (data.name); choose one of {', '.join(DATASETS)}")
        _choice("pipeline", self.pipeline, PIPELINES)
        if isinstance(self.scratch, Mapping):  # a checkpoint's saved data config, read back as plain dicts
            self.scratch = Preprocess(**self.scratch)
        _check_preprocess(self, "")
        _check_preprocess(self.scratch, "scratch.")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.num_workers != "auto" and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ConfigError(f"data.num_workers must be auto or an integer >= 0 (0 loads in the main process), "
                              f"got {self.num_workers}")
        _choice("decode", self.decode, DECODERS)
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ConfigError(f"data.max_image_pixels must be positive (null: no limit), got {self.max_image_pixels}")
        self._check_sources()
        if self.crop_padding < 0:
            raise ConfigError(f"data.crop_padding must be >= 0 (0 disables), got {self.crop_padding}")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"data.train_fraction must be in (0, 1], got {self.train_fraction}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1) (0: no validation split), got {self.val_fraction}")
        _choice("train_crop", self.train_crop, TRAIN_CROPS)
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"data.scale must be [min, max] with 0 < min <= max <= 1, got {list(self.scale)}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"data.ratio must be [min, max] with 0 < min <= max, got {list(self.ratio)}")
        if self.aug_repeats < 1:
            raise ConfigError(f"data.aug_repeats must be at least 1 (1: off), got {self.aug_repeats}")
        if self.auto_augment:
            check_policy(self.auto_augment)
        if not 0 <= self.re_prob <= 1:
            raise ConfigError(f"data.re_prob is a probability: set it in [0, 1] (0 disables), got {self.re_prob}")
        for key in ("color_jitter", "mixup", "cutmix"):
            if not getattr(self, key) >= 0:  # NaN too
                raise ConfigError(f"data.{key} must be >= 0 (0 disables), got {getattr(self, key)}")
        for key in ("mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"data.{key} is a probability: set it in [0, 1], got {getattr(self, key)}")

    def resolve_preprocess(self, weights: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, str]]:
        """mean, std, interpolation and crop_pct as a run uses them, each with where it came from: set here (the
        command line, an experiment, the user's YAML: always wins), the starting weights' own (``weights``: some of
        these keys, from :func:`vitrain.models.weights.weights_preprocess`), the data set's (``data.scratch``),
        else ImageNet's mean and std, bilinear, no crop."""
        weights = {k: v for k, v in (weights or {}).items()
                   if v is not None and (k != "interpolation" or v in INTERPOLATIONS)}  # what vitrain can do
        resolved = {}
        for key in PREPROCESS_KEYS:
            for value, source in ((getattr(self, key), "set"), (weights.get(key), "the weights'"),
                                  (getattr(self.scratch, key), "data.scratch"), (FALLBACK[key], "default")):
                if value is not None:
                    resolved[key] = (list(value) if isinstance(value, list | tuple) else value, source)
                    break
        return resolved

    def with_preprocess(self, weights: Mapping[str, Any] | None = None) -> DataConfig:
        """This config with the four keys of :meth:`resolve_preprocess` set (a copy; checked again)."""
        if all(getattr(self, key) is not None for key in PREPROCESS_KEYS):
            return self
        return dataclasses.replace(self, **{k: v for k, (v, _) in self.resolve_preprocess(weights).items()})

    def _check_sources(self) -> None:
        """The keys each data set needs, and the options only some of them have."""
        needs = {"imagefolder": ("root", "DIR, the folder holding train/ and val/, or class folders"),
                 "filelist": ("train_list", "FILE.csv, rows of path,label"),
                 "webdataset": ("shards", "'train-{000000..000009}.tar', local paths, a URL or pipe:"),
                 "hf": ("path", "a save_to_disk folder, parquet files, an image folder or a hub id")}
        if self.name in needs and not getattr(self, needs[self.name][0]):
            key, what = needs[self.name]
            raise ConfigError(f"data.{key} has no value; set it on the command line (data.{key}={what})")
        if (self.cache or self.decode != "cpu") and self.name not in ("imagefolder", "filelist"):
            raise ConfigError(f"data.cache and data.decode=device read image files (imagefolder, filelist), not "
                              f"{self.name}; set data.cache=false data.decode=cpu")
        if self.cache and self.decode != "cpu":
            raise ConfigError("data.cache=true decodes each image once already; set data.decode=cpu")
        if self.cache and self.crop_mode not in (None, "center"):  # after resolve_preprocess: the weights' own too
            raise ConfigError(f"data.cache=true caches centre squares, which data.crop_mode={self.crop_mode} (set, or "
                              f"the weights' own) does not evaluate on; set data.crop_mode=center or data.cache=false")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0 (0: shard order only), got {self.shuffle_buffer}")
        if not self.retry_seconds >= 0:
            raise ConfigError(f"data.retry_seconds must be >= 0 (0: no retry), got {self.retry_seconds}")
        if self.epoch_size is not None and self.epoch_size <= 0:
            raise ConfigError(f"data.epoch_size must be positive, or null to count the shards, got {self.epoch_size}")

    @property
    def workers(self) -> int:
        """``num_workers`` as a number: ``auto`` is the cores this process may use, shared between the
        processes torchrun starts on this machine, at most 16 (beyond that, workers mostly cost memory)."""
        if self.num_workers != "auto":
            return int(self.num_workers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return min(16, cores // max(1, local))

    @property
    def mixes(self) -> bool:
        """Mixup or cutmix is on: the targets become soft, and batches must be full."""
        return self.mixup > 0 or self.cutmix > 0


def _check_preprocess(values: Preprocess | DataConfig, prefix: str) -> None:
    """``data.{prefix}mean``, ``std``, ``interpolation``, ``crop_pct`` and ``crop_mode``, where set (null: auto)."""
    if values.crop_mode == "auto":  # timm's word for it; null in the config
        values.crop_mode = None
    if values.crop_mode is not None:
        _choice(f"{prefix}crop_mode", values.crop_mode, CROP_MODES)
    if values.interpolation is not None:
        _choice(f"{prefix}interpolation", values.interpolation, INTERPOLATIONS)
    if values.crop_pct is not None and not 0 < values.crop_pct <= 1:
        raise ConfigError(f"data.{prefix}crop_pct must be in (0, 1], got {values.crop_pct}")
    if values.mean is not None and values.std is not None and len(values.mean) != len(values.std):
        raise ConfigError(f"data.{prefix}mean and data.{prefix}std need one value per channel each, got "
                          f"{values.mean} and {values.std}")
    if values.std is not None and not all(s > 0 for s in values.std):  # normalization divides by it
        raise ConfigError(f"data.{prefix}std must be positive in every channel, got {list(values.std)}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown data.{key} '{value}'; choose one of {', '.join(choices)}")
