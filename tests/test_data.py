"""Data sets and transforms on real formats: the bundled digits, a CIFAR-format folder, PNG folders."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from conftest import CIFAR10_CLASSES, write_cifar10

from vitrain.data import build_datasets, build_loaders
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
    splits = build_datasets("digits", 16, MEAN, STD, crop_padding=0, hflip=False, interpolation="nearest")
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
    splits = build_datasets("cifar10", 48, MEAN, STD, root=cifar10_root, download=False)
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
    splits = build_datasets("imagefolder", 32, MEAN, STD, root=imagefolder_root)
    assert splits.class_names == ["circle", "square"]
    assert (len(splits.train), len(splits.val)) == (12, 4)
    image, label = splits.val[3]
    assert image.shape == (3, 32, 32) and label == 1  # 40x30 PNG -> resized and center-cropped


def test_imagefolder_missing_split(imagefolder_root: Path) -> None:
    import shutil

    shutil.rmtree(imagefolder_root / "val")
    with pytest.raises(DataError, match=r"no images under .*val .*<class_name>"):
        build_datasets("imagefolder", 32, MEAN, STD, root=imagefolder_root)


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="unknown data set 'mnist'.*digits, cifar10"):
        build_datasets("mnist", 32, MEAN, STD)


def test_loaders_fix_the_order_by_seed() -> None:
    splits = build_datasets("digits", 16, MEAN, STD)
    first = [next(iter(build_loaders(splits, 8, seed=3)[0]))[1] for _ in range(2)]
    other = next(iter(build_loaders(splits, 8, seed=4)[0]))[1]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], other)
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        build_loaders(splits, 0)
