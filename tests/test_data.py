"""Data sets and transforms on real formats: the bundled digits, a CIFAR-format folder, PNG folders;
class subsets and the DeiT augmentations (RandAugment, colour jitter, random erasing)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from conftest import CIFAR10_CLASSES, write_cifar10

from vitrain.data import DataConfig, build_datasets, cpu_loaders
from vitrain.data.datasets import load_cifar, load_digits
from vitrain.data.transforms import build_transforms
from vitrain.errors import ConfigError, DataError

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def test_digits_split_is_fixed_stratified_and_complete() -> None:
    train, test, classes = load_digits()
    assert (len(train), len(test), classes) == (1437, 360, [str(i) for i in range(10)])
    assert np.bincount(test.labels.numpy()).min() >= 35  # stratified: 10 classes of ~36
    train2, _, _ = load_digits()
    torch.testing.assert_close(train.images, train2.images)  # same split every time
    assert train.images.shape[1:] == (3, 8, 8) and train.images.dtype == torch.uint8
    assert train.images.max() == 255 and train.images.min() == 0


def test_digits_split_depends_on_split_seed_only() -> None:
    a, _, _ = load_digits(split_seed=0)
    b, _, _ = load_digits(split_seed=1)
    assert not torch.equal(a.labels, b.labels)


def test_digits_pipeline_upsamples_and_normalizes() -> None:
    digits = DataConfig("digits", mean=MEAN, std=STD, crop_padding=0, hflip=False, interpolation="nearest")
    splits = build_datasets(digits, 16)
    image, label = splits.val[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    raw = splits.val.images[0].float() / 255 * 2 - 1  # 8x8, normalized the same way
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(image, 2), raw)  # each pixel -> 2x2
    assert splits.num_classes == 10 and isinstance(label, int)


def test_train_transform_shifts_but_eval_is_deterministic() -> None:
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[:, 3:5, 3:5] = 255
    train = build_transforms(8, MEAN, STD, train=True, crop_padding=2, hflip=False)
    evaluate = build_transforms(8, MEAN, STD, train=False)
    torch.manual_seed(0)
    outputs = [train(image) for _ in range(20)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])
    assert all(torch.equal(evaluate(image), evaluate(image)) for _ in range(3))
    assert all(o.shape == (3, 8, 8) for o in outputs)


def test_cifar_folder_in_the_archive_layout_loads(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    train, test, classes = load_cifar("cifar10", tmp_path, download=False)
    assert classes == CIFAR10_CLASSES
    assert (len(train), len(test)) == (100, 30)
    first = written["data_batch_1"]
    expected = torch.from_numpy(first["data"][0].reshape(3, 32, 32))  # stored channel-major
    torch.testing.assert_close(train.images[0], expected)
    assert train.labels[:20].tolist() == first["labels"]
    assert test.labels.tolist() == written["test_batch"]["labels"]


def test_cifar_through_build_datasets_resizes(cifar10_root: Path) -> None:
    splits = build_datasets(DataConfig("cifar10", mean=MEAN, std=STD, root=cifar10_root, download=False), 48)
    assert splits.train[0][0].shape == (3, 48, 48)
    assert splits.class_names == CIFAR10_CLASSES


def test_cifar_missing_without_download_says_where(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_cifar("cifar10", tmp_path / "nowhere", download=False)
    message = str(e.value)
    assert "\n" not in message
    assert f"data.root={tmp_path / 'nowhere'}" in message and "cifar-10-python.tar.gz" in message


def test_cifar_download_failure_says_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline: torchvision's download raises; the user gets one line with the folder and the fix."""
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    with pytest.raises(DataError, match=r"cifar100 not found under data.root=.*download failed: URLError.*"
                                        r"cifar-100-python.tar.gz"):
        load_cifar("cifar100", tmp_path, download=True)


def test_corrupt_cifar_batch_is_a_clear_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"x": 1})[:10])
    with pytest.raises(DataError, match="cannot read .*data_batch_3.*corrupt"):
        load_cifar("cifar10", tmp_path, download=False)


def test_imagefolder_loads_pngs(imagefolder_root: Path) -> None:
    splits = build_datasets(DataConfig("imagefolder", mean=MEAN, std=STD, root=imagefolder_root), 32)
    assert splits.class_names == ["circle", "square"]
    assert (len(splits.train), len(splits.val)) == (12, 4)
    image, label = splits.val[3]
    assert image.shape == (3, 32, 32) and label == 1  # 40x30 PNG -> resized and center-cropped


def test_imagefolder_missing_split(imagefolder_root: Path) -> None:
    import shutil

    shutil.rmtree(imagefolder_root / "val")
    with pytest.raises(DataError, match=r"no images under .*val .*<class_name>"):
        build_datasets(DataConfig("imagefolder", mean=MEAN, std=STD, root=imagefolder_root), 32)


def test_an_empty_class_folder_is_named(imagefolder_root: Path) -> None:
    """The message names the class folder(s) without images (and the file names it looks for), not the root."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for image in (imagefolder_root / "train" / "square").iterdir():
        image.unlink()
    (imagefolder_root / "train" / "square" / "notes.txt").write_text("not an image")
    cfg = DataConfig("imagefolder", mean=MEAN, std=STD, root=imagefolder_root)
    with pytest.raises(DataError) as error:
        build_datasets(cfg, 32)
    assert str(error.value) == (f"no image files ({' '.join(IMG_EXTENSIONS)}) in the class folder "
                                f"{imagefolder_root.resolve()}/train/square; add images or remove the empty folder")
    for image in (imagefolder_root / "train" / "circle").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=r"in the class folders .*train/circle, .*train/square; add images or remove "
                                        r"the empty folders$"):
        build_datasets(cfg, 32)


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="unknown data set 'mnist'.*digits, cifar10"):
        build_datasets(DataConfig("mnist", mean=MEAN, std=STD), 32)


def test_loaders_fix_the_order_by_seed() -> None:
    splits = build_datasets(DataConfig("digits", mean=MEAN, std=STD), 16)
    first = [next(iter(cpu_loaders(splits, 8, seed=3)[0]))[1] for _ in range(2)]
    other = next(iter(cpu_loaders(splits, 8, seed=4)[0]))[1]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], other)
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        cpu_loaders(splits, 0)


def _seed(seed: int) -> None:
    """timm's RandAugment and RandomErasing draw from Python's and NumPy's generators, torchvision from torch's."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _noise_image(size: int, low: int = 0, high: int = 256) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(low, high, size=(3, size, size), dtype=np.uint8))


@pytest.mark.parametrize("classes", [[5, 6, 7, 8, 9], [7, 2]])
def test_digits_class_subset_keeps_every_image_of_those_classes_relabelled(classes: list[int]) -> None:
    full = build_datasets(DataConfig("digits", mean=MEAN, std=STD), 8)
    sub = build_datasets(DataConfig("digits", mean=MEAN, std=STD, classes=classes), 8)
    assert sub.class_names == [str(c) for c in classes] and sub.num_classes == len(classes)
    for split in ("train", "val"):
        before, after = getattr(full, split), getattr(sub, split)
        counts = np.bincount(before.labels.numpy(), minlength=10)
        assert np.bincount(after.labels.numpy()).tolist() == counts[classes].tolist()  # e.g. [29, 29, 29, 28, 29]
        for new, old in enumerate(classes):  # same images, same order, label = position in `classes`
            torch.testing.assert_close(after.images[after.labels == new], before.images[before.labels == old])
    assert len(sub.train) + len(sub.val) == sum((full.train.labels == c).sum() + (full.val.labels == c).sum()
                                                for c in classes)


def test_class_subset_of_cifar_and_imagefolder(cifar10_root: Path, imagefolder_root: Path) -> None:
    full = build_datasets(DataConfig("cifar10", mean=MEAN, std=STD, root=cifar10_root, download=False), 32)
    sub = build_datasets(DataConfig("cifar10", mean=MEAN, std=STD, root=cifar10_root, download=False,
                                    classes=[5, 3]), 32)
    assert sub.class_names == ["dog", "cat"]
    keep = (full.val.labels == 5) | (full.val.labels == 3)
    assert len(sub.val) == int(keep.sum()) > 0
    assert sub.val.labels.tolist() == [0 if y == 5 else 1 for y in full.val.labels[keep].tolist()]
    torch.testing.assert_close(sub.val.images, full.val.images[keep])

    folders = build_datasets(DataConfig("imagefolder", mean=MEAN, std=STD, root=imagefolder_root, classes=[1]), 32)
    assert folders.class_names == ["square"] and (len(folders.train), len(folders.val)) == (6, 2)
    assert folders.train.targets == [0] * 6 and all("/square/" in path for path, _ in folders.train.samples)
    assert folders.val[1][1] == 0 and folders.val[1][0].shape == (3, 32, 32)


@pytest.mark.parametrize("classes", [[10], [-1, 2], [], [2, 2], "5", [1.5]])
def test_bad_classes_is_a_one_line_config_error(classes: object) -> None:
    with pytest.raises(ConfigError, match=r"^data\.classes") as e:
        build_datasets(DataConfig("digits", mean=MEAN, std=STD, classes=classes), 8)
    assert "\n" not in str(e.value)
    if classes in ([10], [-1, 2]):
        assert "0..9 for digits" in str(e.value)


def test_classes_missing_from_a_split_is_a_data_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(test_batch.read_bytes())
    entry["labels"] = [0] * len(entry["labels"])  # no test image of class 1
    test_batch.write_bytes(pickle.dumps(entry))
    with pytest.raises(DataError, match=r"^cifar10 has no val images of data.classes=\[1\]"):
        build_datasets(DataConfig("cifar10", mean=MEAN, std=STD, root=tmp_path, download=False, classes=[1]), 32)


def test_rand_augment_changes_train_images_only() -> None:
    image = _noise_image(16, 40, 216)
    plain = build_transforms(16, MEAN, STD, train=True, crop_padding=0, hflip=False)(image)  # deterministic
    augment = build_transforms(16, MEAN, STD, train=True, crop_padding=0, hflip=False,
                               auto_augment="rand-m9-mstd0.5-inc1")
    _seed(0)
    outputs = [augment(image) for _ in range(10)]
    assert sum(not torch.equal(o, plain) for o in outputs) >= 6  # each of 2 ops applies with p=0.5
    assert all(o.shape == (3, 16, 16) and o.dtype == torch.float32 for o in outputs)
    assert all(o.min() >= -1.0 and o.max() <= 1.0 for o in outputs)  # still uint8 levels, normalized

    splits = build_datasets(DataConfig("digits", mean=MEAN, std=STD, auto_augment="rand-m9-mstd0.5-inc1"), 16)
    assert any(type(t).__name__ == "RandAugment" for t in splits.train.transform.transforms)
    assert not any(type(t).__name__ == "RandAugment" for t in splits.val.transform.transforms)
    _seed(0)
    first = [splits.val[i][0] for i in range(5)]
    _seed(1)
    assert all(torch.equal(a, splits.val[i][0]) for i, a in enumerate(first))


def test_rand_augment_is_configured_as_timm_create_transform() -> None:
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    mean, std, policy = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "rand-m9-mstd0.5-inc1"
    ours = build_transforms(224, mean, std, train=True, interpolation="bicubic", auto_augment=policy)
    theirs = create_transform(224, is_training=True, auto_augment=policy, interpolation="bicubic", mean=mean, std=std)
    (a,), (b,) = ([t for t in c.transforms if isinstance(t, RandAugment)] for c in (ours, theirs))
    assert a.ops[0].hparams["img_mean"] == (124, 116, 104)  # round(255 * mean): the fill colour
    assert a.ops[0].hparams["translate_const"] == 100  # int(0.45 * 224)
    assert a.num_layers == b.num_layers == 2
    assert [(o.name, o.prob, o.magnitude, o.magnitude_std, o.hparams, o.kwargs) for o in a.ops] == \
           [(o.name, o.prob, o.magnitude, o.magnitude_std, o.hparams, o.kwargs) for o in b.ops]


def test_color_jitter_changes_brightness_and_contrast_and_is_off_with_rand_augment() -> None:
    image = _noise_image(16, 40, 216)
    plain = build_transforms(16, MEAN, STD, train=True, crop_padding=0, hflip=False)(image)
    jitter = build_transforms(16, MEAN, STD, train=True, crop_padding=0, hflip=False, color_jitter=0.4)
    _seed(0)
    outputs = [jitter(image) for _ in range(10)]
    means, stds = torch.stack([o.mean() for o in outputs]), torch.stack([o.std() for o in outputs])
    assert (means - plain.mean()).abs().max() > 0.2  # brightness factor in [0.6, 1.4]
    assert (stds - plain.std()).abs().max() > 0.1  # contrast factor in [0.6, 1.4]
    assert all(o.shape == (3, 16, 16) and o.min() >= -1.0 and o.max() <= 1.0 for o in outputs)
    with_ra = build_transforms(16, MEAN, STD, train=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1")
    assert not any(type(t).__name__ == "ColorJitter" for t in with_ra.transforms)  # as timm: RandAugment only
    assert not any(type(t).__name__ == "ColorJitter"
                   for t in build_transforms(16, MEAN, STD, train=False, color_jitter=0.4).transforms)


def test_random_erasing_replaces_one_rectangle_after_normalization() -> None:
    image = _noise_image(32)
    plain = build_transforms(32, MEAN, STD, train=True, crop_padding=0, hflip=False)(image)
    unerased = build_transforms(32, MEAN, STD, train=True, crop_padding=0, hflip=False, re_prob=0.0)
    erase = build_transforms(32, MEAN, STD, train=True, crop_padding=0, hflip=False, re_prob=1.0)
    assert torch.equal(unerased(image), plain)
    for seed in range(3):
        _seed(seed)
        out = erase(image)
        changed = out != plain
        assert torch.equal(changed, changed[:1].expand(3, -1, -1))  # the same pixels in every channel
        rows, cols = changed[0].nonzero(as_tuple=True)
        box = changed[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and changed[0].sum() == box.numel()  # one filled rectangle, the rest equal
        assert 0.02 * 32 * 32 * 0.8 <= box.numel() <= 32 * 32 / 3 * 1.2  # timm's area range, after rounding
        assert out[changed].abs().max() > 1.0  # N(0, 1) noise, beyond the [-1, 1] of normalized pixels
        _seed(seed)
        assert torch.equal(erase(image), out)  # the seed fixes the rectangle
    evaluate = build_datasets(DataConfig("digits", mean=MEAN, std=STD, re_prob=1.0), 16).val.transform
    assert not any(type(t).__name__ == "RandomErasing" for t in evaluate.transforms)


@pytest.mark.parametrize("setting, match", [
    (dict(auto_augment="autoaugment"), r"data\.auto_augment='autoaugment' is not an augmentation policy"),
    (dict(auto_augment="rand-x9"), r"data\.auto_augment='rand-x9' is not a valid timm policy string"),
    (dict(color_jitter=-0.1), r"data\.color_jitter must be >= 0"),
    (dict(re_prob=1.5), r"data\.re_prob is a probability"),
])
def test_bad_augmentation_settings_are_one_line_errors(setting: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        build_transforms(16, MEAN, STD, train=True, **setting)
    assert "\n" not in str(e.value)


def test_data_config_keys_reach_build_datasets() -> None:
    from vitrain.config import compose, to_config

    d = compose(["data.classes=[5,6,7,8,9]", "data.auto_augment=rand-m9-mstd0.5-inc1",
                 "data.color_jitter=0.4", "data.re_prob=0.25"]).data
    assert (d.auto_augment, d.color_jitter, d.re_prob) == ("rand-m9-mstd0.5-inc1", 0.4, 0.25)
    splits = build_datasets(to_config(compose(["data.classes=[5,6,7,8,9]", "data.auto_augment=rand-m9-mstd0.5-inc1",
                                               "data.color_jitter=0.4", "data.re_prob=0.25"])).data, 16)
    assert splits.class_names == ["5", "6", "7", "8", "9"] and set(splits.train.labels.tolist()) == set(range(5))
    image, label = splits.train[0]
    assert image.shape == (3, 16, 16) and 0 <= label < 5
    defaults = compose().data
    assert (defaults.auto_augment, defaults.color_jitter, defaults.re_prob, defaults.classes) == (None, 0.0, 0.0, None)


def test_train_fraction_keeps_a_stratified_share() -> None:
    full = build_datasets(DataConfig("digits", mean=MEAN, std=STD), 16)
    part = build_datasets(DataConfig("digits", mean=MEAN, std=STD, train_fraction=0.2), 16)
    full_counts = np.bincount(full.train.labels.numpy())
    part_labels = np.array([part.train[i][1] for i in range(len(part.train))])
    np.testing.assert_array_equal(np.bincount(part_labels), np.round(full_counts * 0.2).astype(int))
    assert len(part.val) == len(full.val) == 360  # the test set is untouched
    again = build_datasets(DataConfig("digits", mean=MEAN, std=STD, train_fraction=0.2), 16)
    assert part.train.indices == again.train.indices  # the same images every time
    with pytest.raises(ConfigError, match="data.train_fraction must be in"):
        build_datasets(DataConfig("digits", mean=MEAN, std=STD, train_fraction=0.0), 16)


def test_a_pass_over_an_evaluation_set_leaves_the_global_rng_alone() -> None:
    """Validation runs between training epochs: it must not shift the random draws of training that follow
    (drop path, crops), or a run would depend on how often it validates."""
    from vitrain.data import cpu_eval_loader

    splits = build_datasets(DataConfig("digits", mean=MEAN, std=STD), 16)
    for loader in (cpu_loaders(splits, 64)[1], cpu_eval_loader(splits.val, 64)):
        before = torch.get_rng_state()
        assert sum(len(y) for _, y in loader) == 360
        assert torch.equal(torch.get_rng_state(), before)


def test_an_image_folder_names_its_stray_files_and_its_classes_before_any_image_is_read(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Files that are not images in the class folders (notes, .DS_Store, a RAW file) are left out with a count and
    the first three named; the data's line gives the split sizes and each class's training images."""
    from PIL import Image

    from vitrain.data.datasets import DataSplits, load_imagefolder

    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n + (cls == "dog")):
                Image.new("RGB", (8, 8)).save(tmp_path / split / cls / f"{i}.png")
    for stray in ("train/cat/notes.txt", "train/cat/.DS_Store", "train/dog/IMG_1.CR2", "train/dog/z.txt"):
        (tmp_path / stray).write_bytes(b"x")
    with caplog.at_level("INFO", logger="vitrain.data.datasets"):
        train, val, classes = load_imagefolder(tmp_path)
    assert f"{tmp_path}/train: 4 files that are not images of a known kind left out (cat/.DS_Store, cat/notes.txt, " \
           "dog/IMG_1.CR2, ...)" in caplog.text
    assert str(tmp_path / "val") not in caplog.text  # nothing stray there
    line = DataSplits(train, val, classes).describe("imagefolder")
    assert line == "data imagefolder: 7 train / 3 val images; 2 classes with their training images: cat (3), dog (4)"
